"""Benchmark of the tail estimators against the baselines a user would otherwise run.

For each dtype and size: a one-pass read (x.sum(), the physical floor), gradience hill
(k = n/10), hill_plot with 64 ks, quantile, and the baselines: NumPy np.sort Hill, np.partition
Hill, torch.topk Hill, torch.kthvalue (one order statistic) and torch.quantile (which refuses
inputs over 2^24 elements: its error is recorded). Data: standard Gaussian draws (the shape of
gradient entries), so the histogram bins are as concentrated as in training.

Usage:  python bench/bench_tail.py                 # n = 1e6, 1e7, 1e8; fp32 and bf16; memory
        python bench/bench_tail.py --sizes 1e6 --no-memory --quick
Writes bench/results/bench_tail_cpu.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import gradience_kernels as gk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QS = [0.001, 0.5, 0.999]


def hill_from_desc(top: np.ndarray, k: int) -> float:
    """Hill from the k+1 largest |x| (any order except that top[k] is X(k+1))."""
    logs = np.log(top[:k].astype(np.float64))
    return k / float(np.sum(logs) - k * math.log(float(top[k])))


def numpy_abs(x: torch.Tensor) -> np.ndarray:
    # NumPy has no bfloat16: a user converts first, and that cost is part of the baseline.
    return np.abs(x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy())


def np_sort_hill(x: torch.Tensor, k: int) -> float:
    a = numpy_abs(x)
    a = np.sort(a[np.isfinite(a) & (a > 0)])[::-1]
    return hill_from_desc(a, k)


def np_partition_hill(x: torch.Tensor, k: int) -> float:
    a = numpy_abs(x)
    a = a[np.isfinite(a) & (a > 0)]
    n = a.size
    part = np.partition(a, n - k - 1)
    top = np.concatenate([part[n - k:], part[n - k - 1: n - k]])
    return hill_from_desc(top, k)


def topk_hill(x: torch.Tensor, k: int) -> float:
    v = x.abs().float().topk(k + 1).values.double()
    return k / float(torch.log(v[:k]).sum() - k * torch.log(v[k]))


def kthvalue(x: torch.Tensor, k: int) -> float:
    return float(x.abs().kthvalue(x.numel() - k).values)


def torch_quantile(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x, torch.tensor(QS, dtype=x.dtype))


def run_case(dtype_name: str, n: int, quick: bool) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(n % 1000 + 7)
    x = torch.randn(n, generator=g).to(DTYPES[dtype_name])
    k = n // 10
    # A Hill plot's k axis is logarithmic: 64 log-spaced ks from 10 to n/10. Evenly spaced ks
    # from n/1000 to n/10 put every rank in the dense part of the tail (the harder case).
    ks_log = sorted({int(v) for v in np.geomspace(10, k, 64)})
    ks_lin = [int(v) for v in np.linspace(max(1, n // 1000), k, 64)]
    fast = 3 if quick else 7
    # Baselines that allocate fresh n-sized arrays swing by 3x between runs (page faults of
    # new memory): medians of 3, except the two that take 5-10 s each at n = 1e8.
    slow = 1 if quick else 3
    slowest = 1 if (quick or n >= 10**8) else 3
    rows: list[dict[str, object]] = []

    def add(name, fn, repeats, group, alpha_of=None):
        last = []

        def timed():
            last[:] = [fn()]

        try:
            median, times = harness.time_median(timed, repeats=repeats,
                                                warmup=1 if repeats > 1 else 0)
            value = last[0] if alpha_of == "call" else None
            rows.append({"dtype": dtype_name, "n": n, "name": name, "group": group,
                         "median_s": median, "times_s": times, "alpha": value})
        except Exception as err:  # noqa: BLE001 - a baseline that fails is a result
            rows.append({"dtype": dtype_name, "n": n, "name": name, "group": group,
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})

    add("x.sum() one-pass read", lambda: x.sum(), fast, "read")
    add("gradience hill (k=n/10)", lambda: gk.hill(x, k).alpha.item(), fast, "ours-hill", "call")
    add(f"gradience hill_plot ({len(ks_log)} log ks)", lambda: gk.hill_plot(x, ks_log), fast,
        "ours-plot")
    add("gradience hill_plot (64 linear ks)", lambda: gk.hill_plot(x, ks_lin), fast,
        "ours-plot-linear")
    add("gradience quantile (3 q)", lambda: gk.quantile(x, QS), fast, "ours-quantile")
    add("np.sort Hill", lambda: np_sort_hill(x, k), slowest, "hill", "call")
    add("np.partition Hill", lambda: np_partition_hill(x, k), slow, "hill", "call")
    add("torch.topk Hill", lambda: topk_hill(x, k), slowest, "hill", "call")
    add("torch.kthvalue (1 rank)", lambda: kthvalue(x, k), slow, "quantile")
    add("torch.quantile (3 q)", lambda: torch_quantile(x), slow, "quantile")

    by_group = {r["group"]: r for r in rows if "median_s" in r and r["group"].startswith(("read", "ours"))}
    read = by_group.get("read", {}).get("median_s")
    ours_hill = by_group.get("ours-hill", {})
    for r in rows:
        if "median_s" not in r:
            continue
        r["ratio_to_read"] = r["median_s"] / read if read else None
        mate = {"hill": "ours-hill", "quantile": "ours-quantile"}.get(r["group"])
        if mate and mate in by_group:
            r["speedup"] = r["median_s"] / by_group[mate]["median_s"]
        if r["group"] == "hill" and r.get("alpha") is not None and ours_hill.get("alpha"):
            r["alpha_rel_diff"] = abs(r["alpha"] - ours_hill["alpha"]) / abs(ours_hill["alpha"])
    for group in ("ours-plot", "ours-plot-linear"):
        plot = by_group.get(group)
        if plot and ours_hill:
            plot["vs_single_hill"] = plot["median_s"] / ours_hill["median_s"]
    return rows


MEMORY_CHILD = r"""
import sys, torch, gradience_kernels as gk
n = int(sys.argv[1])
x = torch.empty(n, dtype=torch.float32)
x.normal_()
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
gk.hill(x, n // 10).alpha.item()
print(status('VmHWM:') - before)
"""


def peak_extra_memory(n: int) -> dict[str, object]:
    """Peak resident memory of gk.hill beyond the input, in a fresh subprocess."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n)], capture_output=True,
                         text=True, env={**os.environ})
    if out.returncode != 0:
        return {"n": n, "error": out.stderr.strip().splitlines()[-1]}
    extra = int(out.stdout.strip().splitlines()[-1])
    return {"n": n, "dtype": "fp32", "extra_bytes": extra, "extra_mib": extra / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--memory-n", type=float, default=1e9)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--out", default="bench_tail_cpu", help="JSON file name (no suffix)")
    parser.add_argument("--out-dir", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)

    rows: list[dict[str, object]] = []
    columns = [("name", "estimator / baseline", ""), ("median_ms", "median ms", ".2f"),
               ("ratio_to_read", "x read", ".2f"), ("speedup", "gradience faster", ".1f"),
               ("alpha", "alpha", ".5f"), ("note", "note", "")]
    for dtype_name in args.dtypes:
        for n in (int(s) for s in args.sizes):
            case = run_case(dtype_name, n, args.quick)
            rows.extend(case)
            printable = []
            for r in case:
                p = dict(r)
                p["median_ms"] = r["median_s"] * 1e3 if "median_s" in r else None
                p["note"] = r.get("error", "")
                if "vs_single_hill" in r:
                    p["note"] = f"{r['vs_single_hill']:.2f}x a single hill"
                printable.append(p)
            print(f"\n{dtype_name}, n = {n:.0e} ({torch.get_num_threads()} threads)")
            print(harness.format_table(printable, columns))
    memory = None
    if not args.no_memory:
        memory = peak_extra_memory(int(args.memory_n))
        if "extra_mib" in memory:
            print(f"\npeak extra memory of gradience hill on {int(args.memory_n):.0e} fp32 entries: "
                  f"{memory['extra_mib']:.1f} MiB beyond the input")
        else:
            print(f"\npeak extra memory measurement failed: {memory['error']}")
    path = harness.write_json(args.out, {"machine": harness.machine_info("cpu"), "rows": rows,
                                         "peak_extra_memory": memory}, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

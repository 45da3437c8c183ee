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
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import gradience_kernels as gk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))
import reference as ref  # noqa: E402  (the one reference module of tests and benchmarks)

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


# --------------------------------------------------------------------------- tail suite
def _student_t(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3, n)


def run_suite(sizes: list[int], ref_seeds: dict[int, int], quick: bool) -> list[dict[str, object]]:
    """tail_index (double bootstrap) against the sort-based NumPy reference procedures (Hill and
    moment double bootstraps, as in the tail-estimation scripts) on Student-t(3) data; the
    McCulloch stable fit against scipy's _fitstart and levy_stable.fit; the GPD fit against
    scipy's genpareto.fit."""
    from scipy import stats

    rows: list[dict[str, object]] = []
    r_boot = 100 if quick else 500
    for n in sizes:
        x = _student_t(n, 1)
        t0 = time.perf_counter()
        ours = gk.tail_index(torch.from_numpy(x), r_bootstrap=r_boot, seed=0)
        t_ours = time.perf_counter() - t0
        desc = ref.tail_sorted(x)
        ref_hill, ref_moment, t_ref = [], [], []
        for seed in range(ref_seeds.get(n, 1)):
            t0 = time.perf_counter()
            ref_hill.append(ref.hill_double_bootstrap(desc, r=r_boot, seed=seed)["k_star"])
            ref_moment.append(ref.moment_double_bootstrap(desc, r=r_boot, seed=seed)["k_star"])
            t_ref.append(time.perf_counter() - t0)
        t_ref_median = float(np.median(t_ref))
        rows.append({
            "name": f"tail_index double bootstrap, n={n:.0e}", "n": n, "r_bootstrap": r_boot,
            "median_s": t_ours, "baseline": "NumPy reference Hill + moment double bootstraps",
            "baseline_s": t_ref_median, "baseline_times_s": t_ref, "speedup": t_ref_median / t_ours,
            "k_hill": ours.k_hill, "reference_k_hill": ref_hill,
            "k_moment": ours.k_moment, "reference_k_moment": ref_moment,
            "k_hill_inside_reference_range": min(ref_hill) <= ours.k_hill <= max(ref_hill),
            "k_moment_inside_reference_range": min(ref_moment) <= ours.k_moment <= max(ref_moment),
            "verdict": ours.verdict,
        })
    # McCulloch: ours at 1e8 (fp32) and 1e7, scipy's _fitstart at 1e7 (float64, its own input);
    # --quick: 1e6 and 1e5.
    big, mid = (10**6, 10**5) if quick else (10**8, 10**7)
    g = torch.Generator().manual_seed(3)
    xb = (torch.randn(big, generator=g) / torch.randn(big, generator=g)).float()  # Cauchy
    t_big, _ = harness.time_median(lambda: gk.fit_stable(xb), repeats=3)
    x7 = xb[:mid].double().numpy()
    t_ours7, _ = harness.time_median(lambda: gk.fit_stable(torch.from_numpy(x7)), repeats=3)
    t_fitstart7, _ = harness.time_median(lambda: stats.levy_stable._fitstart(x7), repeats=3)
    same = np.max(np.abs(np.array(gk.fit_stable(torch.from_numpy(x7))[:4])
                         - np.array(stats.levy_stable._fitstart(x7))))
    rows.append({"name": f"fit_stable (McCulloch), n={big:.0e} fp32", "median_s": t_big,
                 "baseline": f"scipy levy_stable._fitstart, n={mid:.0e}", "baseline_s": t_fitstart7,
                 "speedup": t_fitstart7 / t_big})
    rows.append({"name": f"fit_stable (McCulloch), n={mid:.0e} fp64", "median_s": t_ours7,
                 "baseline": f"scipy levy_stable._fitstart, n={mid:.0e}", "baseline_s": t_fitstart7,
                 "speedup": t_fitstart7 / t_ours7, "max_abs_param_diff": float(same)})
    x1k = x7[:1000]
    t_small, _ = harness.time_median(lambda: gk.fit_stable(torch.from_numpy(x1k)), repeats=5)
    budget = 5 if quick else 300
    child = ("import numpy as np, sys; from scipy import stats; import time; "
             "x=np.load(sys.argv[1]); t=time.perf_counter(); stats.levy_stable.fit(x); "
             "print(time.perf_counter()-t)")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "gradience_levy_1000.npy"
    np.save(path, x1k)
    try:
        out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True,
                             text=True, timeout=budget)
        t_mle = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        note = "" if t_mle is not None else out.stderr.strip().splitlines()[-1][:120]
    except subprocess.TimeoutExpired:
        t_mle, note = None, f"levy_stable.fit did not finish within {budget} s"
    rows.append({"name": "fit_stable (McCulloch), n=1000", "median_s": t_small,
                 "baseline": "scipy levy_stable.fit (MLE), n=1000", "baseline_s": t_mle,
                 "speedup": (t_mle / t_small) if t_mle else None, "note": note,
                 "baseline_lower_bound_s": None if t_mle else budget})
    # GPD on the exceedances of a 1e7-entry Student-t(3) sample over X(k+1), k = 10^4 and 10^5
    # (--quick: 1e5 entries, k = 10^3).
    xt = torch.from_numpy(_student_t(10**5 if quick else 10**7, 2))
    for k in ((10**3,) if quick else (10**4, 10**5)):
        fit = gk.fit_gpd(xt, k)
        y = ref.tail_sorted(xt.numpy())[:k] - fit.threshold
        y = y[y > 0]
        t_gpd, _ = harness.time_median(lambda: gk.fit_gpd(xt, k), repeats=3)
        t0 = time.perf_counter()
        c, _, scale = stats.genpareto.fit(y, floc=0)
        t_scipy = time.perf_counter() - t0
        rows.append({"name": f"fit_gpd, k={k:.0e} of {xt.numel():.0e}", "median_s": t_gpd,
                     "baseline": "scipy genpareto.fit(floc=0) on the same exceedances "
                                 "(exceedances given)", "baseline_s": t_scipy,
                     "speedup": t_scipy / t_gpd, "xi": fit.xi, "scipy_xi": float(c),
                     "xi_rel_diff": abs(fit.xi - c) / abs(c)})
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
    parser.add_argument("--parts", nargs="+", choices=["core", "suite"], default=["core", "suite"],
                        help="core: order-statistics rows; suite: bootstrap and fit rows")
    parser.add_argument("--suite-sizes", nargs="+", type=float, default=[1e5, 1e6])
    parser.add_argument("--reference-seeds", type=int, default=3,
                        help="seeds of the NumPy reference double bootstrap (its k* spread)")
    args = parser.parse_args(argv)

    rows: list[dict[str, object]] = []
    columns = [("name", "estimator / baseline", ""), ("median_ms", "median ms", ".2f"),
               ("ratio_to_read", "x read", ".2f"), ("speedup", "gradience faster", ".1f"),
               ("alpha", "alpha", ".5f"), ("note", "note", "")]
    for dtype_name in (args.dtypes if "core" in args.parts else []):
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
    suite = None
    if "suite" in args.parts:
        sizes = [int(v) for v in args.suite_sizes]
        seeds = {n: (args.reference_seeds if n <= 10**5 else max(1, args.reference_seeds - 1))
                 for n in sizes}
        suite = run_suite(sizes, seeds, args.quick)
        cols = [("name", "estimator", ""), ("median_ms", "ms", ".1f"), ("baseline", "baseline", ""),
                ("baseline_ms", "baseline ms", ".0f"), ("speedup", "gradience faster", ".1f"),
                ("note", "note", "")]
        printable = []
        for r in suite:
            p = dict(r)
            p["median_ms"] = r["median_s"] * 1e3
            p["baseline_ms"] = r["baseline_s"] * 1e3 if r.get("baseline_s") else None
            if "k_hill" in r:
                p["note"] = (f"k* Hill {r['k_hill']} (reference {r['reference_k_hill']}), "
                             f"moment {r['k_moment']} (reference {r['reference_k_moment']})")
            printable.append(p)
        print("\ntail suite (2 threads)")
        print(harness.format_table(printable, cols))
    memory = None
    if not args.no_memory and "core" in args.parts:
        memory = peak_extra_memory(int(args.memory_n))
        if "extra_mib" in memory:
            print(f"\npeak extra memory of gradience hill on {int(args.memory_n):.0e} fp32 entries: "
                  f"{memory['extra_mib']:.1f} MiB beyond the input")
        else:
            print(f"\npeak extra memory measurement failed: {memory['error']}")
    payload = {"machine": harness.machine_info("cpu"), "rows": rows, "peak_extra_memory": memory,
               "suite_rows": suite}
    path = harness.write_json(args.out, payload, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark of the tail estimators (issue 4): one process, same data, ratios to a one-pass
read. Rows for n = 1e8 and 1e9, fp32 and bf16: gradience hill (each available backend), hill_plot
with 64 log-spaced ks, quantile, torch.topk Hill, torch.kthvalue, torch.sort Hill,
torch.quantile and x.sum(); plus 1e9 entries as 200 tensors through the list API. Accuracy: the
gradience alpha against a float64 Hill of the same top values (torch.topk on the GPU).

Usage: python bench/bench_tail_gpu.py [--sizes 1e8 1e9] [--out-dir DIR]
       python bench/bench_tail_gpu.py --device cpu --sizes 1e5 --quick   (smoke test on CPU,
       under TRITON_INTERPRET=1; --quick: 3 repeats, 8 ks in the Hill plot)
Writes bench_tail_<gpu name>.json under bench/results (or --out-dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import gradience_kernels as gk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def topk_hill(x: torch.Tensor, k: int) -> float:
    v = x.abs().float().topk(k + 1).values.double()
    return k / float(torch.log(v[:k]).sum() - k * torch.log(v[k]))


def sort_hill(x: torch.Tensor, k: int) -> float:
    v = torch.sort(x.abs().float(), descending=True).values[: k + 1].double()
    return k / float(torch.log(v[:k]).sum() - k * torch.log(v[k]))


def run_case(dtype_name, n, device, repeats, n_ks=64):
    g = torch.Generator(device=device).manual_seed(n % 997)
    x = torch.randn(n, generator=g, device=device).to(DTYPES[dtype_name])
    k = n // 10
    ks = sorted({int(v) for v in np.geomspace(10, k, n_ks)})
    rows = []

    def add(name, fn, group, reps=repeats):
        out = []
        try:
            med, times = harness.time_median(lambda: out.append(fn()), repeats=reps,
                                             warmup=1, device=device)
            value = out[-1]
            alpha = float(value) if isinstance(value, (float, int)) else None
            rows.append({"dtype": dtype_name, "n": n, "name": name, "group": group,
                         "median_s": med, "times_s": times, "alpha": alpha})
        except Exception as err:  # noqa: BLE001 - a baseline that fails is a result
            rows.append({"dtype": dtype_name, "n": n, "name": name, "group": group,
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    add("x.sum() one-pass read", lambda: x.sum().item(), "read")
    # The CUDA C++ op first: "ours" for the ratios below (the default backend).
    add("gradience hill, CUDA C++ (k=n/10)", lambda: _hill_backend(x, k, "cpp"), "ours-hill")
    add("gradience hill, Triton (k=n/10)", lambda: _hill_backend(x, k, "triton"), "ours-hill-triton")
    add(f"gradience hill_plot ({len(ks)} log ks), CUDA C++",
        lambda: gk.tail_stats(x, ks)[0][:, 0].sum().item(), "ours-plot")
    add(f"gradience hill_plot ({len(ks)} log ks), Triton",
        lambda: gk.tail_stats(x, ks, backend="triton")[0][:, 0].sum().item(), "ours-plot-triton")
    add("gradience quantile (3 q)", lambda: gk.quantile(x, [0.001, 0.5, 0.999]).sum().item(),
        "ours-quantile")
    add("torch.topk Hill", lambda: topk_hill(x, k), "hill", max(1, repeats // 3))
    add("torch.sort Hill", lambda: sort_hill(x, k), "hill", max(1, repeats // 3))
    add("torch.kthvalue (1 rank)", lambda: float(x.abs().float().kthvalue(n - k).values),
        "quantile", max(1, repeats // 3))
    add("torch.quantile (3 q)", lambda: torch.quantile(
        x.float(), torch.tensor([0.001, 0.5, 0.999], device=device)).sum().item(), "quantile")
    read = next((r["median_s"] for r in rows if r["group"] == "read" and "median_s" in r), None)
    ours = next((r for r in rows if r["group"] == "ours-hill" and "median_s" in r), None)
    for r in rows:
        if "median_s" in r and read:
            r["ratio_to_read"] = r["median_s"] / read
        if r["group"] == "hill" and ours and "median_s" in r:
            r["speedup"] = r["median_s"] / ours["median_s"]
            if r.get("alpha") and ours.get("alpha"):
                r["alpha_rel_diff"] = abs(r["alpha"] - ours["alpha"]) / abs(r["alpha"])
    return rows, x


def _hill_backend(x, k, backend):
    rows, _ = gk.tail_stats(x, [k], backend=backend)
    return float(rows[0, 0] / rows[0, 5])


def run_list_case(n, device, repeats):
    """n entries as 200 tensors of model-like sizes, against the same entries as one tensor."""
    g = torch.Generator(device=device).manual_seed(5)
    flat = torch.randn(n, generator=g, device=device)
    sizes = np.geomspace(1, 50, 200)
    cuts = np.concatenate([[0], np.cumsum(sizes / sizes.sum() * n).astype(np.int64)])
    cuts[-1] = n
    parts = [flat[int(a):int(b)] for a, b in zip(cuts[:-1], cuts[1:])]
    k = n // 10
    out = []
    for backend, label in (("cpp", "CUDA C++"), ("triton", "Triton")):
        t_flat, _ = harness.time_median(lambda: _hill_backend(flat, k, backend), repeats, 1,
                                        device)
        t_list, _ = harness.time_median(lambda: gk.tail_stats(parts, [k], backend=backend)[0]
                                        .sum().item(), repeats, 1, device)
        out.append({"n": n, "name": f"gradience hill, 200 tensors (list API), {label}",
                    "median_s": t_list, "flat_median_s": t_flat, "list_over_flat": t_list / t_flat})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e8, 1e9])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke test", file=sys.stderr)
        return 2
    repeats = 3 if args.quick else 10
    rows, lists = [], []
    for dtype_name in args.dtypes:
        for n in (int(s) for s in args.sizes):
            case, x = run_case(dtype_name, n, device, repeats, 8 if args.quick else 64)
            del x
            rows.extend(case)
            print(f"\n{dtype_name}, n = {n:.0e} ({device})")
            print(harness.format_table(
                [{**r, "ms": r["median_s"] * 1e3 if "median_s" in r else None,
                  "note": r.get("error", "")} for r in case],
                [("name", "estimator / baseline", ""), ("ms", "median ms", ".3f"),
                 ("ratio_to_read", "x read", ".2f"), ("speedup", "gradience faster", ".1f"),
                 ("note", "note", "")]))
    biggest = int(max(args.sizes))
    lists.extend(run_list_case(biggest, device, repeats))
    for r in lists:
        print(f"\n{r['name']}, n = {biggest:.0e}: {r['list_over_flat']:.2f}x the flat tensor")
    machine = harness.machine_info(device.type)
    name = args.out or ("bench_tail_" + (machine.get("gpu", "cpu").replace(" ", "_")
                                         .replace("/", "_")).lower())
    path = harness.write_json(name, {"machine": machine, "rows": rows, "list_rows": lists},
                              args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Spread of the double-bootstrap k* across seeds: the compiled procedure (gradience) against the
sort-based NumPy reference procedure (python_tests/reference.py) on the same data, Student-t(3)
at n = 10^6 (the data of bench_tail.py's suite rows). k* is random: the acceptance question is
whether ours lies inside the reference's spread, which a single run of three seeds resolves
poorly.

Usage: python bench/bench_kstar_spread.py [--n 1e6] [--ours 10] [--reference 9]
Writes bench/results/bench_kstar_spread_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))
import harness  # noqa: E402
import reference as ref  # noqa: E402

import gradience_kernels as gk  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--ours", type=int, default=10, help="seeds of the compiled procedure")
    parser.add_argument("--reference", type=int, default=9, help="seeds of the reference")
    parser.add_argument("--r-bootstrap", type=int, default=500)
    parser.add_argument("--out", default="bench_kstar_spread_cpu")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    n = int(args.n)
    x = np.random.default_rng(1).standard_t(3, n)  # as bench_tail.run_suite
    desc = ref.tail_sorted(x)
    logs = gk.sorted_tail_logs(torch.from_numpy(x))
    result = {}
    for estimator, procedure in (("moment", ref.moment_double_bootstrap),
                                 ("hill", ref.hill_double_bootstrap)):
        ours = [gk.double_bootstrap(None, estimator, r_bootstrap=args.r_bootstrap, seed=s,
                                    _logs=logs).k_star for s in range(args.ours)]
        theirs, times = [], []
        for s in range(args.reference):
            t0 = time.perf_counter()
            theirs.append(procedure(desc, r=args.r_bootstrap, seed=s)["k_star"])
            times.append(time.perf_counter() - t0)
            print(estimator, "reference so far", sorted(theirs), flush=True)
        inside = [min(theirs) <= k <= max(theirs) for k in ours]
        result[estimator] = {"ours": ours, "reference": theirs, "reference_times_s": times,
                             "ours_inside_reference_range": sum(inside),
                             "ours_seed0_inside": inside[0]}
        print(f"{estimator}: ours {sorted(ours)}; reference {sorted(theirs)}; "
              f"{sum(inside)}/{len(ours)} of ours inside the reference range", flush=True)
    path = harness.write_json(args.out, {"machine": harness.machine_info("cpu"), "n": n,
                                         "data": "Student-t(3), numpy default_rng(1)",
                                         "r_bootstrap": args.r_bootstrap, "kstar": result},
                              args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

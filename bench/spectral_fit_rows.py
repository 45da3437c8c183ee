"""Rows of the spectral benchmark for the power-law fit (composed into bench/bench_spectral.py).

For each size n: gradience fit_power_law (block-bounded D, the default; and the exhaustive D,
the same numbers by an O(n^2) evaluation) against the direct O(n^2) NumPy scan of
python_tests/reference.py and against powerlaw.Fit (when importable), on the same spectrum, in
one process, with agreement columns. Data: a Marchenko-Pastur bulk (aspect ratio 1/2, sampled
by rejection from its density) with a Pareto tail (alpha 2.5) of n/20 values above the bulk
edge, the shape of a trained layer's empirical spectral density.

powerlaw chooses among candidates with alpha in (0, 3) only (its parameter range), so it is
compared with fit_power_law(alpha_range=(0, 3)); the reference with the default (all
candidates).

Usage:  python bench/spectral_fit_rows.py [--quick] [--sizes 768 3072 8192]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from gradience_kernels.power_law import fit_power_law  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))
import reference as ref  # noqa: E402  (the one reference module of tests and benchmarks)


def mp_tail_spectrum(n: int, seed: int = 0, aspect: float = 0.5, tail_alpha: float = 2.5,
                     tail_fraction: float = 0.05) -> np.ndarray:
    """n eigenvalue-like values: Marchenko-Pastur bulk (variance 1) plus a Pareto tail."""
    rng = np.random.default_rng(seed)
    k = max(1, int(n * tail_fraction))
    lo, hi = (1 - math.sqrt(aspect)) ** 2, (1 + math.sqrt(aspect)) ** 2

    def density(x):
        return np.sqrt(np.maximum((hi - x) * (x - lo), 0.0)) / (2 * math.pi * aspect * x)

    peak = density(np.linspace(lo, hi, 4097)).max() * 1.05
    bulk = np.empty(0)
    while bulk.size < n - k:
        x = rng.uniform(lo, hi, 4 * (n - k))
        bulk = np.concatenate([bulk, x[rng.uniform(0, peak, x.size) < density(x)]])
    tail = (rng.pareto(tail_alpha, k) + 1.0) * hi
    return np.concatenate([bulk[: n - k], tail])


def _powerlaw():
    try:
        import powerlaw
    except ImportError:
        return None
    return powerlaw


def power_law_rows(sizes=(768, 3072, 8192), seed: int = 0, quick: bool = False) -> list[dict]:
    """One row per size: times (median seconds) and speed-ups against the reference scan and
    powerlaw.Fit, with agreement (same xmin, max |alpha diff| over every candidate)."""
    if quick:
        sizes = tuple(n for n in sizes if n <= 3072) or (min(sizes),)
    powerlaw = _powerlaw()
    rows = []
    for n in sizes:
        values = mp_tail_spectrum(n, seed)
        x = torch.from_numpy(values)
        big = n >= 4096
        fit = fit_power_law(x)
        t_ours, _ = harness.time_median(lambda: fit_power_law(x), repeats=3 if quick else 7)
        # One thread too: on a shared 2-core machine the second thread's share of a core varies.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t_one, _ = harness.time_median(lambda: fit_power_law(x), repeats=3 if quick else 7)
        finally:
            torch.set_num_threads(threads)
        t_exh, _ = harness.time_median(lambda: fit_power_law(x, d_mode="exhaustive"),
                                       repeats=1 if big or quick else 3, warmup=0)
        r = ref.power_law_scan(values)
        t_ref, _ = harness.time_median(lambda: ref.power_law_scan(values),
                                       repeats=1 if big or quick else 3, warmup=0)
        row = {
            "n": n, "n_candidates": int(fit.xmins.numel()),
            "threads": threads, "ours_s": t_ours, "ours_1thread_s": t_one,
            "ours_exhaustive_s": t_exh, "reference_s": t_ref,
            "speedup_vs_reference": t_ref / t_ours,
            "speedup_vs_reference_1thread": t_ref / t_one,
            "pruning_gain": t_exh / t_ours,
            "same_xmin": float(fit.xmin) == r["xmin"],
            "max_alpha_diff": float(np.max(np.abs(fit.alphas.numpy() - r["alphas"]))),
            "max_D_diff": float(np.max(np.abs(fit.Ds.numpy() - r["Ds"]))),
            "xmin": float(fit.xmin), "alpha": float(fit.alpha), "D": float(fit.D),
            "powerlaw_s": None,
        }
        if powerlaw is not None and (not quick or n == sizes[0]):
            def run_powerlaw():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return powerlaw.Fit(values, verbose=0)

            pf = run_powerlaw()
            t_pl, _ = harness.time_median(run_powerlaw, repeats=1, warmup=0)
            ours_pl = fit_power_law(x, alpha_range=(0.0, 3.0))
            t_ours_pl, _ = harness.time_median(lambda: fit_power_law(x, alpha_range=(0.0, 3.0)),
                                               repeats=3 if quick else 7)
            closed = ((ours_pl.alphas > 1.0) & (ours_pl.alphas < 3.0)).numpy()
            row.update({
                "powerlaw_s": t_pl,
                "speedup_vs_powerlaw": t_pl / t_ours_pl,
                "powerlaw_same_xmin": float(ours_pl.xmin) == float(pf.xmin),
                "powerlaw_alpha_diff": abs(float(ours_pl.alpha) - float(pf.alpha)),
                # candidates powerlaw fits by the closed form (the others it clips at 3)
                "powerlaw_max_alpha_diff": float(np.max(np.abs(
                    ours_pl.alphas.numpy()[closed]
                    - pf.xmin_fitting_results["alphas"][closed]))) if closed.any() else None,
            })
        rows.append(row)
    return rows


COLUMNS = [
    ("n", "n", ""), ("ours_s", "ours s", ".2e"), ("ours_1thread_s", "1 thread s", ".2e"),
    ("ours_exhaustive_s", "exhaustive s", ".2e"), ("reference_s", "ref scan s", ".2e"),
    ("speedup_vs_reference", "x ref", ".1f"), ("speedup_vs_reference_1thread", "x ref 1t", ".1f"),
    ("same_xmin", "same xmin", ""), ("max_alpha_diff", "max|dalpha|", ".1e"),
    ("powerlaw_s", "powerlaw s", ".2e"), ("speedup_vs_powerlaw", "x powerlaw", ".0f"),
    ("powerlaw_same_xmin", "pl xmin", ""), ("powerlaw_alpha_diff", "pl |dalpha|", ".1e"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[768, 3072, 8192])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    rows = power_law_rows(tuple(a.sizes), a.seed, a.quick)
    print(f"torch threads: {torch.get_num_threads()}")
    print(harness.format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

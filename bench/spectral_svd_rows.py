"""Rows of the spectral benchmark for the randomized SVD (composed into bench/bench_spectral.py).

For each case (a batch of B matrices m x n, float32): gradience ``randomized_svd`` (batched, one
call; and the same matrices as a list, which it groups into one batch) against
``torch.svd_lowrank`` with the same rank + oversampling columns and power iterations (batched,
which it supports: one call on the (B, m, n) tensor; and the per-matrix Python loop a user with a
list of layers writes), and against ``torch.linalg.svdvals`` (exact, all singular values, batched).
Columns: median time (bench/harness.py ``time_median``), the time ratios to svd_lowrank and to
svdvals, and the accuracy of the top ``rank`` singular values against float64 svdvals of the same
matrices: per matrix max_{i <= rank} |s_i - sigma_i| / sigma_i, its max and its mean over the
matrices (the mean is the steadier comparison of two randomized methods), and for ours the
median over matrices of error_estimate / sigma_{rank+1} (sigma_{rank+1} is the best error any
rank-``rank`` approximation can reach, so this is how tight the bound is) and the fraction of
matrices whose top-rank singular value errors are within the estimate (Weyl: should be 1).

Data: weight-like matrices, i.i.d. 0.02 * Student-t(3) entries (heavy-tailed entries give a
power-law ESD tail, Martin & Mahoney JMLR 2021) plus a rank-8 signal of strength 3x the
Marchenko-Pastur edge, fixed seed.

Cases: 64 matrices 768 x 768 and 16 matrices 3072 x 768 (a transformer's attention and MLP
weights), rank 64, oversample 10, n_iter 2 (torch.svd_lowrank's default niter). ``--quick``: 8 x
128 x 128 and 4 x 512 x 128, rank 16, one timed repeat.

Usage:  python bench/spectral_svd_rows.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from gradience_kernels.spectral import randomized_svd  # noqa: E402

FULL_CASES = [(64, 768, 768), (16, 3072, 768)]
QUICK_CASES = [(8, 128, 128), (4, 512, 128)]


def weight_like(B: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """0.02 * Student-t(3) entries plus a rank-8 signal 3x above the MP edge (float32)."""
    g = torch.Generator().manual_seed(seed)
    # Student-t(3) = N / sqrt(chi2_3 / 3), drawn from g (torch's StudentT takes no generator)
    z = torch.randn(B, m, n, generator=g)
    chi2 = (torch.randn(B, m, n, 3, generator=g) ** 2).sum(-1)
    w = 0.02 * z / torch.sqrt(chi2 / 3.0)
    sd = float(w.std())
    edge = sd * (math.sqrt(max(m, n)) + math.sqrt(min(m, n)))
    u = torch.linalg.qr(torch.randn(B, m, 8, generator=g)).Q
    v = torch.linalg.qr(torch.randn(B, n, 8, generator=g)).Q
    strength = 3.0 * edge * torch.linspace(1.0, 2.0, 8)
    return w + (u * strength) @ v.mT


def _rel_err(s: torch.Tensor, exact: torch.Tensor, rank: int) -> tuple[float, float]:
    """(max, mean over matrices) of max_{i <= rank} |s_i - sigma_i| / sigma_i."""
    top = exact[..., :rank]
    per = ((s[..., :rank].double().cpu() - top).abs() / top).amax(dim=-1)
    return float(per.max()), float(per.mean())


def svd_rows(quick: bool = False, device: str = "cpu", rank: int | None = None,
             oversample: int = 10, n_iter: int = 2, seed: int = 0) -> list[dict[str, object]]:
    """Timing and accuracy rows (module docstring): one dict per tool and case."""
    cases = QUICK_CASES if quick else FULL_CASES
    rank = rank if rank is not None else (16 if quick else 64)
    repeats = 1 if quick else 3
    q = rank + oversample
    rows: list[dict[str, object]] = []
    for B, m, n in cases:
        A = weight_like(B, m, n, seed).to(device)
        mats = list(A.unbind(0))
        exact = torch.linalg.svdvals(A.double()).cpu()                     # (B, min(m, n))
        base = {"case": f"{B}x{m}x{n}", "B": B, "m": m, "n": n, "rank": rank,
                "oversample": oversample, "n_iter": n_iter, "dtype": "float32", "device": device}

        gen = torch.Generator().manual_seed(seed + 1)
        ours = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter, generator=gen)
        _, s_lr, _ = torch.svd_lowrank(A, q=q, niter=n_iter)
        s_loop = torch.stack([torch.svd_lowrank(a, q=q, niter=n_iter)[1] for a in mats])
        ours_list = randomized_svd(mats, rank, oversample=oversample, n_iter=n_iter,
                                   generator=torch.Generator().manual_seed(seed + 1))

        fns = {
            "gradience randomized_svd (batched)": lambda: randomized_svd(
                A, rank, oversample=oversample, n_iter=n_iter, generator=gen),
            "gradience randomized_svd (list)": lambda: randomized_svd(
                mats, rank, oversample=oversample, n_iter=n_iter, generator=gen),
            "torch.svd_lowrank (batched)": lambda: torch.svd_lowrank(A, q=q, niter=n_iter),
            "torch.svd_lowrank (per-matrix loop)": lambda: [
                torch.svd_lowrank(a, q=q, niter=n_iter) for a in mats],
            "torch.linalg.svdvals (exact)": lambda: torch.linalg.svdvals(A),
        }
        times = {}
        for name, fn in fns.items():
            # the exact SVD and the Python loop are the slow baselines: one timed run in full mode
            slow = name.startswith("torch.linalg.svdvals") or "loop" in name
            reps = 1 if slow else repeats
            times[name] = harness.time_median(fn, repeats=reps, warmup=1, device=device)[0]

        err = ours.error_estimate.double().cpu()
        sv_err = (ours.S.double().cpu() - exact[:, :rank]).abs().amax(dim=-1)
        accuracy = {
            "gradience randomized_svd (batched)": _rel_err(ours.S, exact, rank),
            "gradience randomized_svd (list)": _rel_err(
                torch.stack([r.S for r in ours_list]), exact, rank),
            "torch.svd_lowrank (batched)": _rel_err(s_lr, exact, rank),
            "torch.svd_lowrank (per-matrix loop)": _rel_err(s_loop, exact, rank),
            "torch.linalg.svdvals (exact)": _rel_err(torch.linalg.svdvals(A), exact, rank),
        }
        lowrank_t = times["torch.svd_lowrank (batched)"]
        svdvals_t = times["torch.linalg.svdvals (exact)"]
        for name, t in times.items():
            row = {**base, "name": name, "median_s": t,
                   "time_vs_svd_lowrank": t / lowrank_t, "time_vs_svdvals": t / svdvals_t,
                   "max_rel_err_top": accuracy[name][0], "mean_rel_err_top": accuracy[name][1]}
            if name.startswith("gradience randomized_svd (batched)"):
                row["estimate_over_sigma_k1"] = statistics.median(
                    (err / exact[:, rank]).tolist())
                row["frac_within_estimate"] = float((sv_err <= err).double().mean())
            rows.append(row)
    return rows


COLUMNS = [("case", "case", ""), ("name", "tool", ""), ("median_s", "median s", ".4f"),
           ("time_vs_svd_lowrank", "/ svd_lowrank", ".2f"), ("time_vs_svdvals", "/ svdvals", ".3f"),
           ("max_rel_err_top", "max rel err top-r", ".2e"),
           ("mean_rel_err_top", "mean rel err", ".2e"),
           ("estimate_over_sigma_k1", "est / s_(r+1)", ".1f"),
           ("frac_within_estimate", "within est", ".2f")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="also write JSON bench/results/NAME.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = svd_rows(quick=args.quick, device=args.device)
    print(f"randomized SVD ({torch.get_num_threads()} threads, {args.device})")
    print(harness.format_table(rows, COLUMNS))
    if args.out:
        path = harness.write_json(args.out, {"machine": harness.machine_info(args.device),
                                             "quick": args.quick, "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

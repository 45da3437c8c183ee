"""Rows of the curvature benchmark for the estimators' overhead (composed into
bench/bench_curvature.py).

For each model and estimator (Hutchinson, Hutch++, XTrace on the GGN at a fixed matvec
budget; on the Hessian Lanczos top-5 and stochastic Lanczos quadrature, each with full and with
partial reorthogonalization), the estimator's wall time against
the time of the products it asked for, measured two ways:
- ``overhead_pct``: wall / (sum over its products of the median time of one ``op.matmat`` at
  that product's batch size, measured separately right after each run) - 1. This is the
  issue's "estimator time vs (matvecs x single-matvec time)", with the single-matvec time taken
  at the batch size the estimator used, so a batched estimator is not credited (or charged)
  for the batching itself;
- ``outside_pct``: time outside the products / time inside them, from timing every product
  during the run (``MatmatTimer``): what the estimator's own work (probe generation,
  orthogonalization, QR, small eigenproblems) costs. The goal is scored on this one: it is the
  issue's "overhead beyond the matvecs it used" with the products timed where they ran,
  while ``overhead_pct``'s baseline, timed apart (as many calls per size as the run made, up
  to 32), moves by 10-30 points between runs.
Each repeat (3) pairs a run with its own baseline measurement; ``outside_pct`` is the median
over repeats, ``wall_s`` / ``matvec_s`` / ``overhead_pct`` the repeat of median ratio, and the
``*_range`` fields the spread. (Power iteration's time and matvecs are in the eigen rows.)
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curvature_matvec_rows import (MatmatTimer, hessian_kind, make_operator,  # noqa: E402
                                   matmat_time, problem, settle)


def estimators(budget: int, quick: bool):
    """(label, operator kind, function of the operator) for every estimator."""
    from gradience_kernels import curvature_eigen as ce
    from gradience_kernels import curvature_trace as ct

    out = [(f"{name} (budget {budget})", "ggn",
            lambda op, fn=getattr(ct, name): fn(op, max_matvecs=budget, seed=0))
           for name in ("hutchinson", "hutchpp", "xtrace")]
    slq = "slq_density (2 x 16)" if quick else "slq_density (4 probes x 32 steps)"
    for reorth in ce.REORTH_METHODS:
        tag = "" if reorth == "full" else ", partial reorth"
        out += [
            (f"lanczos top-5{tag}", "hessian",
             lambda op, r=reorth: ce.lanczos(op, k=5, seed=0, reorth=r)),
            (slq[:-1] + tag + ")" if tag else slq, "hessian",
             lambda op, r=reorth: ce.slq_density(op, n_probes=2 if quick else 4,
                                                 steps=16 if quick else 32, seed=0, reorth=r)),
        ]
    return out


def overhead_rows(models=("mlp", "cnn", "transformer"), quick: bool = False,
                  budget: int | None = None, repeats: int | None = None) -> list[dict]:
    budget = budget or (24 if quick else 96)
    repeats = repeats or (1 if quick else 3)
    ests = estimators(budget, quick)
    rows = []
    for name in models:
        model, loss_fn, batch, facts = problem(name, quick)
        ops = {}
        for label, kind, run in ests:
            if kind == "hessian":
                kind = hessian_kind(quick)
            op = ops.setdefault(kind, make_operator(kind, model, loss_fn, batch))
            # Warm-up: build the operator and run products of the sizes estimators use until
            # 'auto' has chosen its path for each, so first-call costs and trials of slower
            # paths are not counted as overhead.
            settle(op, (1, 2, 4, 6, 16))  # 4: SLQ's batches of probes
            walls, expected, inside, matvecs = [], [], [], None
            for _ in range(repeats):
                op.reset_count()
                with MatmatTimer(op) as timer, warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t0 = time.perf_counter()
                    result = run(op)
                    wall = time.perf_counter() - t0
                matvecs = op.matvecs
                sizes = Counter(b for b, _ in timer.calls)
                # As many calls as the run made at each size (up to 32): 3 calls had left
                # baselines of one operator 18% apart between rows.
                per_call = {b: matmat_time(op, b, repeats=1 if quick else max(3, min(n, 32)))
                            for b, n in sizes.items()}
                walls.append(wall)
                expected.append(sum(n * per_call[b] for b, n in sizes.items()))
                inside.append(timer.seconds)
            ratios = [w / e for w, e in zip(walls, expected)]
            outside = [(w - i) / i for w, i in zip(walls, inside)]
            # wall_s and matvec_s from the repeat whose ratio is the median, so that the row
            # agrees with itself (medians taken apart did not: 18% vs 9.8%)
            mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
            rows.append({
                **facts, "estimator": label, "operator": kind, "matvecs": matvecs,
                "counted_vectors": timer.vectors, "batch_sizes": dict(sorted(sizes.items())),
                # Lanczos / SLQ steps that read the whole basis (None for trace estimators).
                "full_reorths": getattr(result, "full_reorthogonalizations", None),
                "wall_s": walls[mid],
                "matvec_s": expected[mid],
                "overhead_pct": 100 * (ratios[mid] - 1),
                "overhead_pct_range": [100 * (min(ratios) - 1), 100 * (max(ratios) - 1)],
                "outside_pct": 100 * statistics.median(outside),
                "outside_pct_range": [100 * min(outside), 100 * max(outside)],
            })
    return rows


COLUMNS = [("model", "model", ""), ("estimator", "estimator", ""), ("operator", "op", ""),
           ("matvecs", "matvecs", ""), ("batch_sizes", "product sizes", ""),
           ("full_reorths", "full reorth steps", ""),
           ("wall_s", "wall s", ".3f"), ("matvec_s", "matvecs x t(b) s", ".3f"),
           ("overhead_pct", "overhead %", ".1f"), ("outside_pct", "outside products %", ".1f")]

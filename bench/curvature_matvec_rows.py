"""Rows of the curvature benchmark for the operators' products (composed into
bench/bench_curvature.py), and the shared helpers of its other row sets.

matvec rows: for each model and operator (Hessian with method 'auto', whose products choose
their path online, per batch size, settled here before the clock; the Hessian by the other
method; the Hessian by forward-over-reverse with ``linearize=True``, which traces the jvp once
and then runs only its tangent part; GGN; empirical Fisher), the time per vector of one batched
product ``op.matmat(V)`` on b probe vectors (torch.func.vmap inside the operator) against b
single ``op.matvec(v)`` calls in a Python loop, and the largest difference between the two
results (relative to the largest entry): the speed-up is only worth something when the numbers
are the same. 9 interleaved rounds (one batched and one looped call each); ``speedup`` is the
median of the per-round ratios, with their quartiles (``speedup_ratio_of_medians`` beside it).
The empirical Fisher's batched product is one GEMM over the stored per-sample gradients, not a
vmap: its row is reported but not scored in the vmapped-matvec goal. The linearized row also times auto's loop in the same interleaved repeats
(``vs_auto_looped``: what a user who opts in gains per vector over the default's loop) and
reports the trace's cost (``build_s``, the first product) and the number of vectors after
which it has paid for itself (``break_even_vectors``).

Helpers used by the other row sets: ``problem`` (a toy model's operator set-up),
``probes`` (Rademacher probe batches), ``MatmatTimer`` (records every product an estimator
asks for: its batch size and wall time), ``matmat_time`` (median time of one product at a
batch size).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from gradience_kernels import curvature_kernels as ck  # noqa: E402
from gradience_kernels import curvature_operators as co  # noqa: E402
from gradience_kernels.toy_models import count_parameters, make_problem  # noqa: E402

#: the HVP methods of curvature_operators.hessian besides 'auto' (names of its `method`).
HESSIAN_METHODS = tuple(m for m in co.HESSIAN_METHODS if m != "auto")


def problem(name: str, quick: bool, seed: int = 0):
    """(model, loss_fn, batch, facts) of the toy model `name`: the TINY config in quick mode,
    the BENCH config otherwise; float32 on CPU."""
    size = "tiny" if quick else "bench"
    model, loss_fn, batch = make_problem(name, size, seed=seed)
    facts = {"model": name, "size": size, "parameters": count_parameters(model),
             "batch": int(batch[0].shape[0])}
    return model, loss_fn, batch, facts


def make_operator(kind: str, model, loss_fn, batch):
    """kind: 'hessian' (method 'auto'), 'hessian:<method>', 'hessian:<method>+linearize',
    'ggn' or 'empirical_fisher'."""
    if kind.startswith("hessian"):
        method = kind.split(":", 1)[1] if ":" in kind else "auto"
        method, plus, _ = method.partition("+linearize")
        return co.hessian(model, loss_fn, batch, method=method, linearize=bool(plus))
    return getattr(co, kind)(model, loss_fn, batch)


def hessian_kind(quick: bool) -> str:
    """The Hessian the estimator rows use: 'auto' (the default a user gets); double backward
    in quick mode, which skips building forward-over-reverse and auto's trials of both."""
    return "hessian:double_backward" if quick else "hessian"


def probes(op, b: int, seed: int = 0) -> list[torch.Tensor]:
    return ck.rademacher(op.shapes, b, seed, dtype=op.dtype, device=op.device)


def settle(op, sizes, calls: int = 12) -> None:
    """Products at each batch size in `sizes` until the Hessian's 'auto' has chosen its path
    for it (its first products at a size are trials of the candidate paths), so that a timed
    run sees the chosen paths only; one product per size for other operators (first-call
    costs)."""
    for b in sizes:
        for _ in range(calls):
            op.matmat(probes(op, b))
            if getattr(op, "method", None) != "auto" or b in op.choices:
                break


def matmat_time(op, b: int, repeats: int = 3, seed: int = 7) -> float:
    """Median wall time (s) of one op.matmat on b Rademacher vectors (one warm-up)."""
    V = probes(op, b, seed)
    return harness.time_median(lambda: op.matmat(V), repeats=repeats, warmup=1)[0]


class MatmatTimer:
    """Context manager timing every product of an operator: wraps the instance's ``_matmat``
    (which both matvec and matmat call) and records (batch size, seconds) per call."""

    def __init__(self, op):
        self.op = op
        self.calls: list[tuple[int, float]] = []

    def __enter__(self):
        inner = self.op._matmat

        def timed(V):
            t0 = time.perf_counter()
            out = inner(V)
            self.calls.append((int(V[0].shape[0]), time.perf_counter() - t0))
            return out

        self.op._matmat = timed
        return self

    def __exit__(self, *exc):
        del self.op._matmat  # back to the class's method
        return False

    @property
    def vectors(self) -> int:
        return sum(b for b, _ in self.calls)

    @property
    def seconds(self) -> float:
        return sum(t for _, t in self.calls)


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    den = max(float(x.abs().max()) for x in a)
    return num / den if den > 0 else num


def matvec_rows(models=("mlp", "cnn", "transformer"), quick: bool = False,
                b: int | None = None, repeats: int | None = None) -> list[dict]:
    """One row per (model, operator): per-vector ms batched vs looped and their ratio."""
    b = b or (8 if quick else 16)
    repeats = repeats or (2 if quick else 9)
    rows = []
    for name in models:
        model, loss_fn, batch, facts = problem(name, quick)
        # 'auto' (what a user gets) and the method it did not choose (the chosen one is the
        # 'auto' row); quick mode: double backward only (auto builds and times both methods).
        kinds = [hessian_kind(quick)] + ([] if quick else [
            "hessian:other", "hessian:forward_over_reverse+linearize"])
        kinds += ["ggn", "empirical_fisher"]
        chosen, auto_looped = None, None
        for kind in kinds:
            if kind == "hessian:other":
                kind = "hessian:" + next(m for m in HESSIAN_METHODS if m != chosen)
            op = make_operator(kind, model, loss_fn, batch)
            V = probes(op, b)
            singles = [[t[i] for t in V] for i in range(b)]

            def batched(op=op, V=V):
                return op.matmat(V)

            def looped(op=op, singles=singles):
                return [op.matvec(v) for v in singles]

            t0 = time.perf_counter()
            op.matvec(singles[0])  # the first product builds the operator (and the trace)
            build_s = time.perf_counter() - t0
            settle(op, (1, b))  # 'auto': its trials are over before the clock starts
            out_b, out_l = batched(), looped()  # warm-up, and the agreement check
            diff = _rel_diff(out_b, [torch.stack([o[j] for o in out_l]) for j in
                                     range(len(op.shapes))])
            # interleaved repeats: the noise of a shared machine falls on both sides
            fns = {"batched": batched, "looped": looped}
            linearized = kind.endswith("+linearize")
            if linearized and auto_looped is not None:
                fns["auto_looped"] = auto_looped
            rounds = harness.time_interleaved_rounds(fns, repeats)
            med = {k: statistics.median(v) for k, v in rounds.items()}
            mb, ml = med["batched"] / b, med["looped"] / b
            # the speedup as the median of ratios paired within a round (both sides under the
            # same load), with its quartiles: verdicts near 1.2 sit inside run-to-run noise
            paired = sorted(lo / ba for lo, ba in zip(rounds["looped"], rounds["batched"]))
            q1, q3 = (paired[(len(paired) - 1) // 4], paired[(3 * (len(paired) - 1) + 3) // 4])
            auto = kind == "hessian"
            if auto:  # the other row: the method auto's batches do not use
                chosen = op.choices[b] if op.choices[b] != "loop" else op.single_method
                auto_looped = looped
            extra = {}
            if linearized:
                extra = {"linearized": op.linearized, "build_s": build_s}
                if "auto_looped" in med:
                    ma = med["auto_looped"] / b
                    extra.update({"auto_looped_ms_per_vec": 1e3 * ma, "vs_auto_looped": ma / mb,
                                  "break_even_vectors": (build_s / (ma - mb) if ma > mb
                                                         else None)})
            row = {**facts, "operator": kind,
                   "hvp_method": (f"{op.single_method} / {op.choices[b]}" if auto
                                  else getattr(op, "method", None)),
                   "auto_timings_ms": ({n: {k: 1e3 * v for k, v in op.timings[n].items()}
                                        for n in (1, b)} if auto else None),
                   "vectors": b, "batched_ms_per_vec": 1e3 * mb, "looped_ms_per_vec": 1e3 * ml,
                   "speedup": statistics.median(paired), "speedup_ratio_of_medians": ml / mb,
                   "speedup_quartiles": [q1, q3], "rounds": repeats,
                   "max_rel_diff": diff, **extra}
            rows.append(row)
    return rows


COLUMNS = [("model", "model", ""), ("parameters", "P", ""), ("operator", "operator", ""),
           ("hvp_method", "HVP method", ""), ("vectors", "b", ""),
           ("batched_ms_per_vec", "batched ms/vec", ".2f"),
           ("looped_ms_per_vec", "looped ms/vec", ".2f"), ("speedup", "looped/batched", ".2f"),
           ("vs_auto_looped", "auto loop/batched", ".2f"), ("build_s", "build s", ".2f"),
           ("max_rel_diff", "max rel diff", ".1e")]

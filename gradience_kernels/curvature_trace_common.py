"""What the trace estimators share: the result type, argument checks, the running mean and
standard error per block, the stopping rule, and the constants (probe kinds, the minimum probe
count before an rtol stop)."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

from .curvature_operators import CurvatureOperator
from .curvature_product_scale import ScaledProducts

METHODS = ("hutch++", "hutchinson", "xtrace")
XTRACE_PROBES = ("sphere", "gaussian", "rademacher")

# Default minimum number of probes (Hutchinson; Hutch++'s residual probes; XTrace's probes)
# before the rtol stop may fire. Why 32: the stop compares the sample standard error with
# rtol * |estimate|, so the SE must itself be accurate. For m samples the relative standard
# deviation of the sample SD is ~ sqrt((2 + kappa (m-1)/m) / (4 (m-1))) (kappa: the excess
# kurtosis of one quadratic form), 0.13 at m = 32 for normal forms; and a 3-SE interval then
# misses with probability P(|t_31| > 3) = 0.0053 instead of 0.0027 (m = 2, today's running-mean
# heuristics: P(|t_1| > 3) = 0.20). 32 is also two default batches. With fewer probes the
# optional stop selects runs whose SE happens to be small (undercoverage).
MIN_PROBES = 32

_F64 = torch.float64

# --------------------------------------------------------------------------------- result
@dataclass
class TraceEstimate:
    """Result of a trace estimator.

    trace, stderr: the estimate of tr(A) and its standard error; matvecs: products A v used
    (counted here, checked against ``op.matvecs``); probes: random probe vectors drawn (Hutch++:
    sketch + residual probes); converged: the rtol stop was reached (False with rtol=None);
    block_traces / block_stderr: per block of ``op.blocks`` (estimates of tr(A_bb); their sum
    is ``trace``); history: (matvecs, estimate, stderr) after each batch that gave an estimate;
    sketch_size: Hutch++'s sketch probes, XTrace's basis columns (0 for Hutchinson); rank: the
    columns of the orthonormal basis Q of A S (Hutch++, XTrace)."""

    trace: float
    stderr: float
    matvecs: int
    probes: int
    method: str
    converged: bool
    rtol: float | None
    max_matvecs: int
    block_names: list[str]
    block_traces: list[float]
    block_stderr: list[float]
    history: list[tuple[int, float, float]] = field(default_factory=list)
    seed: int = 0
    sketch_size: int = 0
    rank: int = 0

    @property
    def relative_stderr(self) -> float:
        """stderr / |trace| (inf for a zero estimate with a nonzero standard error)."""
        if self.trace == 0:
            return 0.0 if self.stderr == 0 else math.inf
        return self.stderr / abs(self.trace)

    def summary(self) -> str:
        stop = ("converged" if self.converged else
                "budget spent" if self.rtol is not None else "fixed budget")
        rt = "" if self.rtol is None else f", rtol={self.rtol:g}"
        head = (f"{self.method} trace = {self.trace:.6g} +- {self.stderr:.3g} (1 SE, "
                f"rel {self.relative_stderr:.2e}); {self.matvecs}/{self.max_matvecs} matvecs, "
                f"{self.probes} probes{rt}, {stop}, seed={self.seed}")
        if self.method != "hutchinson":
            head += f", sketch={self.sketch_size}, rank={self.rank}"
        width = max((len(n) for n in self.block_names), default=5)
        lines = [head] + [f"  {n:<{width}}  {t:.6g} +- {s:.3g}"
                          for n, t, s in zip(self.block_names, self.block_traces,
                                             self.block_stderr)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- validation
def _check_int(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return value


def _check_args(op, rtol, max_matvecs, batch_size, seed, min_probes, minimum: int,
                method: str, why: str):
    """All checks before any matvec; returns (rtol, max_matvecs, batch_size, seed, min_probes)."""
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op: expected a CurvatureOperator (curvature_operators.hessian/ggn/"
                        f"empirical_fisher or MatrixOperator), got {type(op).__name__}")
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
            raise TypeError(f"rtol: expected a positive float or None, got {rtol!r}")
        rtol = float(rtol)
        if not (math.isfinite(rtol) and rtol > 0):
            raise ValueError(f"rtol: expected a positive finite float or None, got {rtol!r}")
    max_matvecs = _check_int(max_matvecs, "max_matvecs", 1)
    if max_matvecs < minimum:
        raise ValueError(f"max_matvecs: {method} needs at least {minimum} matvecs ({why}), "
                         f"got {max_matvecs}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)  # as lanczos and slq_density; streams use seed mod 2^32
    min_probes = _check_int(min_probes, "min_probes", 2)
    if op.numel < 1:
        raise ValueError(f"op: the operator has no parameters (numel = {op.numel})")
    # Model operators build lazily at their first product (graphs, per-sample gradients):
    # build now, before the estimator's clock and probes.
    prepare = getattr(op, "prepare", None)
    if callable(prepare):
        prepare()
    return rtol, max_matvecs, batch_size, seed, min_probes


# ------------------------------------------------------------------------------- helpers
def _blocks(op) -> list[list[int]]:
    return [list(b.tensors) for b in op.blocks]


def _small(t: torch.Tensor) -> torch.Tensor:
    """A small Gram / dot result as float64 on the CPU (where the small linear algebra runs)."""
    return t.detach().to(device="cpu", dtype=_F64)


class _Running:
    """Running per-block means and sums of squared deviations of per-probe samples, plus the
    same for the per-probe totals (the blocks of one probe are correlated, so block SEs do not
    add), merged batch by batch (Chan, Golub & LeVeque 1983): O(b) per batch, no cancellation
    from raw sums of squares."""

    def __init__(self, nb: int):
        self.n = 0
        self.mean = torch.zeros(nb + 1, dtype=_F64)
        self.m2 = torch.zeros(nb + 1, dtype=_F64)

    def add(self, X: torch.Tensor) -> None:
        """X [b, n_blocks] float64: one row per probe."""
        X = torch.cat([X, X.sum(1, keepdim=True)], 1)
        nb_, b = self.n, X.shape[0]
        mean_b = X.mean(0)
        m2_b = ((X - mean_b) ** 2).sum(0)
        delta = mean_b - self.mean
        tot = nb_ + b
        self.mean = self.mean + delta * (b / tot)
        self.m2 = self.m2 + m2_b + delta * delta * (nb_ * b / tot)
        self.n = tot

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Per-block means and SEs, the total (sum of the block means) and its SE."""
        means = self.mean[:-1]
        if self.n < 2:
            return means, torch.full_like(means, math.nan), float(means.sum()), math.nan
        se = (self.m2 / (self.n - 1)).sqrt() / math.sqrt(self.n)
        return means, se[:-1], float(means.sum()), float(se[-1])


def _stop(rtol, m: int, min_probes: int, est: float, se: float) -> bool:
    return rtol is not None and m >= min_probes and se <= rtol * abs(est)


def _result(op, method, est, se, means, ses, used, probes, converged, rtol, max_matvecs,
            history, seed, start, sketch_size=0, rank=0) -> TraceEstimate:
    counted = op.matvecs - start
    if isinstance(op, ScaledProducts) and op.factor != 1.0:  # back to A's scale, exactly
        c = op.factor
        est, se, means, ses = est / c, se / c, means / c, ses / c
        history = [(m, e / c, s / c) for m, e, s in history]
    if counted != used:
        warnings.warn(f"{method}: the operator counted {counted} matvecs, the estimator used "
                      f"{used} (CurvatureOperator.matvec / matmat count each vector once: does a "
                      f"subclass change op.matvecs in _matmat by other than the batch size, or "
                      f"override matmat without counting?)",
                      RuntimeWarning, stacklevel=3)
    return TraceEstimate(
        trace=float(est), stderr=float(se), matvecs=used, probes=probes, method=method,
        converged=converged, rtol=rtol, max_matvecs=max_matvecs,
        block_names=[b.name for b in op.blocks], block_traces=[float(v) for v in means],
        block_stderr=[float(v) for v in ses], history=history, seed=seed,
        sketch_size=sketch_size, rank=rank)

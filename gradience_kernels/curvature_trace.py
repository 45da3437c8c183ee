"""Streaming stochastic trace estimation of a curvature operator: Hutchinson, Hutch++, XTrace.

Every estimator draws its random probes in batches (one ``op.matmat`` per batch, vmapped by the
model operators), keeps a running estimate and standard error, and stops as soon as the
standard error is at most ``rtol * |estimate|`` (after ``min_probes`` probes, so that the
standard error itself is trustworthy) or before the matvec budget ``max_matvecs`` would be
exceeded (it never is). ``rtol=None`` spends the budget. Per-block traces tr(A_bb) come from the
same probes; the full trace is the sum of the block traces.

Probes are counter-based (curvature_kernels.rademacher / gaussian): probe j of stream ``seed`` is
the same whatever the batch split, so results do not depend on ``batch_size`` (up to rounding)
and a dense reference can regenerate them (python_tests/reference.py).

P-sized work outside the matvecs goes through curvature_kernels only (probe generation,
per-block Gram matrices / dots, Gram-Schmidt against a basis, basis combinations), tensor by
tensor: nothing is flattened into one P-vector. Everything else is small float64 matrices.

Cost beyond the matvecs, per probe, with P parameters and a basis of r columns (Hutch++, XTrace):
Hutchinson O(P); Hutch++ O(r P) (three r x b Gram matrices per residual batch); XTrace O(m P)
with m probes so far (Gram-Schmidt of the new columns against the basis and the new rows and
columns of the per-block Gram matrices). Memory: Hutchinson one batch; Hutch++ 2 r vectors
(Q and A Q); XTrace 3 m vectors (the probes, Q and A Q).

References: Hutchinson (1989), Commun. Stat. Simul. Comput. 18(3); Meyer, Musco, Musco, Woodruff
(2021), "Hutch++: optimal stochastic trace estimation", SOSA; Persson, Cortinovis, Kressner
(2022), "Improved variants of the Hutch++ algorithm for trace estimation", SIMAX 43(3);
Epperly, Tropp, Webber (2024), "XTrace: making the most of every sample in stochastic trace
estimation", SIMAX 45(1).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .curvature_kernels import (block_dots, block_gram, combine, gaussian, orthogonalize_,
                                rademacher)
from .curvature_operators import CurvatureOperator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "xtrace", "estimate_trace", "METHODS"]

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
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    min_probes = _check_int(min_probes, "min_probes", 2)
    if op.numel < 1:
        raise ValueError(f"op: the operator has no parameters (numel = {op.numel})")
    # Model operators build lazily at their first product (graphs, per-sample gradients):
    # build now, before the estimator's clock and probes.
    prepare = getattr(op, "prepare", None)
    if callable(prepare):
        prepare()
    return rtol, max_matvecs, batch_size, int(seed), min_probes


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
    if counted != used:
        warnings.warn(f"{method}: the operator counted {counted} matvecs, the estimator used "
                      f"{used} (does its _matmat add V[0].shape[0] to op.matvecs?)",
                      RuntimeWarning, stacklevel=3)
    return TraceEstimate(
        trace=float(est), stderr=float(se), matvecs=used, probes=probes, method=method,
        converged=converged, rtol=rtol, max_matvecs=max_matvecs,
        block_names=[b.name for b in op.blocks], block_traces=[float(v) for v in means],
        block_stderr=[float(v) for v in ses], history=history, seed=seed,
        sketch_size=sketch_size, rank=rank)


class _Store:
    """Columns (lists of parameter-shaped tensors) appended batch by batch and kept as one chunk
    [r_c, *shape] per batch: no budget-sized buffer up front and no copying when it grows (a
    doubling buffer measured 2.5 s of copies and first-touch page faults for 2 x 85 columns of
    1.5M parameters). Products with the stored columns go chunk by chunk through
    curvature_kernels.block_gram / combine; ``upto`` limits them to the first chunks."""

    def __init__(self):
        self.chunks: list[list[torch.Tensor]] = []
        self.sizes: list[int] = []

    @property
    def count(self) -> int:
        return sum(self.sizes)

    def append(self, cols: Sequence[torch.Tensor]) -> None:
        self.chunks.append([c.contiguous() for c in cols])
        self.sizes.append(cols[0].shape[0])

    def left(self, X, blocks, upto: int | None = None) -> torch.Tensor:
        """Per block S_b^T X_b: [n_blocks, count, c] (float64, CPU)."""
        parts = [_small(block_gram(ch, X, blocks)) for ch in self.chunks[:upto]]
        return torch.cat(parts, 1) if parts else torch.zeros(len(blocks), 0, X[0].shape[0],
                                                             dtype=_F64)

    def right(self, X, blocks, upto: int | None = None) -> torch.Tensor:
        """Per block X_b^T S_b: [n_blocks, a, count] (float64, CPU)."""
        parts = [_small(block_gram(X, ch, blocks)) for ch in self.chunks[:upto]]
        return torch.cat(parts, 2) if parts else torch.zeros(len(blocks), X[0].shape[0], 0,
                                                             dtype=_F64)

    def subtract_from(self, X: list[torch.Tensor], coeffs: torch.Tensor) -> None:
        """X -= S coeffs in place (X: list [b, *shape], contiguous: callers copy strided
        products first; coeffs [count, b]): one addmm_ per chunk and tensor, so no P x b
        temporary and no separate subtraction sweep (combine followed by a subtraction writes
        the temporary, then reads it and X)."""
        row = 0
        for ch, n in zip(self.chunks, self.sizes):
            for x, s in zip(X, ch):
                c = coeffs[row:row + n].to(dtype=x.dtype, device=x.device)
                x.view(x.shape[0], -1).addmm_(c.T, s.view(n, -1), alpha=-1)
            row += n

    def combine(self, coeffs: torch.Tensor) -> list[torch.Tensor]:
        """sum_i coeffs[i, :] s_i: list [r, *shape] for coeffs [count, r]."""
        out, row = None, 0
        for ch, n in zip(self.chunks, self.sizes):
            c = coeffs[row:row + n].to(device=ch[0].device)
            part = combine(ch, n, c)
            if out is None:
                out = part
            else:
                for o, t in zip(out, part):
                    o.add_(t)
            row += n
        return out


def _norm2(w: Sequence[torch.Tensor]) -> float:
    acc = _F64 if w[0].dtype == _F64 else torch.float32
    return float(sum(torch.dot(t.reshape(-1).to(acc), t.reshape(-1).to(acc)) for t in w))


def _gram(X, Y, blocks) -> torch.Tensor:
    """block_gram that allows empty batches (the kernels reject 0-row reshapes)."""
    a, c = X[0].shape[0], Y[0].shape[0]
    if a == 0 or c == 0:
        return torch.zeros(len(blocks), a, c, dtype=_F64)
    return _small(block_gram(X, Y, blocks))


def _pivot_order(G: torch.Tensor) -> list[int]:
    """Columns in the order of greedy pivoted Cholesky on the Gram matrix G (float64): each
    next column has the largest residual norm against the ones before, as in QR with column
    pivoting. Taking a column with a small residual early makes its unit vector carry the
    batch's rounding (~ u ||X||) divided by that residual, which then passes the drop test of
    the columns after it as a spurious direction (measured: one extra basis column on a rank-12
    operator in float64). The order is exact while residuals are above ~sqrt(u) ||X||; below,
    it is only a heuristic, and Gram-Schmidt's own residuals decide what is dropped."""
    d = G.diagonal().clone()
    L = G.clone()
    order: list[int] = []
    left = list(range(G.shape[0]))
    while left:
        j = max(left, key=lambda i: float(d[i]))
        order.append(j)
        left.remove(j)
        if not float(d[j]) > 0:
            return order + left
        col = L[:, j] / math.sqrt(float(d[j]))
        L -= torch.outer(col, col)
        d = L.diagonal().clone()
    return order


def _orthonormal_batch(X: list[torch.Tensor], ref: torch.Tensor, drop: float,
                       everything: list[list[int]]
                       ) -> tuple[list[torch.Tensor] | None, tuple[float, float] | None]:
    """An orthonormal basis (list [r, *shape], r <= b; None if r = 0) of the batch X (list
    [b, *shape], already projected against the old basis), dropping directions whose size
    relative to ref (per column) is <= drop; and, when the fast path was taken, the extreme
    eigenvalues (lambda_min, lambda_max) of X^T X (None after the column-wise path).

    Fast path, one Gram matrix G = X^T X and one combination X V L^-1/2 (G = V L V^T): taken
    when the batch is well conditioned, u lambda_max / lambda_min <= 1e-2 (the loss of
    orthogonality of this Cholesky-QR-like step is ~ u cond(X)^2, u the unit roundoff; the
    caller's second pass repairs 1e-2) and sqrt(lambda_min) > drop max(ref) (the column-wise
    path would drop nothing: column j's residual there is ||X v|| with v_j = 1, at least
    sqrt(lambda_min)). Otherwise column by column, in pivoted order (_pivot_order): classical
    Gram-Schmidt twice against the accepted columns (curvature_kernels.orthogonalize_),
    normalized, dropped when its norm is <= drop ref_j: accurate to O(u) whatever the
    conditioning (rank-deficient batches, exactly low-rank A), at b calls instead of 2. The
    accepted columns come out in that order (they span the same space as in any order)."""
    b = X[0].shape[0]
    u = torch.finfo(X[0].dtype).eps
    G = _sym(_small(block_gram(X, X, everything)[0]))
    lam, V = torch.linalg.eigh(G)
    lmin, lmax = float(lam[0]), float(lam[-1])
    if lmin > 0 and u * lmax <= 1e-2 * lmin and math.sqrt(lmin) > drop * float(ref.max()):
        T = (V / lam.sqrt()).to(device=X[0].device)
        return combine(X, b, T), (lmin, lmax)
    buf = [torch.empty_like(x) for x in X]
    cnt = 0
    for j in _pivot_order(G):
        w = [x[j].clone() for x in X]
        if cnt:
            orthogonalize_(w, buf, cnt)
        nrm = math.sqrt(_norm2(w))
        if nrm > drop * float(ref[j]) and nrm > 0:
            for t, v in zip(buf, w):
                t[cnt].copy_(v / nrm)
            cnt += 1
    return ([t[:cnt] for t in buf] if cnt else None), None


# One BCGS pass is kept when its loss of orthogonality, ~ u (cond(X)^2 + ||Y||_F / sigma_min(X))
# (_extend_basis), is at most ~2 _ONE_PASS u: then the second pass would change the columns by
# rounding only. Measured on the bench models' GGN sketches: the MLP's batches give cond^2 4-7
# and ratios ~7 (one pass), the CNN's and transformer's cond^2 up to 1e3 and ratios 54-84 (two).
_ONE_PASS = 16.0


def _extend_basis(Q: _Store, Y: list[torch.Tensor], everything: list[list[int]]):
    """Orthonormalize the batch Y against the basis Q and within itself: returns the new
    orthonormal columns (list [r_new, *shape], r_new <= b; None when none), C = Q^T Y for the
    old basis [k, b] (float64), and X = (I - Q Q^T) Y (list [b, *shape]).

    Block classical Gram-Schmidt, reorthogonalized (BCGS2, Barlow & Smoktunowicz 2013): pass 1
    projects Y against Q and orthonormalizes the batch within itself (_orthonormal_batch);
    pass 2 repeats both on the resulting unit columns, which restores orthogonality to O(u)
    when columns lost digits in pass 1 (a column of relative size rho after the projection
    is orthogonal to Q only to ~u / rho). Pass 1 drops directions below 128 u of the column's
    own norm (numerically in the span: an exactly low-rank A stops the basis at rank A);
    pass 2 drops what lost more than half its norm (pass-1 noise).

    Pass 2 is skipped when pass 1 provably lost little: the projection's rounding leaves
    components ~ u ||y_j|| along Q, which the normalization X V L^-1/2 scales by at most
    1 / sigma_min(X), so U^T Q ~ u ||Y||_F / sigma_min(X); the within-batch step loses
    ~ u cond(X)^2. When both factors are <= _ONE_PASS (the first only when there is no old
    basis: well-conditioned batches of a flat spectrum, where deflation removes little), pass 2
    would only repeat the work: for a sketch of m columns it costs ~ m^2 P / b multiply-adds of
    Gram products and combinations (test_curvature_trace checks the basis against Q^T Q = I
    either way)."""
    k = Q.count
    X = [y.clone(memory_format=torch.contiguous_format) for y in Y]
    C = torch.zeros(k, Y[0].shape[0], dtype=_F64)
    if k:
        C = Q.left(X, everything)[0]
        Q.subtract_from(X, C)
    norm0 = _small(block_dots(Y, Y, everything)[0]).sqrt()
    U, lams = _orthonormal_batch(X, norm0, 128 * torch.finfo(Y[0].dtype).eps, everything)
    if U is None:
        return None, C, X
    if lams is not None:
        lmin, lmax = lams
        if lmax <= _ONE_PASS * lmin and (k == 0 or
                                         float(norm0 @ norm0) <= _ONE_PASS ** 2 * lmin):
            return [u.contiguous() for u in U], C, X
    if k:
        U = [u.clone() for u in U]
        Q.subtract_from(U, Q.left(U, everything)[0])
    U, _ = _orthonormal_batch(U, torch.ones(U[0].shape[0], dtype=_F64), 0.5, everything)
    if U is None:
        return None, C, X
    return [u.contiguous() for u in U], C, X


def _append_gram(G: torch.Tensor, right: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """[[G, right], [bottom]] for per-block matrices G [nb, a, c], right [nb, a, c2],
    bottom [nb, a2, c + c2]."""
    return torch.cat([torch.cat([G, right], 2), bottom], 1)


def _sym(H: torch.Tensor) -> torch.Tensor:
    return (H + H.transpose(-1, -2)) / 2


# ----------------------------------------------------------------------------- Hutchinson
def hutchinson(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
               batch_size: int = 16, seed: int = 0,
               min_probes: int = MIN_PROBES) -> TraceEstimate:
    """Hutchinson's estimator tr(A) ~ (1/m) sum_j z_j^T A z_j with Rademacher probes z_j
    (Hutchinson 1989), streamed in batches of ``batch_size`` probes (one ``op.matmat`` each).

    Per block b: tr(A_bb) ~ (1/m) sum_j <z_j, (A z_j)>_b (curvature_kernels.block_dots); the
    full estimate is the sum of the block estimates. Standard errors: sample SD / sqrt(m) of the
    per-probe values (per block, and of the per-probe totals for the full trace); for Rademacher
    probes Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2).

    Stops after a batch once m >= min_probes and stderr <= rtol |estimate|, or when the next
    batch would exceed max_matvecs (one matvec per probe; the last batch is shortened to fit).
    Probe j is probe j of curvature_kernels.rademacher's stream ``seed``."""
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, 2, "hutchinson",
        "two probes for a standard error")
    blocks = _blocks(op)
    start, used = op.matvecs, 0
    run = _Running(len(blocks))
    history: list[tuple[int, float, float]] = []
    converged = False
    while used < max_matvecs:
        b = min(batch_size, max_matvecs - used)
        Z = rademacher(op.shapes, b, seed, first=used, dtype=op.dtype, device=op.device)
        AZ = op.matmat(Z)
        used += b
        run.add(_small(block_dots(Z, AZ, blocks)).T)
        means, ses, est, se = run.stats()
        if run.n >= 2:
            history.append((used, est, se))
        if _stop(rtol, run.n, min_probes, est, se):
            converged = True
            break
    return _result(op, "hutchinson", est, se, means, ses, used, used, converged, rtol,
                   max_matvecs, history, seed, start)


# -------------------------------------------------------------------------------- Hutch++
def _hutchpp_exact(GQQ: torch.Tensor, GQW: torch.Tensor) -> torch.Tensor:
    """Per block tr(P_b (Pi A + A Pi - Pi A Pi)), Pi = Q Q^T, from G^QQ_b = Q_b^T Q_b and
    G^QW_b = Q_b^T (A Q)_b: 2 tr(G^QW_b) - <G^QQ_b, H>_F with H = Q^T A Q = sum_b G^QW_b
    (tr(P_b Pi A) = tr(P_b A Pi) = sum_i <q_i, A q_i>_b; tr(P_b Pi A Pi) = tr(H G^QQ_b))."""
    if GQQ.shape[1] == 0:
        return torch.zeros(GQQ.shape[0], dtype=_F64)
    H = _sym(GQW.sum(0))
    return 2 * GQW.diagonal(dim1=1, dim2=2).sum(1) - (GQQ * H).sum((1, 2))


def _hutchpp_residual(Q: _Store, W: _Store, GQQ, GQW, Z, AZ, blocks) -> torch.Tensor:
    """Per-block residual samples <z', (I - Pi) A z'>_b, z' = (I - Pi) z, for a batch of probes
    Z with AZ = A Z: [b, n_blocks]. E = tr(P_b (I - Pi) A (I - Pi)) given Q (P_b symmetric,
    idempotent): the blocks' samples sum to z'^T A z', Hutch++'s residual term.

    From Gram matrices only (no P-sized temporaries), with c = Q^T z, A z' = A z - W c
    (W = A Q), v = Q^T A z' = Q^T A z - H c:
      <z', A z'>_b = <z, A z>_b - c.(Q^T A z)_b - c.(W^T z)_b + c^T G^QW_b c
      <z', Pi A z'>_b = (Q^T z')_b . v,  (Q^T z')_b = (Q^T z)_b - G^QQ_b c."""
    d = _small(block_dots(Z, AZ, blocks))  # [nb, b]
    k = Q.count
    if k == 0:
        return d.T
    Gz = Q.left(Z, blocks)                           # [nb, k, b] (Q^T z)_b
    Gaz = Q.left(AZ, blocks)                         # [nb, k, b] (Q^T A z)_b
    Gwz = W.left(Z, blocks)                          # [nb, k, b] (W^T z)_b
    c = Gz.sum(0)                                    # [k, b]
    H = _sym(GQW.sum(0))
    zaz = (d - torch.einsum("nkj,kj->nj", Gaz, c) - torch.einsum("nkj,kj->nj", Gwz, c)
           + torch.einsum("kj,nkl,lj->nj", c, GQW, c))
    v = Gaz.sum(0) - H @ c
    qz = Gz - GQQ @ c                                # [nb, k, b]
    return (zaz - torch.einsum("nkj,kj->nj", qz, v)).T


def hutchpp(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
            sketch_size: int | None = None, batch_size: int = 16, seed: int = 0,
            min_probes: int = MIN_PROBES) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021), streamed, with per-block traces.

    Sketch: Rademacher probes S, Q = orth(A S) (block Gram-Schmidt, batch by batch), W = A Q.
    Then tr(A) = tr(Q^T A Q) + tr((I - Pi) A (I - Pi)), Pi = Q Q^T: the first term exactly, the
    second by Hutchinson on residual Rademacher probes z' = (I - Pi) z (matvec A z only:
    A z' = A z - W Q^T z), whose sample SD / sqrt(l) is the standard error (given Q; S and the
    residual probes are independent, so the estimate is unbiased). Per block b (P_b the
    block's selector), unbiased for tr(A_bb) and summing to the total:
        tr(P_b A) = tr(P_b (Pi A + A Pi - Pi A Pi)) + tr(P_b (I - Pi) A (I - Pi)),
    the first exactly from per-block Gram matrices of Q and W, the second by
    <z', (I - Pi) A z'>_b.

    Sketch size: ``sketch_size`` probes when given; else with rtol=None the paper's split
    (max_matvecs // 3 sketch probes, as many matvecs for A Q, the rest for residual probes);
    else adaptively, in the spirit of A-Hutch++ (Persson, Cortinovis, Kressner 2022, sec. 3):
    residual probes needed for rtol are l ~ Var / (rtol tr)^2 with Var <= 2 ||A22||_F^2,
    A22 = (I - Pi) A (I - Pi), and ||A22||_F^2 = ||A||_F^2 - 2 ||A Q||_F^2 + ||Q^T A Q||_F^2,
    so adding columns to Q lowers the predicted cost by an amount known exactly from W, while a
    batch of b columns costs <= 2 b matvecs. Each sketch batch estimates, before it joins Q,
    ||(I - Pi) A||_F^2 ~ mean ||(I - Pi) A s||^2 and tr(A) ~ tr(H) + mean s^T (I - Pi) A s
    (unbiased given Q), hence ||A22||_F^2 after the batch. The sketch grows while the saving
    predicted for the next batch (the last saving times its ratio to the one before, a
    geometric decay; capped by the residual cost still to save, at an upper confidence bound
    of ||A22||_F^2) exceeds its cost 2 b, and never beyond max_matvecs // 3 probes. Decisions
    use the sketch only, never the residual probes, so the estimate stays unbiased. (A flat
    spectrum still pays one sketch batch, 2 b matvecs, that Hutchinson would not.)

    Probes: sketch probes are probes 0 .. sketch_size-1 of curvature_kernels.rademacher's stream
    ``seed``, residual probes the following ones."""
    if sketch_size is None:
        minimum, why = 4, "1 sketch probe, 1 for A Q, 2 residual probes"
    else:
        sketch_size = _check_int(sketch_size, "sketch_size", 1)
        minimum = 2 * sketch_size + 2
        why = f"sketch_size = {sketch_size} probes and as many for A Q, 2 residual probes"
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, minimum, "hutchpp", why)
    blocks = _blocks(op)
    nb = len(blocks)
    everything = [list(range(len(op.shapes)))]
    start, used, drawn = op.matvecs, 0, 0
    adaptive = rtol is not None and sketch_size is None
    k_max = sketch_size if sketch_size is not None else max(1, max_matvecs // 3)
    Q, W = _Store(), _Store()
    GQQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQW = torch.zeros(nb, 0, 0, dtype=_F64)
    w2 = 0.0              # ||A Q||_F^2
    last_gain = None      # the last batch's drop of ||A22||_F^2
    while drawn < k_max:
        b = min(batch_size, k_max - drawn)
        S = rademacher(op.shapes, b, seed, first=drawn, dtype=op.dtype, device=op.device)
        Y = op.matmat(S)
        used += b
        drawn += b
        new, _, X = _extend_basis(Q, Y, everything)
        if adaptive:
            H = _sym(GQW.sum(0))
            f_j = _small(block_dots(X, X, everything))[0]    # ||(I - Pi) A s_j||^2
            f_hat = float(f_j.mean())                         # ~ ||(I - Pi) A||_F^2
            f_se = float(f_j.std()) / math.sqrt(b) if b > 1 else f_hat
            t_hat = float(H.trace()) + float(_small(block_dots(S, X, everything)).mean())
            a_hat = f_hat + w2                                           # ||A||_F^2
            before = max(a_hat - 2 * w2 + float((H * H).sum()), 0.0)
        if new is not None:
            r = new[0].shape[0]
            Wn = op.matmat(new)
            used += r
            k = Q.count
            Q.append(new)
            W.append(Wn)
            w2 += float(_small(block_dots(Wn, Wn, everything)).sum())
            new_q = Q.right(new, blocks)                     # [nb, r, k + r]
            GQQ = _append_gram(GQQ, new_q[:, :, :k].transpose(1, 2), new_q)
            old_w = Q.left(Wn, blocks, upto=-1)              # [nb, k, r]
            GQW = _append_gram(GQW, old_w, W.right(new, blocks))
        if not adaptive:
            continue
        H = _sym(GQW.sum(0))
        after = max(a_hat - 2 * w2 + float((H * H).sum()), 0.0)
        gain = before - after
        per_unit = math.inf if t_hat == 0 else 2.0 / (rtol * t_hat) ** 2  # probes per F-norm^2
        ratio = 1.0 if not last_gain or last_gain <= 0 else min(1.0, max(gain, 0.0) / last_gain)
        last_gain = gain
        b_next = min(batch_size, k_max - drawn)
        # after = before - gain is a difference of estimates with noise ~ f_se (relative to
        # ||(I - Pi_old) A||_F^2, not to the smaller remainder): cap the saving by an upper
        # confidence bound of the remainder, so one noisy batch does not stop the growth.
        saving = min(per_unit * gain * ratio, per_unit * (after + 2 * f_se) - min_probes)
        if new is None or b_next < 1 or not saving > 2 * b_next:
            break
    exact = _hutchpp_exact(GQQ, GQW)
    sketch = drawn
    run = _Running(nb)
    history: list[tuple[int, float, float]] = []
    converged = False
    while used < max_matvecs:
        b = min(batch_size, max_matvecs - used)
        Z = rademacher(op.shapes, b, seed, first=drawn, dtype=op.dtype, device=op.device)
        AZ = op.matmat(Z)
        used += b
        drawn += b
        run.add(_hutchpp_residual(Q, W, GQQ, GQW, Z, AZ, blocks))
        rmeans, ses, _, se = run.stats()
        means = exact + rmeans
        est = float(means.sum())
        if run.n >= 2:
            history.append((used, est, se))
        if _stop(rtol, run.n, min_probes, est, se):
            converged = True
            break
    return _result(op, "hutch++", est, se, means, ses, used, drawn, converged, rtol,
                   max_matvecs, history, seed, start, sketch_size=sketch, rank=Q.count)


# --------------------------------------------------------------------------------- XTrace
def _loo_vectors(R: torch.Tensor, tau: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out directions of XTrace from R = Q^T Y [r, m] (Y = Q R): range(Y without
    column i) = Q range(R_{-i}); its orthogonal complement within range(Q) is spanned by a unit
    s_i with R^T s_i ~ e_i when column i is needed for the rank (e_i in range(R^T), leverage
    ||V^T e_i||^2 = 1 for R = U Sigma V^T), and is empty otherwise (s_i = 0: with fewer basis
    columns than probes, A's numerical rank is below m - 1 and every probe is redundant).
    s_i = (R^T)^+ e_i / ||.|| = U Sigma^-1 V^T e_i / ||.||; for square invertible R this is the
    normalized column i of R^-T of Epperly, Tropp & Webber (2024, sec. 2.1). Returns S [r, m]
    and the mask of probes with s_i != 0."""
    r, m = R.shape
    if r == 0:
        return torch.zeros(0, m, dtype=_F64), torch.zeros(m, dtype=torch.bool)
    U, sig, Vh = torch.linalg.svd(R, full_matrices=False)  # Vh [r, m] (r <= m)
    lev = (Vh * Vh).sum(0)
    X = U @ (Vh / sig[:, None])
    norms = X.norm(dim=0)
    has = (lev >= 1 - tau) & (norms > 0) & torch.isfinite(norms)
    S = torch.where(has[None, :], X / norms.clamp_min(1e-300)[None, :], torch.zeros_like(X))
    return S, has


def _xtrace_samples(R, GOQ, GOZ, GQQ, GQZ, norms2, n: int, improved: bool) -> torch.Tensor:
    """T_{i,b} [n_blocks, m]: the per-block leave-one-out Hutch++ estimates of XTrace.

    Inputs (float64): R = Q^T Y [r, m]; per block G^OQ_b = Omega_b^T Q_b [nb, m, r],
    G^OZ_b = Omega_b^T Z_b, G^QQ_b = Q_b^T Q_b, G^QZ_b = Q_b^T Z_b (Z = A Q); norms2 = ||omega||^2.
    For probe i, Pi_i = Q M Q^T with M = I - s s^T (s = s_i, _loo_vectors) projects on
    orth(Y without column i), and, with w = Q^T omega, u = M w, omega' = (I - Pi_i) omega:
      T_{i,b} = tr(P_b (Pi_i A + A Pi_i - Pi_i A Pi_i)) + c_i <omega', (I - Pi_i) A omega'>_b
      exact part = 2 (tr G^QZ_b - s^T G^QZ_b s)
                   - (tr(H G^QQ_b) - 2 s^T G^QQ_b H s + (s^T H s)(s^T G^QQ_b s)),   H = Q^T A Q,
      residual = G^OQ_b[i] . a - G^OZ_b[i] . u - u^T G^QQ_b a + u^T G^QZ_b u,
                 a = s (s^T R_i) + M H u,
    the residual using A omega = Y_i = Q R_i (so (I - Pi_i) A omega' = Q a - Z u exactly).
    c_i = 1, or for probes on the sphere ||omega||^2 = n ("improved" XTrace, sec. 2.2 of the
    paper) c_i = (n - rank Pi_i) / ||omega'||^2, ||omega'||^2 = ||omega||^2 - w^T M w: omega'
    rescaled to the radius sqrt(dim) of the complement is uniform on that sphere given the
    other probes, so each T_{i,b} stays unbiased for tr(A_bb). Summed over blocks (sum_b
    G^QQ_b = I) this is the paper's estimate T_i (its code xtrace_helper.m, term by term)."""
    m = R.shape[1]
    r = R.shape[0]
    nb = GOQ.shape[0]
    S, has = _loo_vectors(R)
    if r == 0:
        exact = torch.zeros(nb, m, dtype=_F64)
        return exact  # A Omega = 0 (Y in range(Q) = {0}): every residual form vanishes
    H = _sym(GQZ.sum(0))
    Wm = GOQ.sum(0).T                                   # Q^T Omega [r, m]
    sw = (S * Wm).sum(0)                                # s_i^T w_i [m]
    Um = Wm - S * sw                                    # u_i = M w_i
    HS = H @ S
    sHs = (S * HS).sum(0)
    GzS = GQZ @ S                                       # [nb, r, m]
    GqS = GQQ @ S
    trGz = GQZ.diagonal(dim1=1, dim2=2).sum(1)          # [nb]
    trHG = (GQQ * H).sum((1, 2))
    exact = (2 * (trGz[:, None] - (S * GzS).sum(1))
             - (trHG[:, None] - 2 * (GqS * HS).sum(1) + sHs * (S * GqS).sum(1)))
    HU = H @ Um
    A_ = S * (S * R).sum(0) + HU - S * (S * HU).sum(0)  # a_i = s (s^T R_i) + M H u_i
    resid = (torch.einsum("nir,ri->ni", GOQ, A_) - torch.einsum("nir,ri->ni", GOZ, Um)
             - (Um * (GQQ @ A_)).sum(1) + (Um * (GQZ @ Um)).sum(1))
    if improved:
        rank_i = r - has.to(_F64)
        w_m_w = (Wm * Wm).sum(0) - sw * sw
        res2 = norms2 - w_m_w
        dim = n - rank_i
        scale = torch.where((dim > 0) & (res2 > 0), dim / res2.clamp_min(1e-300),
                            torch.zeros_like(res2))
        resid = resid * scale
    return exact + resid


def xtrace(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
           batch_size: int = 16, seed: int = 0, min_probes: int = MIN_PROBES,
           probes: str = "sphere") -> TraceEstimate:
    """XTrace (Epperly, Tropp & Webber 2024): the exchangeable Hutch++ estimator, streamed, with
    per-block traces and the paper's error estimate.

    m probes omega_i, Y = A Omega, Q = orth(Y), Z = A Q (2 m matvecs). For each i, T_i is the
    Hutch++ estimate with sketch Omega without omega_i and residual probe omega_i; the estimate
    is mean_i T_i and the standard error std_i(T_i) / sqrt(m) (the paper's error estimate;
    the T_i are exchangeable, not independent, so it is a heuristic, not a sample SE: their
    positive correlation through the shared basis makes it optimistic on decaying spectra,
    measured RMS error / RMS reported SE = 1.2-1.7 for lambda_i = i^-2 and 0.9^i, 1.0-1.2 for
    flat spectra; with rtol, the actual error is then up to ~1.7 rtol, and 2-3.4 rtol was
    measured on the bench MLP's GGN, bench/results/bench_curvature_cpu.json). Per block: the same
    with T_{i,b} (_xtrace_samples), unbiased for tr(A_bb), sum over blocks = T_i.

    Streaming: each batch of b probes adds b columns to Y; Q grows by Gram-Schmidt of the new
    columns against the old basis (old columns kept), so a batch costs b matvecs for A omega
    and <= b for A q (exactly rank A in all when A is low rank). The per-block Gram matrices
    Omega_b^T Q_b, Omega_b^T Z_b, Q_b^T Q_b, Q_b^T Z_b and R = Q^T Y grow by their new rows and
    columns only; after the matvecs everything is m x m float64 algebra.

    probes: "sphere" (default, the paper's choice: Gaussian probes scaled to norm sqrt(P), with
    its "improved" residual scaling), "gaussian" or "rademacher" (plain XTrace). Probe i is
    probe i of curvature_kernels.gaussian's (or rademacher's) stream ``seed``, normalized for
    "sphere". Stops after a batch once m >= min_probes and stderr <= rtol |estimate|, or when
    the next batch's 2 b matvecs would exceed max_matvecs."""
    if probes not in XTRACE_PROBES:
        raise ValueError(f"probes: expected one of {XTRACE_PROBES}, got {probes!r}")
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, 4, "xtrace",
        "2 probes for the leave-one-out error estimate and 2 for A Q")
    blocks = _blocks(op)
    nb = len(blocks)
    everything = [list(range(len(op.shapes)))]
    n = op.numel
    start, used = op.matvecs, 0
    Om, Q, Z = _Store(), _Store(), _Store()
    R = torch.zeros(0, 0, dtype=_F64)
    GOQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GOZ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQZ = torch.zeros(nb, 0, 0, dtype=_F64)
    norms2 = torch.zeros(0, dtype=_F64)
    history: list[tuple[int, float, float]] = []
    converged = False
    est, se = 0.0, math.nan

    def estimate(per_block: bool):
        args = (GOQ, GOZ, GQQ, GQZ) if per_block else tuple(
            g.sum(0, keepdim=True) for g in (GOQ, GOZ, GQQ, GQZ))
        return _xtrace_samples(R, *args, norms2, n, probes == "sphere")

    while True:
        b = min(batch_size, (max_matvecs - used) // 2)
        if b < 1:
            break
        m0 = Om.count
        if probes == "rademacher":
            On = rademacher(op.shapes, b, seed, first=m0, dtype=op.dtype, device=op.device)
        else:
            On = gaussian(op.shapes, b, seed, first=m0, dtype=op.dtype, device=op.device)
        nrm2 = _small(block_dots(On, On, everything)[0])
        if probes == "sphere":
            f = (n / nrm2).sqrt().to(op.dtype).to(op.device)
            for t in On:  # in place: the probes are this call's own (no P x b temporary)
                t.mul_(f.reshape(-1, *([1] * (t.dim() - 1))))
            nrm2 = _small(block_dots(On, On, everything)[0])
        Yn = op.matmat(On)
        used += b
        new, C, _ = _extend_basis(Q, Yn, everything)
        r0 = Q.count
        Om.append(On)
        norms2 = torch.cat([norms2, nrm2])
        if new is not None:
            rn = new[0].shape[0]
            Zn = op.matmat(new)
            used += rn
            Q.append(new)
            Z.append(Zn)
            R = torch.cat([torch.cat([R, C], 1),
                           torch.cat([torch.zeros(rn, m0, dtype=_F64),
                                      _gram(new, Yn, everything)[0]], 1)], 0)
            GQQ_new = Q.right(new, blocks)                             # [nb, rn, r]
            GQQ = _append_gram(GQQ, GQQ_new[:, :, :r0].transpose(1, 2), GQQ_new)
            GQZ = _append_gram(GQZ, Q.left(Zn, blocks, upto=-1), Z.right(new, blocks))
            GOQ = _append_gram(GOQ, Om.right(new, blocks, upto=-1).transpose(1, 2),
                               Q.right(On, blocks))
            GOZ = _append_gram(GOZ, Om.right(Zn, blocks, upto=-1).transpose(1, 2),
                               Z.right(On, blocks))
        else:
            R = torch.cat([R, C], 1)
            GOQ = torch.cat([GOQ, Q.right(On, blocks)], 1)
            GOZ = torch.cat([GOZ, Z.right(On, blocks)], 1)
        m = Om.count
        if m < 2:
            continue
        T = estimate(per_block=False)[0]
        est = float(T.mean())
        se = float(T.std()) / math.sqrt(m)
        history.append((used, est, se))
        if _stop(rtol, m, min_probes, est, se):
            converged = True
            break
    Tb = estimate(per_block=True)                 # [nb, m]
    means = Tb.mean(1)
    m = Tb.shape[1]
    ses = Tb.std(1) / math.sqrt(m)
    tot = Tb.sum(0)
    est = float(means.sum())
    se = float(tot.std()) / math.sqrt(m)
    if history:
        history[-1] = (used, est, se)
    return _result(op, "xtrace", est, se, means, ses, used, m, converged, rtol, max_matvecs,
                   history, seed, start, sketch_size=Q.count, rank=Q.count)


# ------------------------------------------------------------------------------ dispatcher
def estimate_trace(op: CurvatureOperator, method: str = "hutch++", **kw) -> TraceEstimate:
    """tr(op) by ``method``: "hutch++" (default; also "hutchpp"), "hutchinson" or "xtrace";
    keyword arguments go to the estimator (rtol, max_matvecs, batch_size, seed, ...)."""
    fns = {"hutch++": hutchpp, "hutchpp": hutchpp, "hutchinson": hutchinson, "xtrace": xtrace}
    if method not in fns:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return fns[method](op, **kw)

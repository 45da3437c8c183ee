"""The P-sized steps of Lanczos and SLQ outside the products, over the operator's list of
parameter-shaped tensors (curvature_kernels' unchecked entry points: the lists are the
operator's products and bases allocated here with its shapes), the basis storage, and the
small tridiagonal eigensolver (float64, NumPy/LAPACK on the host)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.linalg import lapack

from .curvature_kernels import _block_dots_run, _reorthogonalize_run
from .curvature_operators import CurvatureOperator
from .curvature_orthogonality import OrthogonalityEstimate

# A Lanczos residual below this many units of roundoff (times the running ||A q|| estimate) is
# rounding noise: the Krylov space is invariant. Missing a breakdown is benign here (the noise
# vector is orthogonalized against the basis and acts as a restart vector with a tiny coupling);
# a false one drops a coupling below 64 eps ||A||, which moves eigenvalues by at most that
# (Weyl), far below every tolerance Lanczos and SLQ use.
_BREAKDOWN_ULPS = 64.0
# Second Gram-Schmidt pass only when the first removed more than 1 - 1/2 of the norm ("twice is
# enough" with Kahan's criterion, Parlett 1998 sec. 6.9): cancellation of that size leaves
# components along the basis of relative size eps * (before / after).
_REORTH_RATIO = 0.5
_STEBZ, _STEIN = lapack.dstebz, lapack.dstein


def _all_blocks(op: CurvatureOperator) -> list[list[int]]:
    return [list(range(len(op.shapes)))]


def _sq_norm(v: Sequence[torch.Tensor]) -> float:
    """||v||^2 of one vector (list of parameter-shaped tensors), float on the host."""
    vb = [t.unsqueeze(0) for t in v]
    return float(_block_dots_run(vb, vb, [list(range(len(v)))])[0, 0])


def _new_rows(op: CurvatureOperator, rows: int, dtype: torch.dtype,
              lead: tuple[int, ...] = ()) -> list[torch.Tensor]:
    # Uninitialized: a row is read only after it is written (zero-filling a 64-row basis of a
    # 150k-parameter model cost 6% of a Lanczos run).
    return [torch.empty(*lead, rows, *s, dtype=dtype, device=op.device) for s in op.shapes]


def _reorth_step(w: list[torch.Tensor], basis: Sequence[torch.Tensor], count: int,
                 lo: int, out_row: int | None = None,
                 min_norm: float = 0.0) -> tuple[np.ndarray, float]:
    """Orthogonalize w (= A q) in place against basis rows 0..count-1; returns the coefficients
    on rows lo..count-1 (summed over the passes: q_i^T A q) and ||w|| after; with out_row, also
    basis row out_row = w / ||w|| when ||w|| > min_norm (curvature_kernels.reorthogonalize_).

    First a pass against rows lo..count-1, which hold the large components (q_{j-1} and q_j of
    the three-term recurrence, or the previous and current blocks), then one full classical
    Gram-Schmidt pass against all rows, and a second full pass only when the first removed more
    than half of the norm (Kahan's test, "twice is enough"; Parlett 1998 sec. 6.9). Full
    reorthogonalization keeps Q orthonormal to working precision, so the Ritz values carry no
    spurious copies (Parlett ch. 13)."""
    total, after = _reorthogonalize_run(w, basis, count, lo, _REORTH_RATIO, out_row, min_norm)
    return total[lo:].numpy(), math.sqrt(max(after, 0.0))


def _local_step(w: list[torch.Tensor], local: Sequence[torch.Tensor], n: int,
                out_row: int | None, min_norm: float) -> tuple[np.ndarray, float]:
    """w against the n local rows only (passed as the whole basis `local`: classical
    Gram-Schmidt with Kahan's second pass), the row out_row of `local` written as _reorth_step
    does; returns the coefficients on the n rows and ||w|| after."""
    total, after = _reorthogonalize_run(w, local, n, n, _REORTH_RATIO, out_row, min_norm)
    return total.numpy(), math.sqrt(max(after, 0.0))


def _omega_step(omega: OrthogonalityEstimate, w: list[torch.Tensor],
                basis: Sequence[torch.Tensor], j: int, lo: int, coef: np.ndarray, norm: float,
                alpha: np.ndarray, beta: np.ndarray, theta_floor: float, out_row: int | None,
                min_norm: float) -> tuple[np.ndarray | None, float]:
    """Partial reorthogonalization's decision after the local step of row j (coef: its
    coefficients on rows lo..j, norm = ||w|| > min_norm; alpha, beta: the recurrence's
    coefficients of rows 0..j-1): Simon's estimate for the new row, with the rounding term the
    larger of theta_floor and the product's own asymmetry, q_{j-1}^T A q_j against
    beta_{j-1} = q_j^T A q_{j-1} (equal for an exactly symmetric product); when it asks, a full
    pass against rows 0..j (row out_row written). Returns (that pass's coefficients on rows
    0..j, or None without one; ||w|| after)."""
    asym = abs(coef[0] - beta[j - 1]) if j > 0 and lo == j - 1 else 0.0
    theta = max(asym, theta_floor)
    if not omega.update(np.append(alpha[:j], coef[-1]), np.append(beta[:j], norm), theta):
        return None, norm
    total, after = _reorthogonalize_run(w, basis, j + 1, lo, _REORTH_RATIO, out_row, min_norm)
    norm = math.sqrt(max(after, 0.0))
    if norm <= min_norm:
        omega.drop_last()   # the residual deflates: no row follows
    else:
        omega.reset(theta, norm)
    return total.numpy(), norm


def _owned(W: list[torch.Tensor], rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The products, copied if they share memory with the basis (an operator may hand back
    its input, e.g. an identity): they are orthogonalized in place."""
    if any(w.untyped_storage().data_ptr() == r.untyped_storage().data_ptr()
           for w, r in zip(W, rows)):
        return [w.clone() for w in W]
    return W


def _scale_into(row: Sequence[torch.Tensor], w: Sequence[torch.Tensor], scale: float) -> None:
    for r, t in zip(row, w):
        if r.dtype == t.dtype:
            torch.mul(t, scale, out=r)  # one pass, no P-sized temporary
        else:
            r.copy_(t * scale)  # rounded once to the basis' storage dtype


def _tridiagonal_eigh(diag: np.ndarray, off: np.ndarray, lo: int, hi: int,
                      vectors: bool = True):
    """Eigenvalues lo..hi (0-based, ascending order) of the symmetric tridiagonal matrix with
    diagonal `diag` and off-diagonal `off` (float64), and with vectors=True their unit
    eigenvectors as columns: LAPACK bisection (dstebz) and inverse iteration (dstein), the
    calls scipy.linalg.eigh_tridiagonal(select="i") makes, without its argument validation
    (0.25 ms a call, measured as long as a Lanczos step's own kernels on a 100k-parameter
    model)."""
    if diag.size == 1:
        return (diag.copy(), np.ones((1, 1))) if vectors else diag.copy()
    m, w, iblock, isplit, info = _STEBZ(diag, off, 2, 0.0, 1.0, lo + 1, hi + 1, 0.0,
                                        "B" if vectors else "E")
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK dstebz failed (info={info})")
    w = w[:m]
    if not vectors:
        return w
    v, info = _STEIN(diag, off, w, iblock, isplit)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK dstein: {info} eigenvectors did not converge")
    order = np.argsort(w)  # block order -> ascending
    return w[order], v[:, order]


class _Basis:
    """Orthonormal basis stored tensor by tensor as [capacity, *shape] (possibly in a lower
    precision than the operator), grown by doubling up to `limit` rows."""

    def __init__(self, op: CurvatureOperator, dtype: torch.dtype, capacity: int, limit: int):
        self.op = op
        self.dtype = dtype
        self.limit = limit
        self.rows = _new_rows(op, min(capacity, limit), dtype)

    @property
    def capacity(self) -> int:
        return self.rows[0].shape[0]

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        new = min(self.limit, max(n, 2 * self.capacity))
        grown = _new_rows(self.op, new, self.dtype)
        for g, r in zip(grown, self.rows):
            g[:r.shape[0]].copy_(r)
        self.rows = grown

    def get(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows start..stop-1 as a batch in the operator's dtype (views when no cast)."""
        if self.dtype == self.op.dtype:
            return [r[start:stop] for r in self.rows]
        return [r[start:stop].to(self.op.dtype) for r in self.rows]

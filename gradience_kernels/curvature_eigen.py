"""Eigenvalues of curvature operators: Lanczos (top-k / bottom-k), power iteration (lambda_max,
PyHessian-style), the gradient-descent stability margin, and stochastic Lanczos quadrature (SLQ)
for the spectral density.

Every P-sized step outside the operator's matvecs goes through curvature_kernels
(``reorthogonalize_``: one call per Lanczos product; ``orthogonalize_``, ``block_dots``,
``combine``, ``rademacher``), over the operator's list of parameter-shaped tensors: nothing is
flattened into one P-vector. The inner loops call the kernels' unchecked entry points (the
lists are the operator's products and the basis allocated here with its shapes). The small dense algebra
(tridiagonal / banded projections of size m x m, m = number of Lanczos steps) runs in float64
with NumPy on the host.

References:
- C. Lanczos (1950); B. Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13 (Lanczos
  with full reorthogonalization, residual bounds |beta_m s_mi|), ch. 11 (|theta - lambda| <= ||r||
  and <= ||r||^2 / gap).
- G. Golub and R. Underwood (1977), block Lanczos.
- Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian" (2020): power iteration with deflation,
  SLQ density.
- S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"
  (SIAM J. Matrix Anal. Appl. 2017); B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into
  neural net optimization via Hessian eigenvalue density" (ICML 2019).
- J. Cohen, S. Kaur, Y. Li, Z. Kolter, A. Talwalkar, "Gradient descent on neural networks
  typically occurs at the edge of stability" (ICLR 2021).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from scipy.linalg import lapack

from .curvature_kernels import (_block_dots_run, _orthogonalize_run, _reorthogonalize_run,
                                combine, rademacher)
from .curvature_operators import CurvatureOperator
from .curvature_orthogonality import OrthogonalityEstimate

__all__ = ["EigenResult", "StabilityMargin", "SpectralDensity", "lanczos", "power_iteration",
           "stability_margin", "slq_density"]

# A Lanczos residual below this many units of roundoff (times the running ||A q|| estimate) is
# rounding noise: the Krylov space is invariant. Missing a breakdown is benign here (the noise
# vector is orthogonalized against the basis and acts as a restart vector with a tiny coupling);
# a false one drops a coupling below 64 eps ||A||, which moves eigenvalues by at most that
# (Weyl), far below every tolerance this module uses.
_BREAKDOWN_ULPS = 64.0
# Second Gram-Schmidt pass only when the first removed more than 1 - 1/2 of the norm ("twice is
# enough" with Kahan's criterion, Parlett 1998 sec. 6.9): cancellation of that size leaves
# components along the basis of relative size eps * (before / after).
_REORTH_RATIO = 0.5
_STEBZ, _STEIN = lapack.dstebz, lapack.dstein


# --------------------------------------------------------------------------- results
@dataclass
class EigenResult:
    """Eigenvalue estimates of a symmetric operator.

    ``eigenvalues``: float64 [k] (CPU), descending for which="largest", ascending for
    "smallest", in the order found for power iteration. ``residuals``: float64 [k], the
    residual norms ||A y - theta y|| of the unit eigenvector estimates (Lanczos: the recurrence's
    |beta_m s_mi|, plus the basis' storage rounding when basis_dtype is lower than the
    operator's; the true residual exceeds it by the rounding of the products, a few eps ||A||;
    power iteration: the residual of the last iterate). By Weyl / Bauer-Fike each theta_i is
    within residuals[i] of an eigenvalue of A (within residuals[i]^2 / gap when the rest of the
    spectrum is a gap away); that it is the i-th one, residuals cannot tell (see lanczos).
    ``converged``: bool [k]. ``matvecs``: matvecs this call used; ``iterations``: Lanczos
    (block) steps or power iterations in all. ``eigenvectors``: a list of [k, *shape] tensors
    (one per parameter tensor) in the operator's dtype, or None.
    ``full_reorthogonalizations``: Lanczos steps that orthogonalized against the whole basis
    (all of them with reorth="full"; power iteration: 0).
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    matvecs: int
    iterations: int
    method: str
    eigenvectors: list[torch.Tensor] | None = None
    tol: float = float("nan")
    restarts: int = 0
    full_reorthogonalizations: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass
class StabilityMargin:
    """Gradient-descent stability: ``margin = threshold - lambda_max`` with ``threshold =
    (2 + 2 momentum) / lr`` (2 / lr without momentum). Positive: the quadratic model is stable
    along the top curvature direction; near zero: the edge of stability (Cohen et al. 2021)."""

    lambda_max: float
    threshold: float
    margin: float
    lr: float
    momentum: float = 0.0
    matvecs: int = 0
    residual: float = float("nan")
    converged: bool = True
    eigen: EigenResult | None = None


@dataclass
class SpectralDensity:
    """Gaussian-broadened spectral density from stochastic Lanczos quadrature.

    phi(t) = (1/n_v) sum_l sum_j tau_j^(l) exp(-(t - theta_j^(l))^2 / (2 sigma^2)) /
    (sigma sqrt(2 pi)), theta_j^(l) the Ritz values (nodes) of probe l and tau_j^(l) the squared
    first components of T's eigenvectors (weights; sum_j tau_j^(l) = 1), so phi integrates to 1.
    ``nodes`` / ``weights``: float64 [n_probes, steps], a probe whose Krylov space became
    invariant before ``steps`` is padded with zero weights (its quadrature is then exact for every
    polynomial). ``lengths``: Lanczos steps per probe; ``exact_degree``: the largest p for which
    every probe's quadrature is exact (2 m - 1), None when all are exact;
    ``full_reorthogonalizations``: Lanczos steps (over all probes) that orthogonalized against
    the whole basis (every step with reorth="full").
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    lengths: torch.Tensor
    sigma: float
    matvecs: int
    numel: int
    exact_degree: int | None = None
    full_reorthogonalizations: int = 0

    def integral(self) -> float:
        """Trapezoid integral of the density over the grid (1 when the grid covers the nodes
        +- several sigma and its spacing is below sigma)."""
        return float(torch.trapezoid(self.density, self.grid))

    def probe_moments(self, p: int) -> torch.Tensor:
        """sum_j tau_j^(l) theta_j^(l)^p per probe [n_probes]: v_l^T A^p v_l exactly (Gauss
        quadrature with m nodes is exact for degree <= 2m - 1), v_l = r_l / ||r_l||, so for
        Rademacher r_l (||r_l||^2 = P) it is r_l^T A^p r_l / P."""
        p = _check_int("p", p, 0)
        if self.exact_degree is not None and p > self.exact_degree:
            raise ValueError(f"p: the {int(self.lengths.min())}-step quadrature is exact for "
                             f"moments up to p = {self.exact_degree}, got p={p}; run slq_density "
                             f"with steps >= {(p + 2) // 2}")
        return (self.weights * self.nodes.pow(p)).sum(1)

    def moment(self, p: int) -> tuple[float, float]:
        """(estimate of tr(A^p) / P, its standard error): the mean over probes of
        r^T A^p r / P (unbiased for Rademacher r, Hutchinson 1989) and std / sqrt(n_probes)
        (nan for one probe)."""
        vals = self.probe_moments(p)
        n = vals.numel()
        se = float(vals.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")
        return float(vals.mean()), se


# --------------------------------------------------------------------------- argument checks
def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {name}={value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {name}={value}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value}")
    return value


def _check_op(op) -> None:
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")


def _check_basis_dtype(basis_dtype, op: CurvatureOperator) -> torch.dtype:
    if basis_dtype is None:
        return op.dtype
    if basis_dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"basis_dtype must be torch.float64, float32, float16 or bfloat16, got "
                        f"basis_dtype={basis_dtype!r}")
    return basis_dtype


def _check_which(which) -> str:
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got which={which!r}")
    return which


#: Reorthogonalization schemes of lanczos and slq_density.
REORTH_METHODS = ("full", "partial")


def _check_reorth(reorth) -> str:
    if reorth not in REORTH_METHODS:
        raise ValueError(f"reorth must be one of {REORTH_METHODS}, got reorth={reorth!r}")
    return reorth


def _default_tol(dtype: torch.dtype, basis_dtype: torch.dtype) -> float:
    # eps^(2/3) of the operator's dtype (ARPACK's eps23): well above the residual's rounding
    # floor (a few eps ||A||), and a guaranteed eigenvalue accuracy |theta - lambda| <= tol ||A||
    # of 3.7e-11 (float64) / 2.4e-5 (float32) without any gap assumption. A basis stored in a
    # lower precision puts a floor of about 0.1 eps_basis ||A|| under the residual (measured:
    # 0.2 u = 0.1 eps for float32, float16 and bfloat16 storage), hence eps_basis there.
    return max(torch.finfo(dtype).eps ** (2.0 / 3.0), torch.finfo(basis_dtype).eps)


# --------------------------------------------------------------------------- vector helpers
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


# --------------------------------------------------------------------------- Lanczos
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


def _default_max_iter(P: int, k: int, block_size: int) -> int:
    # Extreme eigenvalues with a relative gap g converge in O(1 / sqrt(g)) steps; a Hessian's
    # outliers take tens of steps, its bulk edges (which="smallest") a few hundred. 200 rows of
    # basis cost 200 P entries of memory; the basis grows only as far as convergence needs.
    return min(P, max(200, 20 * k * block_size))


def lanczos(op: CurvatureOperator, k: int = 5, which: str = "largest", tol: float | None = None,
            max_iter: int | None = None, seed: int = 0, basis_dtype: torch.dtype | None = None,
            return_vectors: bool = False, block_size: int = 1,
            reorth: str = "full") -> EigenResult:
    """The k largest (or smallest) eigenvalues of a symmetric operator by Lanczos with full
    reorthogonalization.

    Builds an orthonormal basis Q_m of the Krylov space span{q_1, A q_1, ..., A^(m-1) q_1}
    (q_1 a normalized Rademacher probe of stream `seed`; a block of `block_size` probes for
    block Lanczos) with the projection T_m = Q_m^T A Q_m tridiagonal (banded for blocks) and
    A Q_m = Q_m T_m + r_m e_m^T. Every new vector is orthogonalized against the whole basis
    (curvature_kernels.orthogonalize_, stored tensor by tensor in `basis_dtype`). After each step
    T_m = S diag(theta) S^T in float64; the Ritz pair (theta_i, Q_m s_i) has residual
    ||A Q_m s_i - theta_i Q_m s_i|| = ||r_m|| |s_mi| (Parlett 1998, ch. 13), and is converged when

        ||r_m|| |s_mi| <= tol * max(|theta_i|, scale),   scale = max_j |theta_j|

    (scale: the largest Ritz value magnitude, a lower estimate of ||A||_2 that converges first;
    the test is thus relative to ||A||, which rounding (a few eps ||A||) can always meet). Each
    theta_i is then within tol * ||A|| of an eigenvalue, within (tol ||A||)^2 / gap when the rest
    of the spectrum is a gap away. Stops when the k wanted Ritz values are converged, when
    `max_iter` matvecs are spent (RuntimeWarning, ``converged`` False), or when the whole space
    is spanned (P <= max_iter: T is then A in the basis Q, all values exact).

    A Krylov space that becomes exactly invariant (an operator with few distinct eigenvalues)
    is continued from a new Rademacher probe orthogonalized against the basis; each such
    segment explores the complement of the earlier ones, and the run stops only once the latest
    segment's extreme Ritz value has converged or, for a segment that closed, is no better
    than the k-th wanted value.

    Limitation (every single-vector Krylov method): a start vector reaches one direction of
    each eigenspace, so an eigenvalue of multiplicity > 1 appears once in exact arithmetic
    (rounding reveals further copies only late), and a cluster narrower than tol ||A|| may
    converge before all its members appear: residuals certify that each theta_i is near some
    eigenvalue, not that none was skipped. Typical cases: exact symmetries, and the null space
    of a rank-deficient GGN / Fisher with which="smallest" (one zero, then the smallest nonzero
    values). Use ``block_size >= multiplicity`` there (block Lanczos, Golub and Underwood
    1977); each step is then one batched ``op.matmat``.

    Memory: the basis holds (steps + block_size) x P entries of basis_dtype, grown by doubling
    as the run needs (no thick restart: top-k runs of Hessians take tens to a few hundred
    steps, see max_iter).

    Args:
        op: the operator (CurvatureOperator, P = op.numel).
        k: number of eigenvalues, 1 <= k <= P.
        which: "largest" (algebraic, descending) or "smallest" (ascending).
        tol: residual tolerance relative to ||A||; default eps^(2/3) of op.dtype (3.7e-11 for
            float64, 2.4e-5 for float32), or eps of basis_dtype when that is larger.
        max_iter: most matvecs; default min(P, max(200, 20 k block_size)).
        seed: the Rademacher stream of the start (and restart) vectors.
        basis_dtype: storage dtype of the basis (default op.dtype); a lower precision cuts its
            memory ((m + 1) P entries) at a cost in accuracy: the stored rows carry rounding
            errors delta that enter A Q = Q T + r e^T - F, F e_j = beta_j delta_{j+1}; the
            residuals include ||F s|| (computed from the stored rounding, entries independent),
            which floors them at about 0.1 eps_basis ||A||. Measured for a float64 operator
            (P = 300, 2000): eigenvalue errors / ||A|| of 1e-9 (float32 basis), 5e-6 (float16),
            1e-4 (bfloat16), against 1e-15 for a float64 basis.
        return_vectors: also return the Ritz vectors (curvature_kernels.combine).
        block_size: vectors per step (block Lanczos); each step is one op.matmat of that many.
        reorth: "full" (default: every step against the whole basis, two reads of it) or
            "partial" (single-vector runs: every step against the two local rows, against the
            whole basis only when Simon's estimate of the loss of orthogonality exceeds
            min(sqrt(eps), tol), and on the step after; curvature_orthogonality). Partial keeps
            the basis semi-orthogonal, which keeps the Ritz values to working precision (Simon
            1984) and the Ritz vectors orthonormal to sqrt(eps); a full pass removes components
            on old rows that T does not hold, and the residuals include them (for each Ritz
            vector Q s, the norm of the combination sum_j s_j c_j of the removed components
            c_j), so the convergence test uses the true residual to rounding. Measured on
            the test spectra: the same matvecs and eigenvalue errors as full, 4 to 12 full
            passes in 18 to 31 steps (float32 MLP Hessian of the bench: 10 in 67).

    Returns:
        EigenResult (eigenvalues float64 [k], residuals, converged, matvecs, iterations,
        eigenvectors list of [k, *shape] when requested).
    """
    _check_op(op)
    P = op.numel
    k = _check_int("k", k, 1, P)
    which = _check_which(which)
    tol = None if tol is None else _check_positive("tol", tol)
    block_size = _check_int("block_size", block_size, 1, P)
    if max_iter is None:
        max_iter = _default_max_iter(P, k, block_size)
    max_iter = _check_int("max_iter", max_iter, max(k, block_size))
    seed = _check_int("seed", seed, 0)
    bdtype = _check_basis_dtype(basis_dtype, op)
    if tol is None:
        tol = _default_tol(op.dtype, bdtype)
    if not isinstance(return_vectors, bool):
        raise TypeError(f"return_vectors must be a bool, got return_vectors={return_vectors!r}")
    reorth = _check_reorth(reorth)
    if reorth == "partial" and block_size > 1:
        raise ValueError(f"reorth='partial' is for single-vector Lanczos (block_size=1), got "
                         f"block_size={block_size}")


    start = op.matvecs
    run = _Krylov(op, bdtype, block_size, min(P, max_iter + block_size), seed,
                  partial=reorth == "partial", tol=tol)
    run.add_random(block_size)
    ritz = None
    while True:
        restarted = run.step()
        ritz = None
        exhausted = run.count == run.done
        if run.done >= k and (not restarted or exhausted or block_size == 1):
            ritz = run.ritz(k, which)
            theta, _, resid, scale, seg = ritz
            ok = np.all(resid <= tol * np.maximum(np.abs(theta), scale))
            if ok and seg is not None and not exhausted:
                # After a restart the segment explores the complement C of the invariant spaces
                # found so far; an eigenvalue there (e.g. a further copy of a repeated one) may
                # still rise into the wanted set until the segment's wanted-side Ritz value has
                # converged (to the extreme eigenvalue of A on C, for a random start), or, when
                # the segment just closed (invariant), unless that value is no better than the
                # k-th wanted one: then no eigenvalue of the remaining complement is.
                if restarted:
                    tau = run.closed_extreme(which)
                    kth = theta[-1]
                    ok = (tau <= kth + tol * scale) if which == "largest" else \
                        (tau >= kth - tol * scale)
                else:
                    ok = seg[1] <= tol * max(abs(seg[0]), scale)
            if ok:
                break
        if exhausted or run.count > max_iter:
            # No pending row (the whole space is spanned), or the next block would take the
            # matvecs past max_iter.
            break
    if ritz is None:
        ritz = run.ritz(k, which)
    theta, S, resid, scale, _ = ritz
    converged = resid <= tol * np.maximum(np.abs(theta), scale)
    vectors = None
    if return_vectors:
        coeffs = torch.from_numpy(np.ascontiguousarray(S)).to(op.device)
        vectors = combine(run.basis.rows, run.done, coeffs, dtype=op.dtype)
    result = EigenResult(
        eigenvalues=torch.from_numpy(theta.copy()),
        residuals=torch.from_numpy(resid.copy()),
        converged=torch.from_numpy(converged.copy()),
        matvecs=op.matvecs - start, iterations=run.steps, method="lanczos",
        eigenvectors=vectors, tol=tol, restarts=run.restarts,
        full_reorthogonalizations=run.full_reorths)
    if not result.all_converged:
        warnings.warn(f"lanczos: {int((~converged).sum())} of k={k} Ritz values not converged "
                      f"after {result.matvecs} matvecs (max_iter={max_iter}, tol={tol:g}); "
                      f"largest residual {float(resid.max()):.3g}", RuntimeWarning,
                      stacklevel=2)
    return result


class _Krylov:
    """(Block) Lanczos with full reorthogonalization: basis rows 0..count-1, of which rows
    0..done-1 have their products A q in the projection H = Q^T A Q (float64, host); rows
    done..count-1 are the pending block. A Q_d = Q_c H[:c, :d] to rounding, so the Ritz pair
    (theta, Q_d s) has residual ||H[d:c, :d] s|| exactly when Q is orthonormal."""

    def __init__(self, op: CurvatureOperator, dtype: torch.dtype, block: int, limit: int,
                 seed: int, partial: bool = False, tol: float | None = None):
        self.op = op
        self.block = block
        self.limit = limit
        self.seed = seed
        self.basis = _Basis(op, dtype, max(64, 8 * block), limit)
        cap = self.basis.capacity
        self.H = np.zeros((cap, cap))
        # Storage rounding of the basis: the row made from column j's residual is stored as
        # q + delta, so A q_j = Q T e_j - beta_j delta: colerr[j] = beta_j ||delta|| (0 when the
        # basis is stored in the operator's dtype).
        self.colerr = np.zeros(cap)
        self.lossy = dtype != op.dtype
        # Partial reorthogonalization: a full pass at step j removes components c_j on rows
        # older than the local ones, which T does not hold: A q_j = Q T e_j + beta_j q_{j+1} +
        # Q c_j. discarded[j] = c_j (rows 0..len-1); a Ritz vector Q s then has the extra
        # residual Q sum_j s_j c_j, whose norm is computed from the c_j (not in quadrature over
        # j: full passes come in runs on consecutive steps with correlated c_j, and quadrature
        # was measured 1-3% short of the true residual, so not a bound).
        self.discarded: dict[int, np.ndarray] = {}
        self.count = 0
        self.done = 0
        self.prev_lo = 0
        self.anorm = 0.0
        self.next_probe = 0
        self.restarts = 0
        self.seg_start = 0    # first row of the latest restart (single-vector runs)
        self.closed = (0, 0)  # rows of the segment that the latest restart closed
        self.steps = 0
        self.eps = torch.finfo(op.dtype).eps
        # Rounding of the stored rows: the floor of their orthogonality.
        self.eps_store = max(self.eps, torch.finfo(dtype).eps)
        self.full_reorths = 0  # steps that orthogonalized against the whole basis
        self.omega = OrthogonalityEstimate(self.eps, threshold=tol) if partial else None

    def ensure(self, n: int) -> None:
        """Room for n rows in the basis, H and colerr (grown together, by doubling)."""
        self.basis.ensure(n)
        cap = self.basis.capacity
        if cap > self.H.shape[0]:
            H = np.zeros((cap, cap))
            old = self.H.shape[0]
            H[:old, :old] = self.H
            self.H = H
            self.colerr = np.concatenate([self.colerr, np.zeros(cap - old)])

    def add_random(self, n: int) -> int:
        """Append up to n Rademacher probes of the stream, orthonormalized against the basis
        (coupling 0 to the existing rows: a start or a restart); returns how many."""
        added = 0
        P = self.op.numel
        while added < n and self.count < self.limit:
            z = rademacher(self.op.shapes, 1, self.seed, first=self.next_probe,
                           dtype=self.op.dtype, device=self.op.device)
            self.next_probe += 1
            z = [t[0] for t in z]
            _orthogonalize_run(z, self.basis.rows, self.count, 2)
            norm = math.sqrt(_sq_norm(z))
            # A probe (||r|| = sqrt(P)) left with less than sqrt(eps) of its norm lies
            # numerically in the span of the basis: the space is exhausted.
            if norm <= math.sqrt(self.eps * P):
                break
            self.ensure(self.count + 1)
            _scale_into([r[self.count] for r in self.basis.rows], z, 1.0 / norm)
            self.count += 1
            added += 1
        return added

    def step(self) -> bool:
        """Products of the pending block, their projection, and the next block (the residuals
        orthonormalized). Returns True when rows had to be restarted from new probes (the
        Krylov space became invariant)."""
        lo, hi = self.done, self.count
        rows = self.basis.rows
        W = _owned(self.op.matmat(self.basis.get(lo, hi)), rows)
        self.steps += 1
        # Single-vector steps write the next row in the reorthogonalization call itself (unless
        # ||w|| is below the breakdown threshold so far; a row written for a residual that the
        # updated threshold then deflates lies beyond count and is never read).
        fused = hi - lo == 1 and self.count < self.limit
        if fused:
            self.ensure(self.count + 1)
            rows = self.basis.rows
        H = self.H
        res = []
        norms = []
        for c in range(hi - lo):
            w = [t[c] for t in W]
            if self.omega is not None:
                coef, norm = self._partial_step(w, rows, lo, fused)
            else:
                coef, norm = _reorth_step(w, rows, hi, self.prev_lo,
                                          out_row=self.count if fused else None,
                                          min_norm=_BREAKDOWN_ULPS * self.eps * self.anorm)
                self.full_reorths += 1
                # ||A q||^2 = (coefficients on the local rows)^2 + ||residual||^2: the
                # breakdown scale (the components on older rows are at rounding level).
                self.anorm = max(self.anorm, math.sqrt(float(coef @ coef) + norm * norm))
            H[lo:hi, lo + c] = coef[lo - self.prev_lo:]
            res.append(w)
            norms.append(norm)
        D = H[lo:hi, lo:hi]
        H[lo:hi, lo:hi] = 0.5 * (D + D.T)
        thr = _BREAKDOWN_ULPS * self.eps * self.anorm
        new_lo = hi
        deflated = 0
        for c, w in enumerate(res):
            j = lo + c
            n_new = self.count - new_lo
            norm = norms[c]
            if n_new:
                # Rows made from this block's earlier residuals (orthogonal to rows < hi).
                cf = _orthogonalize_run(w, [r[new_lo:] for r in rows], n_new, 2)
                cf = cf.double().cpu().numpy()
                H[new_lo:self.count, j] = cf
                H[j, new_lo:self.count] = cf
                norm = math.sqrt(_sq_norm(w))
            if norm <= thr or self.count >= self.limit:
                deflated += 1
                continue
            self.ensure(self.count + 1)
            H = self.H
            rows = self.basis.rows
            row = [r[self.count] for r in rows]
            if not fused:
                _scale_into(row, w, 1.0 / norm)
            if self.lossy:
                delta = [q.to(t.dtype) - t / norm for q, t in zip(row, w)]
                self.colerr[j] = norm * math.sqrt(_sq_norm(delta))
            H[self.count, j] = H[j, self.count] = norm
            self.count += 1
        self.prev_lo, self.done = lo, hi
        if deflated and self.count < self.limit:
            # Invariant directions: keep the block size with new probes orthogonal to the basis.
            first = self.count
            added = self.add_random(min(deflated, self.limit - self.count))
            if added and self.omega is not None:
                self.omega.restart()
            if added:
                self.closed = (self.seg_start, self.done)
                self.seg_start = first
            self.restarts += added
            return added > 0
        return False

    def _partial_step(self, w: list[torch.Tensor], rows: Sequence[torch.Tensor], j: int,
                      fused: bool) -> tuple[np.ndarray, float]:
        """Single-vector step with partial reorthogonalization (curvature_orthogonality): w
        (= A q_j) against rows prev_lo..j only, a full pass only when the estimated loss of
        orthogonality of the new row says so. Returns the coefficients on rows prev_lo..j and
        ||w|| (the new row written when fused), as _reorth_step."""
        lo = self.prev_lo
        out = self.count - lo if fused else None
        coef, norm = _local_step(w, [r[lo:] for r in rows], j + 1 - lo, out,
                                 _BREAKDOWN_ULPS * self.eps * self.anorm)
        self.anorm = max(self.anorm, math.sqrt(float(coef @ coef) + norm * norm))
        thr = _BREAKDOWN_ULPS * self.eps * self.anorm
        if norm <= thr or self.count >= self.limit:
            # No new row from this residual: its norm is the run's last coupling (the residual
            # of the Ritz pairs, 0 once the space is exhausted), so it is taken against the
            # whole basis, as with full reorthogonalization.
            total, after = _reorthogonalize_run(w, rows, j + 1, lo, _REORTH_RATIO, None, thr)
            return self._absorb_full_pass(coef, total.numpy(), j, lo), math.sqrt(max(after, 0.0))
        total, norm = _omega_step(self.omega, w, rows, j, lo, coef, norm, np.diag(self.H)[:j],
                                  np.diag(self.H, -1)[:j], self.eps_store * self.anorm,
                                  self.count if fused else None, thr)
        if total is not None:
            coef = self._absorb_full_pass(coef, total, j, lo)
        return coef, norm

    def _absorb_full_pass(self, coef: np.ndarray, total: np.ndarray, j: int,
                          lo: int) -> np.ndarray:
        """A full pass's coefficients total (rows 0..j) after the local ones coef (rows
        lo..j): those on rows lo..j join coef; those on older rows, which T does not hold,
        are kept in discarded[j] for the residuals."""
        if lo > 0:  # at most one full pass per step: j is new each time
            self.discarded[j] = np.array(total[:lo], dtype=np.float64)
        self.full_reorths += 1
        return coef + total[lo:]

    def closed_extreme(self, which: str) -> float:
        """The wanted-side extreme eigenvalue of the closed (invariant) segment's block of H."""
        g, d = self.closed
        diag = np.diag(self.H[g:d, g:d]).copy()
        if d - g == 1:
            return float(diag[0])
        i = (d - g - 1, d - g - 1) if which == "largest" else (0, 0)
        return float(_tridiagonal_eigh(diag, np.diag(self.H[g:d, g:d], -1).copy(), *i,
                                       vectors=False)[0])

    def ritz(self, k: int, which: str):
        """The k wanted Ritz values of H[:d, :d] (in the returned order), their vectors s
        (columns), residual norms ||H[d:c, :d] s||, scale = max |theta| over all, and for a
        single-vector run after a restart the (value, residual) of the wanted-side extreme Ritz
        pair of the latest segment (rows seg_start..d-1, decoupled from the earlier rows, so
        also a Ritz pair of H), (nan, inf) while that segment is empty; else None.

        H[:d, :d] is tridiagonal (banded with bandwidth `block`: new rows couple only to the
        block they came from, restart rows to nothing), so LAPACK's tridiagonal / band solvers
        give the k wanted pairs by bisection and inverse iteration in O(d k) (0.4 ms at d = 200,
        k = 5, against 5 to 100 ms for a dense eigh on a loaded 2-core machine, where a threaded
        BLAS call on a tiny matrix waits on busy cores), and the opposite extreme in O(d)."""
        d, c, b = self.done, self.count, self.block
        lo_i, hi_i = (d - k, d - 1) if which == "largest" else (0, k - 1)
        other = (0, 0) if which == "largest" else (d - 1, d - 1)
        if b == 1:
            diag = np.diag(self.H[:d, :d]).copy()
            off = np.diag(self.H[:d, :d], -1).copy()
            if d == 1:
                theta, S = diag.copy(), np.ones((1, 1))
                extreme = diag
            else:
                theta, S = _tridiagonal_eigh(diag, off, lo_i, hi_i)
                extreme = _tridiagonal_eigh(diag, off, *other, vectors=False)
        else:
            band = np.zeros((b + 1, d))
            for i in range(min(b + 1, d)):
                band[i, :d - i] = np.diag(self.H[:d, :d], -i)
            theta, S = scipy.linalg.eig_banded(band, lower=True, select="i",
                                               select_range=(lo_i, hi_i))
            extreme = scipy.linalg.eigvals_banded(band, lower=True, select="i",
                                                  select_range=other)
        if which == "largest":
            theta, S = theta[::-1].copy(), S[:, ::-1].copy()
        scale = float(max(np.abs(theta).max(), np.abs(extreme).max()))
        # Pending rows couple only to the last processed block (columns prev_lo..d-1).
        lo = self.prev_lo
        R = self.H[d:c, lo:d] @ S[lo:d]
        resid = np.sqrt((R * R).sum(0))
        if self.lossy:
            # || sum_j s_j beta_j delta_j ||, the deltas' entries independent rounding errors:
            # in quadrature (measured within a factor 2 of the true residual).
            resid = np.sqrt(resid ** 2 + ((S * self.colerr[:d, None]) ** 2).sum(0))
        if self.discarded:
            # || sum_j s_j c_j || (Q's rows orthonormal to sqrt(eps)), in quadrature with the
            # rest: it lies on rows before the residual's row, which is orthogonal to them.
            C = np.zeros((d, d))
            for j, removed in self.discarded.items():
                if j < d:
                    C[:removed.size, j] = removed
            F = C @ S
            resid = np.sqrt(resid ** 2 + (F * F).sum(0))
        seg = None
        g = self.seg_start
        if b == 1 and g > 0:
            if g >= d:
                seg = (float("nan"), float("inf"))
            else:
                i = (d - g - 1, d - g - 1) if which == "largest" else (0, 0)
                if d - g == 1:
                    t_s, s_s = diag[g:], np.ones((1, 1))
                else:
                    t_s, s_s = _tridiagonal_eigh(diag[g:].copy(), off[g:].copy(), *i)
                coupling = self.H[d, d - 1] if c > d else 0.0
                seg = (float(t_s[0]), abs(coupling * s_s[-1, 0]))
        return theta, S, resid, scale, seg


# --------------------------------------------------------------------------- power iteration
def power_iteration(op: CurvatureOperator, k: int = 1, tol: float = 1e-6, max_iter: int = 1000,
                    seed: int = 0) -> EigenResult:
    """The k eigenvalues of largest magnitude by power iteration with deflation (PyHessian's
    ``eigenvalues``, Yao et al. 2020).

    For i = 1..k: from a normalized Rademacher probe (stream `seed`, probe i-1), repeat
        v <- v - V_i V_i^T v (orthogonalized against the eigenvectors found so far), v /= ||v||,
        w = A v, theta = v^T w, v <- w / ||w||
    until |theta - theta_prev| <= tol |theta_prev| (PyHessian's stopping rule: the relative
    change of the Rayleigh quotient) or `max_iter` iterations. The iteration converges to the
    eigenvalue of largest |lambda| of the deflated operator, at the rate (|lambda_2| /
    |lambda_1|)^2 per matvec for the Rayleigh quotient: for a Hessian whose most negative
    eigenvalue outweighs its largest, that is the negative one (use ``lanczos`` for the
    algebraic top). A small relative change does not bound the error when the ratio is near 1.

    Returns an EigenResult with the eigenvalues in the order found (by decreasing magnitude),
    the last Rayleigh quotients; ``residuals`` = ||A v - theta v|| of the last iterate v whose
    quotient is theta (from ||A v||^2 - theta^2, accurate to about sqrt(eps) ||A v||); the
    returned eigenvectors are w / ||w||, one power step further, as in PyHessian.
    """
    _check_op(op)
    P = op.numel
    k = _check_int("k", k, 1, P)
    tol = _check_positive("tol", tol)
    max_iter = _check_int("max_iter", max_iter, 1)
    seed = _check_int("seed", seed, 0)

    start = op.matvecs
    found = _new_rows(op, k, op.dtype)
    blocks = _all_blocks(op)
    values, residuals, converged = [], [], []
    iterations = 0
    for i in range(k):
        v = [t[0] for t in rademacher(op.shapes, 1, seed, first=i, dtype=op.dtype,
                                      device=op.device)]
        theta_prev = None
        ok = False
        theta = res = 0.0
        for _ in range(max_iter):
            _orthogonalize_run(v, found, i, 2)
            nv = math.sqrt(_sq_norm(v))
            if nv == 0.0:
                break
            v = [t / nv for t in v]
            w = op.matvec(v)
            iterations += 1
            vb = [t.unsqueeze(0) for t in v]
            wb = [t.unsqueeze(0) for t in w]
            theta = float(_block_dots_run(vb, wb, blocks)[0, 0])
            ww = float(_block_dots_run(wb, wb, blocks)[0, 0])
            res = math.sqrt(max(ww - theta * theta, 0.0))
            if ww == 0.0:
                ok = True       # A v = 0: v is an eigenvector of eigenvalue 0
                break
            v = [t / math.sqrt(ww) for t in w]
            if theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta_prev):
                ok = True
                break
            theta_prev = theta
        for r, t in zip(found, v):
            r[i].copy_(t)
        values.append(theta)
        residuals.append(res)
        converged.append(ok)
    result = EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(converged, dtype=torch.bool),
        matvecs=op.matvecs - start, iterations=iterations, method="power_iteration",
        eigenvectors=found, tol=tol)
    if not result.all_converged:
        warnings.warn(f"power_iteration: {k - sum(converged)} of k={k} eigenvalues not converged "
                      f"after max_iter={max_iter} iterations each (tol={tol:g})",
                      RuntimeWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------- stability margin
def stability_margin(op_or_lambda_max: CurvatureOperator | float, lr: float,
                     momentum: float = 0.0, **lanczos_kw) -> StabilityMargin:
    """Gradient-descent stability margin threshold - lambda_max, threshold = 2 / lr.

    On the quadratic model L(x) ~ L0 + g^T x + x^T H x / 2, gradient descent with step lr is
    stable along an eigenvector of H iff lr * lambda < 2; full-batch training drives
    lambda_max(H) up to 2 / lr and hovers there (the edge of stability, Cohen et al. 2021).
    With heavy-ball momentum beta the threshold is (2 + 2 beta) / lr (Cohen et al., appendix).

    Args:
        op_or_lambda_max: a CurvatureOperator (its algebraic largest eigenvalue is computed by
            ``lanczos(op, k=1, which="largest", **lanczos_kw)``) or the value lambda_max.
        lr: learning rate > 0.
        momentum: heavy-ball momentum in [0, 1).
    """
    lr = _check_positive("lr", lr)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a real number, got momentum={momentum!r}")
    momentum = float(momentum)
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got momentum={momentum}")
    threshold = (2.0 + 2.0 * momentum) / lr
    if isinstance(op_or_lambda_max, CurvatureOperator):
        for key in ("k", "which"):
            if key in lanczos_kw:
                raise TypeError(f"stability_margin: {key} is fixed (k=1, which='largest'), got "
                                f"{key}={lanczos_kw[key]!r}")
        eig = lanczos(op_or_lambda_max, k=1, which="largest", **lanczos_kw)
        lam = float(eig.eigenvalues[0])
        return StabilityMargin(lambda_max=lam, threshold=threshold, margin=threshold - lam,
                               lr=lr, momentum=momentum, matvecs=eig.matvecs,
                               residual=float(eig.residuals[0]), converged=eig.all_converged,
                               eigen=eig)
    if lanczos_kw:
        raise TypeError(f"stability_margin: options {sorted(lanczos_kw)} apply only to an "
                        f"operator, got lambda_max={op_or_lambda_max!r}")
    if isinstance(op_or_lambda_max, torch.Tensor):
        if op_or_lambda_max.numel() != 1:
            raise ValueError(f"lambda_max: expected one value, got shape "
                             f"{list(op_or_lambda_max.shape)}")
        op_or_lambda_max = op_or_lambda_max.item()
    if isinstance(op_or_lambda_max, bool) or not isinstance(
            op_or_lambda_max, (int, float, np.floating, np.integer)):
        raise TypeError(f"op_or_lambda_max must be a CurvatureOperator or a real number, got "
                        f"{type(op_or_lambda_max).__name__}")
    lam = float(op_or_lambda_max)
    if not math.isfinite(lam):
        raise ValueError(f"lambda_max must be finite, got lambda_max={lam}")
    return StabilityMargin(lambda_max=lam, threshold=threshold, margin=threshold - lam, lr=lr,
                           momentum=momentum)


# --------------------------------------------------------------------------- SLQ
def slq_density(op: CurvatureOperator, n_probes: int = 8, steps: int = 64,
                grid: torch.Tensor | None = None, sigma: float | None = None, seed: int = 0,
                n_grid: int | None = None, basis_dtype: torch.dtype | None = None,
                reorth: str = "full") -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (Ubaru, Chen
    and Saad 2017; Ghorbani, Krishnan and Xiao 2019; PyHessian's ``density``).

    For each of n_v Rademacher probes r_l (stream `seed`), v_l = r_l / sqrt(P), m = min(steps, P)
    Lanczos steps with full (or partial) reorthogonalization give T_m = S diag(theta) S^T; the Gauss
    quadrature v^T f(A) v ~ sum_j tau_j f(theta_j), tau_j = S_1j^2, is exact for polynomials of
    degree <= 2m - 1. The density of eigenvalues (1/P) sum_i delta(t - lambda_i) is estimated as

        phi(t) = (1/n_v) sum_l sum_j tau_j^(l) N(t; theta_j^(l), sigma^2),

    which integrates to 1. The probes run together: each Lanczos step is one ``op.matmat`` of
    all active probes; each probe's Krylov space that becomes invariant stops early (its
    quadrature is then exact).

    Args:
        op: the operator (P = op.numel).
        n_probes: number of probes n_v >= 1 (standard errors need >= 2).
        steps: Lanczos steps m >= 1 per probe (capped at P); memory n_v m P basis entries.
        grid: 1-D increasing float tensor of evaluation points; default n_grid points over
            [min theta - 8 sigma, max theta + 8 sigma] (Gaussian mass outside: 1e-15).
        sigma: Gaussian width > 0; default (max theta - min theta) / 200 (or 1e-2 max(1, |theta|)
            when all nodes coincide).
        n_grid: default grid size; default max(1000, span / (sigma / 4)) so that the trapezoid
            rule integrates each Gaussian to ~1e-30 (its error is exp(-2 pi^2 sigma^2 / h^2)).
        basis_dtype: storage dtype of the Lanczos bases (default op.dtype).
        reorth: "full" (default) or "partial" (each probe's basis against its whole basis only
            when its estimated loss of orthogonality exceeds sqrt(eps); see lanczos).

    Returns:
        SpectralDensity (grid, density, nodes, weights, lengths, matvecs; ``moment(p)`` gives
        the estimate of tr(A^p) / P with its standard error).
    """
    _check_op(op)
    P = op.numel
    n_probes = _check_int("n_probes", n_probes, 1)
    steps = _check_int("steps", steps, 1)
    seed = _check_int("seed", seed, 0)
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
    if n_grid is not None:
        n_grid = _check_int("n_grid", n_grid, 2)
    if grid is not None:
        grid = _check_grid(grid)
    bdtype = _check_basis_dtype(basis_dtype, op)
    reorth = _check_reorth(reorth)

    start = op.matvecs
    m = min(steps, P)
    nv = n_probes
    rows = _new_rows(op, m, bdtype, lead=(nv,))     # per tensor [n_v, m, *shape]
    probes = rademacher(op.shapes, nv, seed, dtype=op.dtype, device=op.device)
    inv = 1.0 / math.sqrt(P)
    for r, t in zip(rows, probes):
        r[:, 0].copy_(t * inv)
    del probes
    alpha = np.zeros((nv, m))
    beta = np.zeros((nv, m))
    lengths = np.zeros(nv, dtype=np.int64)
    invariant = np.zeros(nv, dtype=bool)
    anorm = np.zeros(nv)
    eps = torch.finfo(op.dtype).eps
    eps_store = max(eps, torch.finfo(bdtype).eps)
    omega = [OrthogonalityEstimate(eps) for _ in range(nv)] if reorth == "partial" else None
    full_reorths = 0
    active = list(range(nv))
    for j in range(m):
        if not active:
            break
        if len(active) == nv:
            Q = [r[:, j].to(op.dtype) for r in rows]
        else:
            sel = torch.tensor(active, device=op.device)
            Q = [r[sel, j].to(op.dtype) for r in rows]
        W = _owned(op.matmat(Q), rows)
        still = []
        for a, l in enumerate(active):
            w = [t[a] for t in W]
            basis = [r[l] for r in rows]
            lo = max(0, j - 1)
            out = j + 1 if j + 1 < m else None
            if omega is None:
                coef, norm = _reorth_step(w, basis, j + 1, lo, out_row=out,
                                          min_norm=_BREAKDOWN_ULPS * eps * anorm[l])
                full_reorths += 1
            else:
                # Partial: the local rows only, the whole basis when the estimated loss of
                # orthogonality of the new row exceeds sqrt(eps) (curvature_orthogonality).
                coef, norm = _local_step(w, [b[lo:] for b in basis], j + 1 - lo,
                                         None if out is None else out - lo,
                                         _BREAKDOWN_ULPS * eps * anorm[l])
            alpha[l, j] = coef[-1]
            lengths[l] = j + 1
            anorm[l] = max(anorm[l], math.sqrt(float(coef @ coef) + norm * norm))
            if j + 1 == m:
                continue
            if omega is not None and norm > _BREAKDOWN_ULPS * eps * anorm[l]:
                # (The quadrature uses T only: a full pass's coefficients are not kept.)
                total, norm = _omega_step(omega[l], w, basis, j, lo, coef, norm, alpha[l],
                                          beta[l], eps_store * anorm[l], out,
                                          _BREAKDOWN_ULPS * eps * anorm[l])
                if total is not None:
                    full_reorths += 1
            if norm <= _BREAKDOWN_ULPS * eps * anorm[l]:
                invariant[l] = True     # Krylov space invariant: the quadrature is exact
                continue
            beta[l, j] = norm  # row j + 1 = w / norm, written by _reorth_step
            still.append(l)
        active = still
    matvecs = op.matvecs - start

    nodes = np.zeros((nv, m))
    weights = np.zeros((nv, m))
    for l in range(nv):
        L = int(lengths[l])
        if L == 1:
            th, S = alpha[l, :1].copy(), np.ones((1, 1))
        else:
            th, S = scipy.linalg.eigh_tridiagonal(alpha[l, :L].copy(), beta[l, :L - 1].copy())
        nodes[l, :L] = th
        nodes[l, L:] = th[-1]           # padding: a real node with zero weight
        weights[l, :L] = S[0] ** 2
    # A probe that spanned the whole space (L = P) has T_P similar to A: exact for every f.
    invariant |= lengths == P
    # Probes whose space stayed open have quadrature exact to degree 2 L - 1.
    open_lengths = lengths[~invariant]
    exact = None if open_lengths.size == 0 else int(2 * open_lengths.min() - 1)

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = (hi - lo) / 200.0 if hi > lo else 1e-2 * max(1.0, abs(hi))
    if grid is None:
        a, b = lo - 8.0 * sigma, hi + 8.0 * sigma
        if n_grid is None:
            n_grid = max(1000, int(math.ceil((b - a) / (sigma / 4.0))) + 1)
        grid = torch.linspace(a, b, n_grid, dtype=torch.float64)
    density = _broadened(grid, nodes.reshape(-1), weights.reshape(-1) / nv, sigma)
    return SpectralDensity(grid=grid, density=density, nodes=torch.from_numpy(nodes),
                           weights=torch.from_numpy(weights),
                           lengths=torch.from_numpy(lengths), sigma=sigma, matvecs=matvecs,
                           numel=P, exact_degree=exact, full_reorthogonalizations=full_reorths)


def _check_grid(grid) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor):
        grid = torch.as_tensor(np.asarray(grid))
    if not grid.dtype.is_floating_point:
        raise TypeError(f"grid: expected a float tensor, got dtype={grid.dtype}")
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid: expected a 1-D tensor of >= 2 points, got shape "
                         f"{list(grid.shape)}")
    grid = grid.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("grid: contains non-finite values")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("grid: must be strictly increasing")
    return grid


def _broadened(grid: torch.Tensor, nodes: np.ndarray, weights: np.ndarray,
               sigma: float) -> torch.Tensor:
    """sum_j weights_j N(grid; nodes_j, sigma^2), in chunks of the grid (float64)."""
    th = torch.from_numpy(nodes)
    wt = torch.from_numpy(weights)
    keep = wt > 0
    th, wt = th[keep], wt[keep]
    out = torch.empty_like(grid)
    chunk = max(1, (1 << 22) // max(1, th.numel()))
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for s in range(0, grid.numel(), chunk):
        g = grid[s:s + chunk]
        z = (g[:, None] - th[None, :]) / sigma
        out[s:s + chunk] = torch.exp(-0.5 * z * z) @ wt * norm
    return out

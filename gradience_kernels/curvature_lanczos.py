"""Lanczos for the k largest or smallest eigenvalues of a curvature operator: single-vector or
block, full or partial (Simon's omega recurrence) reorthogonalization, residual-based
convergence, restarts across invariant Krylov spaces.

References: C. Lanczos (1950); B. Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13
(Lanczos with full reorthogonalization, residual bounds |beta_m s_mi|), ch. 11
(|theta - lambda| <= ||r|| and <= ||r||^2 / gap); G. Golub and R. Underwood (1977), block
Lanczos; H. Simon (1984), partial reorthogonalization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

from .curvature_eigen_checks import (_check_basis_dtype, _check_int, _check_op, _check_positive,
                                     _check_reorth, _check_which, _default_tol)
from .curvature_eigen_results import EigenResult
from .curvature_kernels import _orthogonalize_run, _reorthogonalize_run, combine, gaussian
from .curvature_krylov_steps import (_BREAKDOWN_ULPS, _REORTH_RATIO, _Basis, _local_step,
                                     _omega_step, _owned, _reorth_step, _scale_into, _sq_norm,
                                     _tridiagonal_eigh)
from .curvature_operators import CurvatureOperator
from .curvature_product_scale import ScaledProducts
from .curvature_orthogonality import OrthogonalityEstimate, decision_eps

__all__ = ["lanczos"]


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
    (q_1 a normalized Gaussian probe of stream `seed`; a block of `block_size` probes for
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
    is continued from a new Gaussian probe orthogonalized against the basis; each such
    segment explores the complement of the earlier ones, and the run stops only once the latest
    segment's extreme Ritz value has converged or, for a segment that closed, is no better
    than the k-th wanted value. The probes are Gaussian, not Rademacher, because that rule
    and the start rest on the probe having a nonzero component on every eigenvector, which a
    continuous law gives with probability 1 and a +-1 vector does not: on [[2, 1], [1, 2]] half
    the Rademacher starts are orthogonal to the top eigenvector, and on diag(5, 5, 5, 5, 1, ...)
    a restart probe could miss the last copy of 5 (measured before the change: top values 1,
    and [5, 5, 5, 1, 1] for [5, 5, 5, 5, 1], both reported converged).

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
        seed: the Gaussian stream (curvature_kernels.gaussian) of the start (and restart)
            vectors.
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
    # Products of extreme scale run as c A (curvature_product_scale); values are divided by c.
    scaled = ScaledProducts(op)
    run = _Krylov(scaled, bdtype, block_size, min(P, max_iter + block_size), seed,
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
        eigenvalues=torch.from_numpy(theta / scaled.factor),
        residuals=torch.from_numpy(resid / scaled.factor),
        converged=torch.from_numpy(converged.copy()),
        matvecs=op.matvecs - start, iterations=run.steps, method="lanczos",
        eigenvectors=vectors, tol=tol, restarts=run.restarts,
        full_reorthogonalizations=run.full_reorths)
    if not result.all_converged:
        warnings.warn(f"lanczos: {int((~converged).sum())} of k={k} Ritz values not converged "
                      f"after {result.matvecs} matvecs (max_iter={max_iter}, tol={tol:g}); "
                      f"largest residual {float(result.residuals.max()):.3g}",
                      RuntimeWarning, stacklevel=2)
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
        # Breakdown and exhaustion tests (curvature_orthogonality.decision_eps).
        self.eps_zero = decision_eps(op.dtype)
        self.full_reorths = 0  # steps that orthogonalized against the whole basis
        self.omega = OrthogonalityEstimate(self.eps, threshold=tol) if partial else None

    def _breakdown_norm(self) -> float:
        """A residual at most this is rounding noise (at the current ||A|| estimate)."""
        return _BREAKDOWN_ULPS * self.eps_zero * self.anorm

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
        """Append up to n Gaussian probes of the stream, orthonormalized against the basis
        (coupling 0 to the existing rows: a start or a restart); returns how many."""
        added = 0
        while added < n and self.count < self.limit:
            z = gaussian(self.op.shapes, 1, self.seed, first=self.next_probe,
                         dtype=self.op.dtype, device=self.op.device)
            self.next_probe += 1
            z = [t[0] for t in z]
            before = math.sqrt(_sq_norm(z))
            _orthogonalize_run(z, self.basis.rows, self.count, 2)
            norm = math.sqrt(_sq_norm(z))
            # A Gaussian probe left with less than sqrt(eps) of its norm lies numerically in the
            # span of the basis: the space is exhausted (count < P leaves a random probe a
            # component of norm ~ sqrt(P - count) outside, with probability 1).
            if norm <= math.sqrt(self.eps_zero) * before:
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
                                          min_norm=self._breakdown_norm())
                self.full_reorths += 1
                # ||A q||^2 = (coefficients on the local rows)^2 + ||residual||^2: the
                # breakdown scale (the components on older rows are at rounding level).
                self.anorm = max(self.anorm, math.sqrt(float(coef @ coef) + norm * norm))
            H[lo:hi, lo + c] = coef[lo - self.prev_lo:]
            res.append(w)
            norms.append(norm)
        D = H[lo:hi, lo:hi]
        H[lo:hi, lo:hi] = 0.5 * (D + D.T)
        thr = self._breakdown_norm()
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
                                 self._breakdown_norm())
        self.anorm = max(self.anorm, math.sqrt(float(coef @ coef) + norm * norm))
        thr = self._breakdown_norm()
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

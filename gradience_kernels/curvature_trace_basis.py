"""The growing orthonormal sketch basis of Hutch++ and XTrace: columns stored batch by batch
(``_Store``), block classical Gram-Schmidt of each new batch against it, reorthogonalized only
when one pass provably lost digits (``_extend_basis``), and the small helpers of their per-block
Gram matrices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .curvature_kernels import block_dots, block_gram, combine, orthogonalize_
from .curvature_orthogonality import decision_eps
from .curvature_trace_common import _F64, _small


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
    own norm (numerically in the span: an exactly low-rank A stops the basis at rank A; u of
    float32 for 16-bit columns, curvature_orthogonality.decision_eps);
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
    U, lams = _orthonormal_batch(X, norm0, 128 * decision_eps(Y[0].dtype), everything)
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

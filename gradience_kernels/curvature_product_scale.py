"""Products of an operator brought into the range where squared norms are representable.

The estimators reduce the products to dots and squared norms: sum_i w_i^2 under- or overflows
once the entries are far from 1 (float32 and bfloat16: |w_i| below ~1e-19 or above ~1e19,
float64: ~1e-154 / 1e154), and the torch and Triton paths accumulate float32 dots in float32.
Measured before this module: Lanczos took the underflowed norms of a float32 operator at
1e-21 for breakdowns and returned values off by 100x, 'converged'; XTrace returned trace 0
with stderr 0 for diag(1..2) * 1e-24 in float32; Hutch++ failed inside eigh at 1e19; float64
Hutchinson reported stderr 0 at 1e-165.

``ScaledProducts`` multiplies every product by one power of two c, chosen from the first
product so that its largest entry is ~1, and only when that entry lies outside [2^-40, 2^40]
(no operator in that range is touched: the results are bitwise those without the wrapper).
Multiplying by a power of two is exact (no rounding, unless a product has entries 2^-40 or
less of its largest, which fall to subnormals: they are below the products' own rounding), so
the estimators run on c A exactly, and their values in units of A (traces, standard errors,
eigenvalues, residuals, quadrature nodes) are divided by c, exactly again; everything relative
(rtol, tol, Ritz vectors, weights) is unchanged. c must be a finite number of the products'
dtype (at most 2^127 for float32). Once c != 1, every later product is checked too (one pass
over P entries, for such operators only): one whose scaled squared norm would overflow (the
first product was far smaller than the operator, e.g. a +-1 probe orthogonal to its large
part) is refused with a ValueError instead of a silently wrong result. A first product with a
NaN or Inf entry in any tensor is refused with a ValueError (it used to surface as LAPACK's
"dstebz failed" or eigh's "ill-conditioned" after the budget was spent); later products of an
operator of normal scale are not scanned (a pass over P entries per product, a few % of a
small model's HVP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .curvature_operators import CurvatureOperator

__all__ = ["ScaledProducts"]

# Largest entries in [2^-40, 2^40] are left alone: their squares and sums of up to 2^40 of them
# stay normal and finite in float32 (2^-126 .. 2^128).
_SAFE_LOG2 = 40


def _largest_entry(W: Sequence[torch.Tensor], which: str) -> float:
    """max |entry| over the list; a ValueError when some entry is NaN or Inf."""
    # One value per tensor, each checked: Python's max() drops a NaN that is not first.
    amaxes = [float(t.detach().abs().max()) for t in W if t.numel()]
    if not all(math.isfinite(a) for a in amaxes):
        raise ValueError(f"op: its {which} product has non-finite entries (largest |entry| per "
                         f"tensor {amaxes}): the operator is not finite at these parameters (a "
                         f"NaN or Inf loss, weight or input?)")
    return max(amaxes, default=0.0)


def _max_log2(dtype: torch.dtype) -> int:
    """The binary exponent e of the dtype's largest finite value, m 2^e with 0.5 <= m < 1
    (float32: 128, float64: 1024)."""
    return math.frexp(torch.finfo(dtype).max)[1]


def _overflow_log2(dtype: torch.dtype) -> int:
    """Largest binary exponent of an entry whose squares, summed over up to 2^24 entries, stay
    finite in `dtype` (float32: 52, float64: 500)."""
    return _max_log2(dtype) // 2 - 12


def _power_of_two_scale(amax: float, dtype: torch.dtype) -> float:
    """1.0, or the power of two that brings amax to [0.5, 1), within what `dtype` holds."""
    if amax == 0.0:
        return 1.0
    exponent = math.frexp(amax)[1]  # amax = m 2^e, 0.5 <= m < 1
    if -_SAFE_LOG2 <= exponent <= _SAFE_LOG2:
        return 1.0
    # c itself must be a finite number of the products' dtype (a float32 product of 1e-40
    # asked for 2^130, which the multiplication rounded to inf); the cap still brings such
    # products far into the safe range.
    top = _max_log2(dtype) - 1
    return math.ldexp(1.0, max(-top, min(top, -exponent)))


class ScaledProducts(CurvatureOperator):
    """c A for an operator A: its products times c (a power of two, 1.0 for operators of normal
    scale), c fixed at the first product. Counts are A's (``matvecs`` is A's counter), and
    other attributes are A's. ``unscale(x)`` = x / c. Products come back detached from autograd."""

    def __init__(self, op: CurvatureOperator):
        # The shapes, blocks and names are op's (already checked by op's constructor).
        self.inner = op
        self.shapes, self.dtype, self.device = op.shapes, op.dtype, op.device
        self.names, self.blocks = op.names, op.blocks
        self.numels, self.numel = op.numels, op.numel
        self.psd = op.psd
        self.scale: float | None = None

    @property
    def matvecs(self) -> int:
        return self.inner.matvecs

    @matvecs.setter
    def matvecs(self, value: int) -> None:
        self.inner.matvecs = value

    def __getattr__(self, name):
        # Only for names not found on the wrapper: a model operator's prepare(), method, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _scaled(self, W: list[torch.Tensor]) -> list[torch.Tensor]:
        # Detached: no estimator differentiates through its products (an operator whose matrix
        # requires grad made SLQ fail in .numpy() on its coefficients).
        W = [t.detach() for t in W]
        if self.scale is None:
            self.scale = _power_of_two_scale(_largest_entry(W, "first"), self.dtype)
        if self.scale == 1.0:
            return W
        out = [t * self.scale for t in W]  # new tensors: the operator's outputs stay as they are
        # Only operators of extreme scale pay this pass: c came from the first product, and a
        # first product far smaller than the operator (a probe exactly orthogonal to its large
        # part) would put the later ones out of range after scaling (XTrace returned 7e-18 for a
        # trace of 8192 before this check): refused rather than silently wrong.
        # (Products much smaller than the first are harmless: they add little to any sum.)
        amax = _largest_entry(out, "scaled")
        if amax > 0.0 and math.frexp(amax)[1] > _overflow_log2(self.dtype):
            raise ValueError(
                f"op: its products span too many powers of two: the first product's largest "
                f"entry, {0.5 / self.scale:.3g} to {1.0 / self.scale:.3g}, set the scale "
                f"factor, and this product's is {amax / self.scale:.3g}, whose squared norm "
                f"would overflow {self.dtype} after scaling; rescale the operator (e.g. the "
                f"loss) so that its products have entries near 1, or use another seed or a "
                f"larger batch_size (a probe orthogonal to the operator's large part)")
        return out

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # op's own single product (a model operator's may differ from a batch of one)
        out = self._scaled([t.unsqueeze(0) for t in self.inner.matvec(v)])
        return [t.squeeze(0) for t in out]

    def matmat(self, V: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._scaled(list(self.inner.matmat(V)))

    def _matmat(self, V: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.matmat(V)

    @property
    def factor(self) -> float:
        """c (1.0 before the first product)."""
        return 1.0 if self.scale is None else self.scale

    def unscale(self, x: float) -> float:
        """x / c: a value of c A's scale (trace, eigenvalue, residual) in A's."""
        return x / self.factor

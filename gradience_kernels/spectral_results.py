"""The result types of the spectral area: randomized SVD, singular values and ESDs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RandomizedSVDResult(NamedTuple):
    """A ~= U diag(S) V^T with ``rank`` columns; error_estimate bounds ||A - U diag(S) V^T||_2.

    Shapes for A of shape (..., m, n): U (..., m, rank), S (..., rank) descending, V (..., n,
    rank), error_estimate (...). dtype: the compute dtype (float32 or float64).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    error_estimate: torch.Tensor


class SpectrumResult(NamedTuple):
    """Singular values (float64, descending) of the matrices of a weight.

    ``singular_values``: (..., K) for a matrix or a batch (..., m, n); (kernel positions, K) for a
    conv weight (one row per (out, in) slice). K = min(m, n) (exact) or ``rank`` (approximate).
    ``shape``: (m, n) of each matrix (for a conv weight (out, in)). ``error_estimate``: None
    (exact) or the randomized bound on ||W - U S V^T||_2 per matrix (same leading shape as
    singular_values without K); by Weyl's inequality it bounds |s_i(approx) - s_i(W)| for every i.
    """

    singular_values: torch.Tensor
    shape: tuple[int, int]
    error_estimate: torch.Tensor | None


class ESDResult(NamedTuple):
    """Eigenvalues (float64, descending) of X = W^T W / N per weight, WeightWatcher conventions.

    ``eigenvalues``: (..., K) for a matrix or a batch; for a conv weight the kernel positions'
    values pooled into one vector of rf * K values. N = max(m, n), M = min(m, n) of each (out, in)
    matrix, rf the number of matrices pooled (kernel positions; 1 for a matrix), ``normalized``
    whether the eigenvalues are divided by N. ``error_estimate``: None (exact) or a bound on
    |lambda_i(approx) - lambda_i| per matrix: e (2 s_1 + e) / N (or without / N), with e the
    singular-value bound of ``SpectrumResult`` and s_1 the top computed singular value.
    """

    eigenvalues: torch.Tensor
    N: int
    M: int
    rf: int
    normalized: bool
    error_estimate: torch.Tensor | None

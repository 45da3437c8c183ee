"""Matrix metrics from a spectrum, and the Marchenko-Pastur bulk edge with its spikes (DESIGN 3.2).

Every function takes the singular values (or the eigenvalues of W^T W / N, or the squared singular
values) of matrices of one shape (m, n), batched over leading dims (..., K), and returns float64
tensors of the leading shape. They are O(K log K) arithmetic on the spectrum, device generic, with
no host sync except argument validation.

Notation: s_1 >= ... >= s_K >= 0 the singular values of W (m x n), N = max(m, n), M = min(m, n),
lambda_i = s_i^2 / N the eigenvalues of X = W^T W / N (the ESD of ``spectral.esd``), beta = M/N
(WeightWatcher's aspect ratio Q = N/M = 1/beta).

Marchenko-Pastur: for W with iid entries of variance sigma^2 the ESD converges to the MP law with
ratio beta and scale sigma^2, supported on sigma^2 [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]
(Marchenko & Pastur 1967); the bulk edge is lambda_+ = sigma^2 (1 + Q^-1/2)^2 as in Martin &
Mahoney (JMLR 2021, the MP edge; WeightWatcher's ``mp_fit``: bulk_max = (s1 (1 + 1/sqrt(Q)))^2).
sigma^2 is estimated by the median-based estimator of Gavish & Donoho (IEEE Trans. Inf. Theory
60(8), 2014, "The optimal hard threshold for singular values is 4/sqrt(3)", eq. for
sigma_hat = y_med / sqrt(n mu_beta)): sigma_hat^2 = median(lambda) / mu_beta with mu_beta the
median of the MP law of ratio beta and unit scale. A few spikes (r << M) move the median of the
M eigenvalues by about r/2 ranks only, so the estimate is robust to them, where fits of the
whole ESD (WeightWatcher fits a kernel density) are pulled by the spikes.

Spikes are the eigenvalues above lambda_+ plus a Tracy-Widom margin: for a pure-noise N x M
Gaussian matrix the largest eigenvalue of Z^T Z is mu_NM + sigma_NM TW1 with
mu = (sqrt(N-1) + sqrt(M))^2, sigma = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))^(1/3)
(Johnstone, Ann. Statist. 29(2), 2001, Thm 1.1), so the threshold
sigma_hat^2 (mu + t sigma) / N with t = 2.0234 (the 0.99 quantile of TW1) leaves a pure-noise
matrix with no spike 99% of the time; ``tw_margin=0`` counts eigenvalues above lambda_+ itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "SpectralMetrics",
    "MarchenkoPasturFit",
    "spectral_metrics",
    "marchenko_pastur_fit",
    "marchenko_pastur_cdf",
    "marchenko_pastur_median",
    "TW1_QUANTILE_99",
]

# the 0.99 quantile of the Tracy-Widom (beta = 1) law (Johnstone 2001, Table 1; a 4000-draw
# Wishart 400 x 100 simulation here gave 2.10, mean -1.24, sd 1.28 against -1.21 and 1.27)
TW1_QUANTILE_99 = 2.0234

_KINDS = ("singular", "eigenvalues", "squared")


class MarchenkoPasturFit(NamedTuple):
    """MP fit of a spectrum (all float64 tensors of the batch shape; eigenvalue units of
    X = W^T W / N). sigma2: Gavish-Donoho median estimate of the entry variance; bulk_edge:
    lambda_+ = sigma2 (1 + sqrt(beta))^2; bulk_min: sigma2 (1 - sqrt(beta))^2;
    spike_threshold: lambda_+ with the Tracy-Widom margin; num_spikes (int64): eigenvalues above
    spike_threshold. NaN / -1 where the spectrum is incomplete (fewer than M values)."""

    sigma2: torch.Tensor
    bulk_edge: torch.Tensor
    bulk_min: torch.Tensor
    spike_threshold: torch.Tensor
    num_spikes: torch.Tensor


class SpectralMetrics(NamedTuple):
    """Metrics of matrices from their singular values (float64 tensors of the batch shape).

    spectral_norm s_1; frobenius_norm sqrt(sum s_i^2); nuclear_norm sum s_i; stable_rank
    ||W||_F^2 / ||W||_2^2; effective_rank exp(-sum p_i log p_i), p_i = s_i / sum s_j (Roy &
    Vetterli 2007; 0 log 0 = 0); condition_number s_1 / s_M (inf when s_M = 0); numerical_rank
    (int64) #{s_i > max(m, n) eps s_1} (numpy.linalg.matrix_rank's tolerance); log10_spectral_norm
    log10 s_1; mp: the ``MarchenkoPasturFit``. For the zero matrix stable and effective rank are 0
    (its rank). ``complete``: whether all M = min(m, n) singular values were given; if not (a
    top-r spectrum from randomized SVD) the norms and ranks are those of the given values (lower
    bounds of the matrix's), condition_number is NaN and the MP fit NaN / -1.
    """

    spectral_norm: torch.Tensor
    frobenius_norm: torch.Tensor
    nuclear_norm: torch.Tensor
    stable_rank: torch.Tensor
    effective_rank: torch.Tensor
    condition_number: torch.Tensor
    numerical_rank: torch.Tensor
    log10_spectral_norm: torch.Tensor
    mp: MarchenkoPasturFit
    complete: bool


# --------------------------------------------------------------------------- Marchenko-Pastur law
def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got beta={beta!r}")
    return float(beta)


def _mp_cdf_angle(t0: float, beta: float) -> float:
    """F(x) of the unit-scale MP law of ratio beta at x = 1 + beta + 2 sqrt(beta) cos t0.

    With x = m + h cos t (m = 1 + beta, h = 2 sqrt(beta)) the density
    f(x) = sqrt((b - x)(x - a)) / (2 pi beta x) becomes (2/pi) sin^2 t / (m + h cos t) dt, and
    sin^2 t / (m + h cos t) = m/h^2 - cos t / h - ((1-beta)^2 / (4 beta)) / (m + h cos t), whose
    last term integrates to (2/(1-beta)) atan(c tan(t/2)), c = (1 - sqrt beta)/(1 + sqrt beta).
    Collecting terms,
    F = (2/pi) [ (2 at - t0)/(4 beta) + (2 pi - t0 - 2 at)/4 + sin t0/(2 sqrt beta) ]
    with at = atan(c tan(t0/2)); 2 at - t0 = -2 atan(y), y = 2 sqrt(beta) T / ((1 + sqrt beta)
    (1 + c T^2)), T = tan(t0/2), is evaluated without the cancellation of at against t0/2, so the
    absolute error is O(eps / sqrt(beta)) (the first and last terms still cancel to O(1)).
    """
    sb = math.sqrt(beta)
    c = (1.0 - sb) / (1.0 + sb)
    sh, ch = math.sin(t0 / 2), math.cos(t0 / 2)
    at = math.atan2(c * sh, ch)                                  # atan(c tan(t0/2)), t0 in [0, pi]
    half_diff = math.atan2(2.0 * sb * sh * ch, (1.0 + sb) * (ch * ch + c * sh * sh))
    integral = (-half_diff / (2.0 * beta) + (2.0 * math.pi - t0 - 2.0 * at) / 4.0
                + math.sin(t0) / (2.0 * sb))
    return min(1.0, max(0.0, 2.0 / math.pi * integral))


def marchenko_pastur_cdf(x: float, beta: float) -> float:
    """CDF of the Marchenko-Pastur law of ratio beta in (0, 1] and unit scale (the limit ESD of
    Z^T Z / N for Z N x M with iid unit-variance entries, beta = M/N), in closed form; absolute
    accuracy O(eps / sqrt(beta))."""
    beta = _check_beta(beta)
    sb = math.sqrt(beta)
    a, b = (1 - sb) ** 2, (1 + sb) ** 2
    if x <= a:
        return 0.0
    if x >= b:
        return 1.0
    cos_t = min(1.0, max(-1.0, (x - (1 + beta)) / (2 * sb)))
    return _mp_cdf_angle(math.acos(cos_t), beta)


@functools.lru_cache(maxsize=1024)
def marchenko_pastur_median(beta: float) -> float:
    """Median mu_beta of the unit-scale Marchenko-Pastur law of ratio beta in (0, 1]: bisection
    on the closed-form CDF in the angle variable (F decreases in t0). The CDF's O(eps/sqrt(beta))
    error moves the root by that divided by the density there, which is ~ 1/sqrt(beta): the
    median is accurate to O(eps) for every beta."""
    beta = _check_beta(beta)
    lo, hi = 0.0, math.pi  # F(angle 0) = 1 (upper edge), F(angle pi) = 0 (lower edge)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _mp_cdf_angle(mid, beta) > 0.5:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return 1.0 + beta + 2.0 * math.sqrt(beta) * math.cos(t)


# --------------------------------------------------------------------------- argument handling
def _shape(shape, name: str = "shape") -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"{name} must be (m, n) with positive ints, got {name}={shape!r}")
    return int(shape[0]), int(shape[1])


def _singular_values(values, shape, values_are: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Float64 singular values, descending, (..., K), validated; and the shape."""
    from .spectral import SpectrumResult  # local: spectral does not import this module

    if isinstance(values, SpectrumResult):
        if shape is not None and tuple(shape) != tuple(values.shape):
            raise ValueError(f"shape={shape!r} contradicts the SpectrumResult's shape "
                             f"{values.shape}")
        shape, values, values_are = values.shape, values.singular_values, "singular"
    if shape is None:
        raise ValueError("shape: the matrix shape (m, n) is required with a tensor of values")
    m, n = _shape(shape)
    if values_are not in _KINDS:
        raise ValueError(f"values_are must be one of {_KINDS}, got values_are={values_are!r}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a tensor, got {type(values).__name__}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"values: expected a float dtype, got dtype={values.dtype}")
    if values.dim() < 1 or values.shape[-1] == 0 or values.numel() == 0:
        raise ValueError(f"values: expected (..., K) with K >= 1, got shape={tuple(values.shape)}")
    K = values.shape[-1]
    if K > min(m, n):
        raise ValueError(f"values: K = {K} values for a {m} x {n} matrix, which has at most "
                         f"min(m, n) = {min(m, n)} singular values")
    v = values.detach().to(torch.float64)
    lo, hi = torch.aminmax(v.reshape(-1))
    lo, hi = float(lo), float(hi)  # one host sync: validation before any work
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("values: non-finite entries are not allowed")
    # eigenvalues from an eigensolver can be slightly negative by rounding: up to
    # max(m, n) eps(dtype) lambda_max that is a zero; below it is an error.
    tol = max(m, n) * torch.finfo(values.dtype).eps * max(hi, 0.0)
    if lo < -tol or (values_are == "singular" and lo < 0):
        raise ValueError(f"values: {values_are} values must be >= 0, got min={lo!r}")
    v = v.clamp_min(0.0)
    v = torch.sort(v, dim=-1, descending=True).values
    N = max(m, n)
    if values_are == "eigenvalues":
        v = torch.sqrt(v * N)
    elif values_are == "squared":
        v = torch.sqrt(v)
    return v, (m, n)


# --------------------------------------------------------------------------- metrics
def marchenko_pastur_fit(values, shape: Sequence[int] | None = None, *,
                         values_are: str = "eigenvalues",
                         tw_margin: float = TW1_QUANTILE_99) -> MarchenkoPasturFit:
    """Marchenko-Pastur bulk edge and spike count of spectra (..., M) of matrices of shape (m, n).

    values: by default eigenvalues of W^T W / N (``esd``); ``values_are="singular"`` for singular
    values, "squared" for s_i^2; or a ``SpectrumResult``. Estimator (module docstring): sigma2 =
    median(lambda) / mu_beta (Gavish & Donoho 2014), bulk_edge = sigma2 (1 + sqrt(beta))^2
    (Martin & Mahoney 2021), num_spikes = #{lambda_i > sigma2 (mu_NM + tw_margin sigma_NM) / N}
    (Johnstone 2001 centring and scaling; tw_margin 2.0234 = TW1 0.99 quantile, 0 = the bare
    edge). The median is numpy's (mean of the two middle values for even M).
    """
    s, (m, n) = _singular_values(values, shape, values_are)
    return _mp_fit(s, m, n, _check_margin(tw_margin))


def _check_margin(tw_margin) -> float:
    if isinstance(tw_margin, bool) or not isinstance(tw_margin, (int, float)) or not math.isfinite(
            tw_margin):
        raise ValueError(f"tw_margin must be a finite number, got tw_margin={tw_margin!r}")
    return float(tw_margin)


def _mp_fit(s: torch.Tensor, m: int, n: int, tw_margin: float) -> MarchenkoPasturFit:
    N, M = max(m, n), min(m, n)
    batch = s.shape[:-1]
    if s.shape[-1] < M:
        nan = torch.full(batch, math.nan, dtype=torch.float64, device=s.device)
        return MarchenkoPasturFit(nan, nan, nan, nan,
                                  torch.full(batch, -1, dtype=torch.int64, device=s.device))
    beta = M / N
    lam = s * s / N
    sigma2 = torch.quantile(lam, 0.5, dim=-1) / marchenko_pastur_median(beta)
    sb = math.sqrt(beta)
    edge = sigma2 * (1 + sb) ** 2
    bulk_min = sigma2 * (1 - sb) ** 2
    n1 = max(N - 1, 1)  # Johnstone's n - 1 (N = 1 is a 1 x 1 matrix: no bulk to speak of)
    mu = (math.sqrt(n1) + math.sqrt(M)) ** 2
    sd = (math.sqrt(n1) + math.sqrt(M)) * (1 / math.sqrt(n1) + 1 / math.sqrt(M)) ** (1.0 / 3.0)
    threshold = sigma2 * ((mu + tw_margin * sd) / N)
    spikes = (lam > threshold.unsqueeze(-1)).sum(dim=-1)
    return MarchenkoPasturFit(sigma2, edge, bulk_min, threshold, spikes)


def spectral_metrics(values, shape: Sequence[int] | None = None, *,
                     values_are: str = "singular", dtype: torch.dtype | None = None,
                     tw_margin: float = TW1_QUANTILE_99) -> SpectralMetrics:
    """Metrics (``SpectralMetrics``) of matrices of shape (m, n) from their spectra (..., K).

    values: singular values (default), ``values_are="eigenvalues"`` for eigenvalues of W^T W / N
    (``esd(normalize=True)``) or "squared" for s_i^2 (``esd(normalize=False)``, WeightWatcher's
    evals), in any order; or a ``SpectrumResult`` (shape taken from it; a conv weight's result
    gives one row of metrics per kernel position). K < min(m, n) is a truncated spectrum (see
    ``SpectralMetrics.complete``). ``dtype``: the precision whose eps sets the numerical-rank
    tolerance max(m, n) eps s_1 (default: the dtype of ``values``, as numpy.linalg.matrix_rank
    uses its singular values' dtype; pass the weight's dtype to judge rank at its precision).
    ``tw_margin``: see ``marchenko_pastur_fit``. Float64 results of the batch shape.
    """
    in_dtype = values.singular_values.dtype if hasattr(values, "singular_values") else getattr(
        values, "dtype", None)
    s, (m, n) = _singular_values(values, shape, values_are)
    tw = _check_margin(tw_margin)
    if dtype is None:
        dtype = in_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a float torch.dtype, got dtype={dtype!r}")
    eps = torch.finfo(dtype).eps
    M = min(m, n)
    complete = s.shape[-1] == M

    s1 = s[..., 0]
    nonzero = s1 > 0
    safe1 = torch.where(nonzero, s1, torch.ones_like(s1))
    r = s / safe1.unsqueeze(-1)                       # scaled: no overflow/underflow of squares
    sum_r2 = (r * r).sum(dim=-1)
    stable_rank = torch.where(nonzero, sum_r2, torch.zeros_like(s1))
    frobenius = s1 * torch.sqrt(sum_r2)
    nuclear = s.sum(dim=-1)
    p = r / r.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))),
                        torch.zeros_like(p))
    effective_rank = torch.where(nonzero, torch.exp(-plogp.sum(dim=-1)), torch.zeros_like(s1))
    s_min = s[..., -1]
    if complete:
        safe_min = torch.where(s_min > 0, s_min, torch.ones_like(s_min))
        condition = torch.where(s_min > 0, s1 / safe_min, torch.full_like(s1, math.inf))
    else:
        condition = torch.full_like(s1, math.nan)
    tol = max(m, n) * eps * s1
    numerical_rank = (s > tol.unsqueeze(-1)).sum(dim=-1)
    log10_sn = torch.log10(s1)
    mp = _mp_fit(s, m, n, tw)
    return SpectralMetrics(s1, frobenius, nuclear, stable_rank, effective_rank, condition,
                           numerical_rank, log10_sn, mp, complete)

"""Parametric fits of the tail: the generalized Pareto distribution (GPD) on the exceedances
over X(k+1), by maximum likelihood.

Every fit reads the threshold from the fused tail op and then only the k exceedances (bounded
memory, see ``_sample.exceedances``); it returns Python floats (a fit is a procedure that reads
its result on the host, not a hot-path op).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _sample
from .tail import TensorOrList, _as_sample, _k_arguments, float64_quantiles, tail_stats

__all__ = ["GPDFit", "StableFit", "fit_gpd", "fit_stable", "gpd_mle", "stable_from_quantiles"]


class GPDFit(NamedTuple):
    """GPD fit of the exceedances y = |x| - u over u = X(k+1).

    Density (1/sigma) (1 + xi y / sigma)^(-1/xi - 1) (xi = 0: the exponential). ``xi`` is the
    extreme-value index gamma (xi > 0: power law with alpha = 1/xi). Standard errors from the
    inverse Fisher information, valid for xi > -1/2: var(xi) = (1 + xi)^2 / k_used,
    var(sigma) = 2 sigma^2 (1 + xi) / k_used.
    """

    xi: float
    sigma: float
    threshold: float
    k: int  # the k asked for
    n_exceedances: int  # entries strictly above the threshold (k minus ties at X(k+1))
    log_likelihood: float
    xi_stderr: float
    sigma_stderr: float


def _profile_terms(theta: float, y: np.ndarray) -> float:
    """S(theta) = sum log(1 + theta y), accurate for small |theta y| (log1p)."""
    return float(np.sum(np.log1p(theta * y)))


def _gpd_loglik(xi: float, sigma: float, y: np.ndarray) -> float:
    if sigma <= 0:
        return -math.inf
    z = xi * y / sigma
    if np.any(z <= -1):
        return -math.inf
    if xi == 0.0:
        return float(-y.size * math.log(sigma) - np.sum(y) / sigma)
    return float(-y.size * math.log(sigma) - (1.0 / xi + 1.0) * np.sum(np.log1p(z)))


def gpd_mle(y: np.ndarray) -> tuple[float, float, float]:
    """Maximum-likelihood (xi, sigma, log-likelihood) of a GPD with location 0 for y > 0.

    Profile likelihood in theta = xi / sigma (Grimshaw 1993): for fixed theta the MLE is
    xi(theta) = S(theta)/k with S(theta) = sum log(1 + theta y_i), and the profile
    l(theta) = -k log(S(theta) / (k theta)) - S(theta) - k (theta -> 0: the exponential,
    sigma = mean(y)). theta ranges over (-1/max(y), inf); l is maximised by a bracketed
    one-dimensional search on a log scale of each sign, then polished by Brent's method.

    Reference: S. D. Grimshaw, "Computing maximum likelihood estimates for the generalized
    Pareto distribution", Technometrics 35 (1993) 185-191.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or y.size < 2:
        raise ValueError(f"gpd_mle needs at least 2 exceedances, got {y.size}")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("gpd_mle needs finite exceedances y > 0")
    k = y.size
    y_max = float(y.max())
    mean = float(y.mean())
    exp_loglik = -k * math.log(mean) - k

    def profile(theta: float) -> float:
        if theta == 0.0:
            return exp_loglik
        s = _profile_terms(theta, y)
        xi = s / k
        if xi == 0.0:
            return exp_loglik
        sigma = xi / theta
        if sigma <= 0:
            return -math.inf
        return -k * math.log(sigma) - s - k

    # Candidates on a log grid of each sign (theta in units of 1/y_max), then Brent between the
    # neighbours of the best grid point.
    # theta y_max in (-1, 0): 1 - 10^-12 ... 10^-8 below zero; above zero 10^-8 ... 10^8.
    neg = -(1.0 - np.logspace(-12, 0, 121, endpoint=False)) / y_max
    neg = np.concatenate([neg, -np.logspace(-1, -8, 71) / y_max])
    pos = np.logspace(-8, 8, 161) / y_max
    grid = np.unique(np.concatenate([neg, [0.0], pos]))
    values = np.array([profile(float(t)) for t in grid])
    best = int(np.nanargmax(values))
    lo = grid[max(best - 1, 0)]
    hi = grid[min(best + 1, grid.size - 1)]
    if lo < hi:
        from scipy import optimize  # imported on use: the package itself needs no SciPy

        res = optimize.minimize_scalar(lambda t: -profile(t), bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-12 * (hi - lo), "maxiter": 500})
        theta = float(res.x) if -res.fun >= values[best] else float(grid[best])
    else:
        theta = float(grid[best])
    if theta == 0.0:
        return 0.0, mean, exp_loglik
    xi = _profile_terms(theta, y) / k
    sigma = xi / theta
    return xi, sigma, _gpd_loglik(xi, sigma, y)


def fit_gpd(x: TensorOrList, k: int | None = None, *, k_ratio: float | None = None,
            process_group=None) -> GPDFit:
    """Generalized Pareto fit (MLE, location 0) of the exceedances of |x| over u = X(k+1).

    The exceedances are y_i = X(i) - u for the X(i) > u among the top k (entries tied with u are
    not exceedances). Same estimates as ``scipy.stats.genpareto.fit(y, floc=0)`` (which runs a
    Nelder-Mead search of the same likelihood), to that optimiser's tolerance.
    ``process_group``: the threshold from merged histograms, then the exceedances of every
    process (O(k) values) are gathered for the fit.

    Reference: J. Pickands III, "Statistical inference using extreme order statistics", Ann.
    Statist. 3 (1975) 119-131 (the GPD as the limit law of exceedances); Grimshaw (1993).
    """
    ks, ratios = _k_arguments(k, k_ratio)
    xs = _as_sample(x)
    rows, _ = tail_stats(xs, ks, ratios, process_group=process_group)
    kk = int(rows[0, 0].item())
    u = float(rows[0, 1].item())
    top = _sample.exceedances(xs, u).numpy()
    if process_group is not None:
        # The k exceedances (the fit's input, O(k)) from every process; never the data.
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(parts, top, group=process_group)
        top = np.sort(np.concatenate(parts))[::-1]
    y = top - u
    if y.size < 2:
        raise ValueError(
            f"fit_gpd needs at least 2 exceedances (values above X(k+1)={u}) for k={kk}, got "
            f"{y.size} (entries tied with X(k+1) are not exceedances)")
    xi, sigma, loglik = gpd_mle(y)
    n_used = y.size
    return GPDFit(
        xi=xi,
        sigma=sigma,
        threshold=u,
        k=kk,
        n_exceedances=n_used,
        log_likelihood=loglik,
        xi_stderr=(1.0 + xi) / math.sqrt(n_used) if xi > -0.5 else math.nan,
        sigma_stderr=sigma * math.sqrt(2.0 * (1.0 + xi) / n_used) if xi > -0.5 else math.nan,
    )


# --------------------------------------------------------------------------- stable (McCulloch)
# McCulloch (1986), tables III-V and VII: published values of the quantile ratios' inverse maps.
# Tables III/IV: alpha = psi_1(nu_alpha, nu_beta), beta = psi_2(nu_alpha, nu_beta); rows follow
# _NU_ALPHA, columns _NU_BETA.
_NU_ALPHA = np.array([2.439, 2.5, 2.6, 2.7, 2.8, 3, 3.2, 3.5, 4, 5, 6, 8, 10, 15, 25])
_NU_BETA = np.array([0, 0.1, 0.2, 0.3, 0.5, 0.7, 1])
_PSI1 = np.array([
    [2.000, 2.000, 2.000, 2.000, 2.000, 2.000, 2.000],
    [1.916, 1.924, 1.924, 1.924, 1.924, 1.924, 1.924],
    [1.808, 1.813, 1.829, 1.829, 1.829, 1.829, 1.829],
    [1.729, 1.730, 1.737, 1.745, 1.745, 1.745, 1.745],
    [1.664, 1.663, 1.663, 1.668, 1.676, 1.676, 1.676],
    [1.563, 1.560, 1.553, 1.548, 1.547, 1.547, 1.547],
    [1.484, 1.480, 1.471, 1.460, 1.448, 1.438, 1.438],
    [1.391, 1.386, 1.378, 1.364, 1.337, 1.318, 1.318],
    [1.279, 1.273, 1.266, 1.250, 1.210, 1.184, 1.150],
    [1.128, 1.121, 1.114, 1.101, 1.067, 1.027, 0.973],
    [1.029, 1.021, 1.014, 1.004, 0.974, 0.935, 0.874],
    [0.896, 0.892, 0.884, 0.883, 0.855, 0.823, 0.769],
    [0.818, 0.812, 0.806, 0.801, 0.780, 0.756, 0.691],
    [0.698, 0.695, 0.692, 0.689, 0.676, 0.656, 0.597],
    [0.593, 0.590, 0.588, 0.586, 0.579, 0.563, 0.513]])
_PSI2 = np.array([
    [0, 2.160, 1.000, 1.000, 1.000, 1.000, 1.000],
    [0, 1.592, 3.390, 1.000, 1.000, 1.000, 1.000],
    [0, 0.759, 1.800, 1.000, 1.000, 1.000, 1.000],
    [0, 0.482, 1.048, 1.694, 1.000, 1.000, 1.000],
    [0, 0.360, 0.760, 1.232, 2.229, 1.000, 1.000],
    [0, 0.253, 0.518, 0.823, 1.575, 1.000, 1.000],
    [0, 0.203, 0.410, 0.632, 1.244, 1.906, 1.000],
    [0, 0.165, 0.332, 0.499, 0.943, 1.560, 1.000],
    [0, 0.136, 0.271, 0.404, 0.689, 1.230, 2.195],
    [0, 0.109, 0.216, 0.323, 0.539, 0.827, 1.917],
    [0, 0.096, 0.190, 0.284, 0.472, 0.693, 1.759],
    [0, 0.082, 0.163, 0.243, 0.412, 0.601, 1.596],
    [0, 0.074, 0.147, 0.220, 0.377, 0.546, 1.482],
    [0, 0.064, 0.128, 0.191, 0.330, 0.478, 1.362],
    [0, 0.056, 0.112, 0.167, 0.285, 0.428, 1.274]])
# Tables V/VII: nu_c = phi_3(alpha, beta), nu_zeta = phi_5(alpha, beta); rows follow _ALPHA
# (ascending), columns _BETA.
_ALPHA = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2])
_BETA = np.array([0, 0.25, 0.5, 0.75, 1])
_PHI3 = np.array([
    [2.588, 3.073, 4.534, 6.636, 9.144],
    [2.337, 2.634, 3.542, 4.808, 6.247],
    [2.189, 2.392, 3.004, 3.844, 4.775],
    [2.098, 2.244, 2.676, 3.265, 3.912],
    [2.040, 2.149, 2.461, 2.886, 3.356],
    [2.000, 2.085, 2.311, 2.624, 2.973],
    [1.980, 2.040, 2.205, 2.435, 2.696],
    [1.965, 2.007, 2.125, 2.294, 2.491],
    [1.955, 1.984, 2.067, 2.188, 2.333],
    [1.946, 1.967, 2.022, 2.106, 2.211],
    [1.939, 1.952, 1.988, 2.045, 2.116],
    [1.933, 1.940, 1.962, 1.997, 2.043],
    [1.927, 1.930, 1.943, 1.961, 1.987],
    [1.921, 1.922, 1.927, 1.936, 1.947],
    [1.914, 1.915, 1.916, 1.918, 1.921],
    [1.908, 1.908, 1.908, 1.908, 1.908]])
_PHI5 = np.array([
    [0, -0.061, -0.279, -0.659, -1.198],
    [0, -0.078, -0.272, -0.581, -0.997],
    [0, -0.089, -0.262, -0.520, -0.853],
    [0, -0.096, -0.250, -0.469, -0.742],
    [0, -0.099, -0.237, -0.424, -0.652],
    [0, -0.098, -0.223, -0.380, -0.576],
    [0, -0.095, -0.208, -0.346, -0.508],
    [0, -0.090, -0.192, -0.310, -0.447],
    [0, -0.084, -0.173, -0.276, -0.390],
    [0, -0.075, -0.154, -0.241, -0.335],
    [0, -0.066, -0.134, -0.206, -0.283],
    [0, -0.056, -0.111, -0.170, -0.232],
    [0, -0.043, -0.088, -0.132, -0.179],
    [0, -0.030, -0.061, -0.092, -0.123],
    [0, -0.017, -0.032, -0.049, -0.064],
    [0, 0.000, 0.000, 0.000, 0.000]])


def _bilinear(rows: np.ndarray, cols: np.ndarray, table: np.ndarray, r: float, c: float) -> float:
    """Bilinear interpolation of table[rows, cols] at (r, c), clamped to the grid."""
    r = min(max(r, rows[0]), rows[-1])
    c = min(max(c, cols[0]), cols[-1])
    i = int(np.clip(np.searchsorted(rows, r, side="right") - 1, 0, rows.size - 2))
    j = int(np.clip(np.searchsorted(cols, c, side="right") - 1, 0, cols.size - 2))
    tr = (r - rows[i]) / (rows[i + 1] - rows[i])
    tc = (c - cols[j]) / (cols[j + 1] - cols[j])
    return float((1 - tr) * (1 - tc) * table[i, j] + (1 - tr) * tc * table[i, j + 1]
                 + tr * (1 - tc) * table[i + 1, j] + tr * tc * table[i + 1, j + 1])


class StableFit(NamedTuple):
    """McCulloch quantile estimates of alpha-stable parameters, S1 parameterisation
    (scipy.stats.levy_stable's default): characteristic exponent alpha in (0, 2], skewness beta
    in [-1, 1], location ``loc`` and ``scale``; plus the five sample quantiles used."""

    alpha: float
    beta: float
    loc: float
    scale: float
    quantiles: tuple[float, float, float, float, float]  # q = 0.05, 0.25, 0.5, 0.75, 0.95


def stable_from_quantiles(q05: float, q25: float, q50: float, q75: float, q95: float) -> StableFit:
    """McCulloch's estimator from the 5/25/50/75/95% quantiles.

    nu_alpha = (q95 - q05)/(q75 - q25), nu_beta = (q95 + q05 - 2 q50)/(q95 - q05);
    alpha = psi_1(nu_alpha, |nu_beta|), beta = sign(nu_beta) psi_2(nu_alpha, |nu_beta|)
    (alpha = 2, beta = sign(nu_beta) below the table's nu_alpha = 2.439);
    scale c = (q75 - q25)/phi_3(alpha, |beta|), zeta = q50 + c sign(beta) phi_5(alpha, |beta|),
    loc = zeta - beta c tan(pi alpha / 2) for alpha != 1 (S1). Tables interpolated bilinearly and
    clamped to their grids, as scipy.stats.levy_stable._fitstart does.

    Reference: J. H. McCulloch, "Simple consistent estimators of stable distribution
    parameters", Commun. Statist. Simul. Comput. 15 (1986) 1109-1136.
    """
    nu_alpha = (q95 - q05) / (q75 - q25)
    nu_beta = (q95 + q05 - 2 * q50) / (q95 - q05)
    sign_nb = 1.0 if nu_beta > 0 else -1.0
    if nu_alpha >= _NU_ALPHA[0]:
        eps = float(np.finfo(float).eps)
        alpha = min(max(_bilinear(_NU_ALPHA, _NU_BETA, _PSI1, nu_alpha, abs(nu_beta)), eps), 2.0)
        beta = min(max(sign_nb * _bilinear(_NU_ALPHA, _NU_BETA, _PSI2, nu_alpha, abs(nu_beta)),
                       -1.0), 1.0)
        if nu_beta == 0:
            beta = 0.0
    else:
        alpha = 2.0
        beta = float(np.sign(nu_beta))
    sign_b = 1.0 if beta > 0 else -1.0
    c = (q75 - q25) / _bilinear(_ALPHA, _BETA, _PHI3, alpha, abs(beta))
    zeta = q50 + c * sign_b * _bilinear(_ALPHA, _BETA, _PHI5, alpha, abs(beta))
    loc = zeta - beta * c * math.tan(math.pi * alpha / 2.0) if alpha != 1.0 else zeta
    return StableFit(alpha=alpha, beta=beta, loc=loc, scale=c,
                     quantiles=(q05, q25, q50, q75, q95))


def fit_stable(x: TensorOrList, *, process_group=None) -> StableFit:
    """alpha-stable parameters of the values of x (signed) by McCulloch's quantile method.

    The five quantiles come from the exact order-statistics op (no sort, any size), so the
    estimates equal scipy.stats.levy_stable._fitstart on the same data (up to rounding).
    ``process_group``: the fit of the union of every process's x (merged histograms).
    """
    xs = _as_sample(x)
    n = sum(t.numel() for t in xs)
    if n < 2 and process_group is None:
        raise ValueError(f"fit_stable needs at least 2 values, got {n}")
    q05, q25, q50, q75, q95 = float64_quantiles(xs, (0.05, 0.25, 0.5, 0.75, 0.95), "linear",
                                                process_group)
    if not all(math.isfinite(v) for v in (q05, q25, q50, q75, q95)):
        raise ValueError("fit_stable: the sample holds NaN (its quantiles are NaN)")
    if q75 == q25 or q95 == q05:
        raise ValueError(
            f"fit_stable: degenerate quantiles (q25={q25}, q75={q75}, q05={q05}, q95={q95})")
    return stable_from_quantiles(q05, q25, q50, q75, q95)

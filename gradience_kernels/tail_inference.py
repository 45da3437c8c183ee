"""Confidence intervals of the tail estimators and the likelihood-ratio test of a power law
against an exponential tail, on the exceedances over a threshold.

Intervals are asymptotic (normal) at the estimator's own standard error; the likelihood-ratio
test is Vuong's normalised test as used by Clauset, Shalizi and Newman (2009).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from .tail import _moment_variance

__all__ = ["Interval", "LikelihoodRatio", "hill_interval", "moment_interval",
           "power_law_vs_exponential", "normal_quantile"]


class Interval(NamedTuple):
    """A two-sided confidence interval [low, high] at confidence ``level``."""

    low: float
    high: float
    level: float


class LikelihoodRatio(NamedTuple):
    """Vuong's test of a power law against an exponential on the same exceedances.

    ``ratio`` = R = sum of log-likelihood differences (power law minus exponential): R > 0
    favours the power law. ``z`` = R / (sigma sqrt(n)) with sigma the standard deviation of the
    pointwise differences; ``p_value`` = erfc(|z| / sqrt 2), the probability of |z| at least as
    large if both fit equally well (small p: the sign of R is significant).
    """

    ratio: float
    z: float
    p_value: float
    n: int
    alpha: float  # the power law's tail index (density exponent alpha + 1) above the threshold
    rate: float  # the exponential's rate above the threshold


def normal_quantile(level: float) -> float:
    """z with P(|Z| <= z) = level for a standard normal Z."""
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got level={level!r}")
    from scipy import stats  # imported on use: the package itself needs no SciPy

    return float(stats.norm.ppf(0.5 + level / 2.0))


def _as_float(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def hill_interval(alpha, k, level: float = 0.95) -> Interval:
    """Interval for the tail index alpha from a Hill estimate at k.

    k gamma_hat / gamma is asymptotically normal with mean k and variance k (exactly Gamma(k, 1)
    for a Pareto sample), so gamma lies in gamma_hat (1 +- z / sqrt k) and alpha = 1/gamma in the
    inverted interval; the upper end is +inf when z >= sqrt k.

    Reference: B. M. Hill (1975); P. Hall, "On some simple estimates of an exponent of regular
    variation", J. R. Statist. Soc. B 44 (1982) 37-42 (asymptotic normality).
    """
    z = normal_quantile(level)
    a = _as_float(alpha)
    kk = _as_float(k)
    if kk < 1:
        raise ValueError(f"k must be >= 1, got k={kk}")
    gamma = 1.0 / a
    lo_gamma = gamma * (1.0 - z / math.sqrt(kk))
    hi_gamma = gamma * (1.0 + z / math.sqrt(kk))
    return Interval(low=1.0 / hi_gamma, high=(1.0 / lo_gamma) if lo_gamma > 0 else math.inf,
                    level=level)


def moment_variance(gamma: float) -> float:
    """Asymptotic variance of sqrt(k) (gamma_M - gamma) (Dekkers, Einmahl, de Haan 1989):
    1 + gamma^2 for gamma >= 0; (1-g)^2 (1-2g) (1-g+6g^2) / ((1-3g)(1-4g)) for g < 0 (the
    formula of MomentResult.stderr, evaluated on a float)."""
    return float(_moment_variance(torch.tensor(float(gamma), dtype=torch.float64)))


def moment_interval(gamma, k, level: float = 0.95) -> Interval:
    """Interval gamma_M +- z sqrt(v(gamma_M) / k) for the moment estimator (either sign)."""
    z = normal_quantile(level)
    g = _as_float(gamma)
    kk = _as_float(k)
    if kk < 1:
        raise ValueError(f"k must be >= 1, got k={kk}")
    half = z * math.sqrt(moment_variance(g) / kk)
    return Interval(low=g - half, high=g + half, level=level)


def power_law_vs_exponential(exceedances: np.ndarray, threshold: float) -> LikelihoodRatio:
    """Vuong's normalised likelihood-ratio test on the values x > threshold.

    Power law (continuous Pareto above u): p(x) = (a / u) (x / u)^(-a-1), a = n / sum log(x/u)
    (the Hill estimate). Exponential above u: p(x) = lam exp(-lam (x - u)), lam = 1/mean(x - u).

    Reference: A. Clauset, C. R. Shalizi, M. E. J. Newman, "Power-law distributions in empirical
    data", SIAM Review 51 (2009) 661-703, section 5; Q. H. Vuong, Econometrica 57 (1989) 307-333.
    """
    x = np.asarray(exceedances, dtype=np.float64)
    u = float(threshold)
    if not u > 0:
        raise ValueError(f"threshold must be > 0, got threshold={u}")
    if x.size < 2:
        raise ValueError(f"the test needs at least 2 exceedances, got {x.size}")
    log_ratio = np.log(x / u)
    excess = x - u
    a = x.size / float(np.sum(log_ratio))
    lam = 1.0 / float(np.mean(excess))
    ll_power = math.log(a / u) - (a + 1.0) * log_ratio
    ll_exp = math.log(lam) - lam * excess
    d = ll_power - ll_exp
    ratio = float(np.sum(d))
    sigma = float(np.std(d))
    z = ratio / (sigma * math.sqrt(x.size)) if sigma > 0 else math.copysign(math.inf, ratio)
    p = math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else 0.0
    return LikelihoodRatio(ratio=ratio, z=z, p_value=p, n=int(x.size), alpha=a, rate=lam)

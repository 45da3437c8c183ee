"""Independent NumPy/SciPy references (float64, sort-based) for tests and benchmarks.

Nothing here calls gradience_kernels: every function sorts the float64 values of the sample
and applies the textbook formula, so agreement with the compiled ops is a real check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

EPS = float(np.finfo(np.float64).eps)


def as_float64(x) -> np.ndarray:
    """The sample (tensor, array, or list of them) as one flat float64 array, values exact."""
    if isinstance(x, (list, tuple)):
        parts = [as_float64(t) for t in x]
        return np.concatenate(parts) if parts else np.empty(0)
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().reshape(-1).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def counts(x) -> dict[str, int]:
    a = as_float64(x)
    n_nan = int(np.isnan(a).sum())
    n_inf = int(np.isinf(a).sum())
    n_zero = int((a == 0).sum())
    return {"n_eff": a.size - n_nan - n_inf - n_zero, "n_zero": n_zero, "n_nan": n_nan, "n_inf": n_inf}


def tail_sorted(x) -> np.ndarray:
    """Finite nonzero |x|, sorted descending: X(1) >= X(2) >= ..."""
    a = np.abs(as_float64(x))
    a = a[np.isfinite(a) & (a != 0)]
    return np.sort(a)[::-1]


def tail_row(x, k: int, desc: np.ndarray | None = None) -> dict[str, float]:
    """k, X(k+1), X(k), S1, S2, H1, H2 of DESIGN 3.1 by sorting."""
    a = tail_sorted(x) if desc is None else desc
    logs = np.log(a[:k])
    t = a[k]
    centred = logs - np.log(t)
    return {
        "k": float(k),
        "x_k1": float(t),
        "x_k": float(a[k - 1]),
        "s1": float(np.sum(logs)),
        "s2": float(np.sum(logs * logs)),
        "h1": float(np.sum(centred)),
        "h2": float(np.sum(centred * centred)),
    }


def log_scale(x, k: int, desc: np.ndarray | None = None) -> float:
    """L = max_{i<=k+1} |log X(i)| + |log X(k+1)| + 1: the size of the terms in the log sums.

    Each term of S1/H1 is computed with relative error of a few ulp and each partial sum adds
    one rounding, so |error| <= c k eps L (and c k eps L^2 for the squared sums); tests use
    c = 64, which covers both the library's and this module's rounding.
    """
    a = tail_sorted(x) if desc is None else desc
    logs = np.abs(np.log(a[: k + 1]))
    return float(logs.max() + abs(np.log(a[k])) + 1.0)


def log_sum_tolerances(x, k: int, desc: np.ndarray | None = None) -> tuple[float, float]:
    """The bounds of log_scale: (for S1/H1, for S2/H2) = (64 k eps L, 64 k eps L^2)."""
    scale = log_scale(x, k, desc)
    return 64 * EPS * k * scale, 64 * EPS * k * scale * scale


def assert_log_sums_close(rows_a, rows_b, x, ks) -> None:
    """Two tail_stats results of the same sample grouped differently (a list against its
    concatenation, another thread count): log sums (S1, S2, H1, H2) within the bounds."""
    for row_a, row_b, k in zip(rows_a.tolist(), rows_b.tolist(), ks):
        tol1, tol2 = log_sum_tolerances(x, k)
        for j, tol in ((3, tol1), (4, tol2), (5, tol1), (6, tol2)):
            assert abs(row_a[j] - row_b[j]) <= tol, (j, k, row_a[j], row_b[j], tol)


def hill(x, k: int) -> float:
    a = tail_sorted(x)
    return k / float(np.sum(np.log(a[:k]) - np.log(a[k])))


def moment(x, k: int) -> float:
    a = tail_sorted(x)
    c = np.log(a[:k]) - np.log(a[k])
    m1 = float(np.mean(c))
    m2 = float(np.mean(c * c))
    return m1 + 1.0 - 0.5 / (1.0 - m1 * m1 / m2)


def pickands(x, k: int) -> float:
    a = tail_sorted(x)
    return float(np.log((a[k - 1] - a[2 * k - 1]) / (a[2 * k - 1] - a[4 * k - 1])) / np.log(2.0))


def quantile(x, q: Sequence[float], method: str) -> np.ndarray:
    return np.quantile(as_float64(x), np.asarray(q, dtype=np.float64), method=method)


def kth_smallest(x, ranks: Sequence[int]) -> np.ndarray:
    a = np.sort(as_float64(x))
    return a[np.asarray(ranks) - 1]


def kth_largest_abs(x, ranks: Sequence[int]) -> np.ndarray:
    return tail_sorted(x)[np.asarray(ranks) - 1]


# --------------------------------------------------------------------------- tail fits
def gpd_fit(y) -> tuple[float, float]:
    """scipy.stats.genpareto.fit(y, floc=0) with a tight Nelder-Mead (its default stops at
    xtol = ftol = 1e-4, looser than the 1e-6 these tests compare at). Returns (xi, sigma)."""
    from scipy import optimize, stats

    def tight(func, x0, args=(), disp=0):
        return optimize.fmin(func, x0, args=args, xtol=1e-12, ftol=1e-12, maxiter=20000,
                             maxfun=40000, disp=0)

    xi, _, sigma = stats.genpareto.fit(np.asarray(y, dtype=np.float64), floc=0, optimizer=tight)
    return float(xi), float(sigma)


def gpd_loglik(y, xi: float, sigma: float) -> float:
    from scipy import stats

    return float(np.sum(stats.genpareto.logpdf(np.asarray(y, dtype=np.float64), xi, 0, sigma)))


def stable_fitstart(x) -> tuple[float, float, float, float]:
    """scipy.stats.levy_stable._fitstart (McCulloch 1986, S1): (alpha, beta, loc, scale)."""
    from scipy import stats

    return tuple(float(v) for v in stats.levy_stable._fitstart(as_float64(x)))


def vuong_power_law_vs_exponential(x_above, u: float) -> tuple[float, float]:
    """(R, p) of Vuong's test with SciPy's Pareto and exponential densities above u, MLEs in
    closed form (Clauset-Shalizi-Newman 2009, eq. 3.1 and section 5)."""
    from scipy import special, stats

    x = np.asarray(x_above, dtype=np.float64)
    a = x.size / np.sum(np.log(x / u))
    scale = np.mean(x - u)
    d = stats.pareto.logpdf(x, a, scale=u) - stats.expon.logpdf(x, loc=u, scale=scale)
    r = float(np.sum(d))
    z = r / (np.std(d) * np.sqrt(x.size))
    return r, float(special.erfc(abs(z) / np.sqrt(2)))


# --------------------------------------------------------------------------- double bootstrap
# The procedures of the common NumPy tail-estimation scripts (Voitalov et al. 2019, after
# Danielsson et al. 2001 / Qi 2008 for Hill and Draisma et al. 1999 for the moment estimator),
# written from their published description: every resample is drawn with replacement and sorted.
def bootstrap_sizes(n: int, t: float = 0.5) -> tuple[int, int]:
    """n1 = floor(n^((1 + log floor(t n) / log n) / 2)) ~ sqrt(t) n and n2 = floor(n1^2 / n)."""
    n1 = int(n ** (0.5 * (1 + np.log(int(t * n)) / np.log(n))))
    return n1, int(n1 * n1 / n)


def moments_desc(desc: np.ndarray, order: int = 3):
    """M1..M_order at k = 1..len-1 of data sorted descending (expanded sums, as the scripts)."""
    logs = np.log(desc)
    k = np.arange(1, logs.size, dtype=np.float64)
    c = logs[1:]
    out = []
    sums = [np.cumsum(logs ** j)[:-1] / k for j in (1, 2, 3)]
    out.append(sums[0] - c)
    out.append(sums[1] - 2 * c * sums[0] + c * c)
    if order >= 3:
        out.append(sums[2] - 3 * c * sums[1] + 3 * c * c * sums[0] - c ** 3)
    return out


def hill_statistic(desc: np.ndarray) -> np.ndarray:
    m1, m2 = moments_desc(desc, 2)
    return (m2 - 2 * m1 * m1) ** 2


def moment_statistic(desc: np.ndarray) -> np.ndarray:
    m1, m2, m3 = moments_desc(desc, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        bad = (m2 <= 0) | (m3 == 0) | (np.abs(1 - m1 * m1 / m2) < 1e-10) | (
            np.abs(1 - m1 * m2 / m3) < 1e-10)
        xi2 = m1 + 1 - 0.5 / (1 - m1 * m1 / m2)
        xi3 = np.sqrt(0.5 * m2) + 1 - (2.0 / 3.0) / (1 - m1 * m2 / m3)
    stat = (xi2 - xi3) ** 2
    stat[bad] = np.nan
    return stat


def _bootstrap_average(desc, size, r, statistic, rng, total=None, count=0):
    total = np.zeros(size - 1) if total is None else total
    for _ in range(r):
        sample = np.sort(rng.choice(desc, size, replace=True))[::-1]
        total = total + statistic(sample)
        count += 1
    return total, count


def _max_index(size: int, eps_stop: float) -> int:
    return int(np.argmin(np.abs(np.linspace(1.0 / size, 1.0, size) - eps_stop)))


def hill_double_bootstrap(desc, t=0.5, r=500, eps_stop=0.99, seed=0) -> dict[str, float]:
    """k* of the Hill double bootstrap; k1, k2 the minimisers of the two averaged statistics."""
    rng = np.random.default_rng(seed)
    n = desc.size
    n1, n2 = bootstrap_sizes(n, t)
    lo1 = lo2 = 1
    total1, count1 = None, 0
    while True:
        total1, count1 = _bootstrap_average(desc, n1, r, hill_statistic, rng, total1, count1)
        max1 = _max_index(n1, eps_stop)
        k1 = int(np.nanargmin((total1 / count1)[lo1:max1])) + 1 + lo1
        total2, count2 = _bootstrap_average(desc, n2, r, hill_statistic, rng)
        max2 = _max_index(n2, eps_stop)
        k2 = int(np.nanargmin((total2 / count2)[lo2:max2])) + 1 + lo2
        if k2 <= k1:
            break
        lo1 += int(0.005 * n)
        lo2 += int(0.005 * n)
    rho_fac = (2 * np.log(n1) / np.log(k1) - 1) ** (np.log(k1) / np.log(n1) - 1)
    k_star = int(np.round(k1 * k1 / k2 * rho_fac))
    k_star = 2 if k_star == 0 else min(k_star, n - 1)
    return {"k_star": k_star, "k1": k1, "k2": k2, "n1": n1, "n2": n2}


def moments_prefactor(xi: float, n1: int, k1: int) -> float:
    """Draisma et al. (1999) constant of k* = k1^2/k2 * prefactor (second-order rho from k1)."""
    rho = np.log(k1) / (2 * np.log(k1) - 2 * np.log(n1))
    x = xi
    if x >= 0:
        v2 = 1 + x * x
        vbar2 = (1 + x * x) / 4
        b = x / (rho * (1 - rho)) + 1 / (1 - rho) ** 2
        bbar = -(rho + x * (1 - rho)) / (2 * (1 - rho) ** 3)
    else:
        v2 = (1 - x) ** 2 * (1 - 2 * x) * (6 * x * x - x + 1) / ((1 - 3 * x) * (1 - 4 * x))
        vbar2 = 0.25 * (1 - x) ** 2 * (1 - 8 * x + 48 * x ** 2 - 154 * x ** 3 + 263 * x ** 4
                                       - 222 * x ** 5 + 72 * x ** 6) / (
            (1 - 2 * x) * (1 - 3 * x) * (1 - 4 * x) * (1 - 5 * x) * (1 - 6 * x))
        if x < rho:
            b = (1 - x) * (1 - 2 * x) / ((1 - rho - x) * (1 - rho - 2 * x))
            bbar = -rho * (1 - x) ** 2 / (2 * (1 - x - rho) * (1 - 2 * x - rho) * (1 - 3 * x - rho))
        else:
            b = 1 / (1 - x)
            bbar = (1 - 2 * x - np.sqrt((1 - x) * (1 - 2 * x))) / ((1 - x) * (1 - 2 * x))
    return float((v2 * bbar ** 2 / (vbar2 * b ** 2)) ** (1 / (1 - 2 * rho)))


def moment_double_bootstrap(desc, t=0.5, r=500, eps_stop=0.99, seed=0) -> dict[str, float]:
    """k* of the moment-estimator double bootstrap (retries afresh while k2 > k1)."""
    rng = np.random.default_rng(seed)
    n = desc.size
    n1, n2 = bootstrap_sizes(n, t)
    xi_n = moment(desc, int(np.floor(np.sqrt(n))))
    while True:
        total1, count1 = _bootstrap_average(desc, n1, r, moment_statistic, rng)
        k1 = int(np.nanargmin((total1 / count1)[:_max_index(n1, eps_stop)])) + 1
        total2, count2 = _bootstrap_average(desc, n2, r, moment_statistic, rng)
        k2 = int(np.nanargmin((total2 / count2)[:_max_index(n2, eps_stop)])) + 1
        if k2 <= k1:
            break
    k_star = int(k1 * k1 / k2 * moments_prefactor(xi_n, n1, k1))
    return {"k_star": min(max(k_star, 1), n - 1), "k1": k1, "k2": k2, "n1": n1, "n2": n2}

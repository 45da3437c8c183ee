"""NumPy drop-in for the common tail-estimation scripts (Voitalov et al. 2019): NumPy arrays in,
NumPy arrays and floats out, with those scripts' function names, arguments and return
conventions (xi = 1/alpha, arrays over every k, 12-item result lists), except that ``data``
need not be sorted (it is sorted here once, descending) and the double bootstraps run on the
compiled resampling kernel (see ``tail_selection``), so a user swaps the import and gets the
same estimates, with the bootstrap's k* drawn from the same procedure, much faster.

Differences, stated: the bootstraps draw from their own seeded streams (``seed``; by default
one seed drawn from NumPy's global generator, so ``np.random.seed`` still makes runs
repeatable), not from ``np.random.choice``, so k* agrees with the scripts' k* within the
bootstrap's own spread, not bitwise; their AMSE curves (``diagn_plots``) are evaluated on every
k up to 2000 and on a 0.1% grid above (NaN elsewhere); kernel-type estimates at bandwidths with no
term (floor(n h) <= 1) are NaN where the scripts read a wrapped array index.

Reference: I. Voitalov, P. van der Hoorn, R. van der Hofstad, D. Krioukov, "Scale-free networks
well done", Phys. Rev. Research 1 (2019) 033034.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import tail_selection as _sel

__all__ = ["hill_estimator", "moments_estimator", "pickands_estimator", "smooth_hill_estimator",
           "kernel_type_estimator", "hill_dbs", "moments_dbs"]


# --------------------------------------------------------------------------- input
def _sorted_desc(data) -> np.ndarray:
    a = np.asarray(data, dtype=np.float64).reshape(-1)
    if a.size < 3:
        raise ValueError(f"data: expected at least 3 values, got {a.size}")
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"data: expected finite positive values, got data[{i}]={a[i]!r}")
    return np.sort(a)[::-1]


def _seed(seed: int | None) -> int:
    return int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)


# --------------------------------------------------------------------------- moments over k
def _moments(desc: np.ndarray):
    """M1(k), M2(k) for k = 1..n-1 (log-spacings about log X(k+1))."""
    logs = np.log(desc)
    k = np.arange(1, desc.size, dtype=np.float64)
    c = logs[1:]
    s1 = np.cumsum(logs)[:-1] / k
    s2 = np.cumsum(logs * logs)[:-1] / k
    return s1 - c, s2 - 2 * c * s1 + c * c


def _hill_arrays(desc):
    m1, _ = _moments(desc)
    return np.arange(1, desc.size), m1


def _moment_arrays(desc):
    m1, m2 = _moments(desc)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = m1 + 1.0 - 0.5 / (1.0 - m1 * m1 / m2)
    return np.arange(1, desc.size), xi


# --------------------------------------------------------------------------- double bootstraps
def _dbs(desc, estimator, t_bootstrap, r_bootstrap, eps_stop, seed, diagn_plots):
    logs = torch.from_numpy(np.log(desc).copy())
    cache: dict = {}
    res = _sel.double_bootstrap(logs, estimator, t_bootstrap=t_bootstrap,
                                r_bootstrap=r_bootstrap, eps_stop=eps_stop, seed=seed,
                                _logs=logs, _cache=cache)
    which = 0 if estimator == "hill" else 1
    out = []
    for size, k in ((res.n1, res.k1), (res.n2, res.k2)):
        max_index = int(np.argmin(np.abs(np.linspace(1.0 / size, 1.0, size) - eps_stop)))
        x_arr = amse = None
        if diagn_plots:
            x_arr = np.linspace(1.0 / size, 1.0, size)
            amse = np.full(size - 1, np.nan)
            for (sz, max_k, _, _, _, _), (total, count) in cache.items():
                if sz == size:  # the key holds the searched range: its grid is that of the sums
                    amse[np.asarray(_sel._search_ks(max_k)) - 1] = total[which] / count
        out.append((x_arr, amse, k / size, max_index))
    (x1, a1, f1, m1), (x2, a2, f2, m2) = out
    return res.k_star, x1, a1, f1, m1, x2, a2, f2, m2


def hill_dbs(data, t_bootstrap=0.5, r_bootstrap=500, eps_stop=1.0, verbose=False,
             diagn_plots=False, seed=None):
    """Hill double bootstrap: (k_star, x1_arr, n1_amse, k1/n1, max_index1, x2_arr, n2_amse,
    k2/n2, max_index2). See :func:`gradience_kernels.double_bootstrap`."""
    return _dbs(_sorted_desc(data), "hill", t_bootstrap, r_bootstrap, eps_stop, _seed(seed),
                diagn_plots)


def moments_dbs(data, xi_n=None, t_bootstrap=0.5, r_bootstrap=500, eps_stop=1.0,
                verbose=False, diagn_plots=False, seed=None):
    """Moment-estimator double bootstrap, same 9-tuple as :func:`hill_dbs` (``xi_n`` is
    accepted for compatibility and recomputed: the moment estimate at k = floor(sqrt n))."""
    return _dbs(_sorted_desc(data), "moment", t_bootstrap, r_bootstrap, eps_stop, _seed(seed),
                diagn_plots)


def _with_bootstrap(desc, k_arr, xi_arr, estimator, bootstrap, t_bootstrap, r_bootstrap,
                    eps_stop, diagn_plots, seed):
    if not bootstrap:
        return [k_arr, xi_arr] + [None] * 10
    k_star, x1, a1, f1, m1, x2, a2, f2, m2 = _dbs(desc, estimator, t_bootstrap, r_bootstrap,
                                                  eps_stop, _seed(seed), diagn_plots)
    return [k_arr, xi_arr, k_star, float(xi_arr[k_star - 1]), x1, a1, f1, m1, x2, a2, f2, m2]


def hill_estimator(data, bootstrap=True, t_bootstrap=0.5, r_bootstrap=500, verbose=False,
                   diagn_plots=False, eps_stop=0.99, seed=None):
    """Hill estimates xi(k) = (1/k) sum_{i<=k} log X(i) - log X(k+1), k = 1..n-1, and with
    ``bootstrap`` the double-bootstrap k* (Danielsson et al. 2001, Qi 2008).

    Returns [k_arr, xi_arr, k_star, xi_star, x1_arr, n1_amse, k1/n1, max_index1, x2_arr,
    n2_amse, k2/n2, max_index2] (bootstrap items None without ``bootstrap``).
    """
    desc = _sorted_desc(data)
    k_arr, xi_arr = _hill_arrays(desc)
    return _with_bootstrap(desc, k_arr, xi_arr, "hill", bootstrap, t_bootstrap, r_bootstrap,
                           eps_stop, diagn_plots, seed)


def moments_estimator(data, bootstrap=True, t_bootstrap=0.5, r_bootstrap=500, verbose=False,
                      diagn_plots=False, eps_stop=0.99, seed=None):
    """Moment estimates xi(k) = M1 + 1 - (1/2)(1 - M1^2/M2)^-1 (Dekkers, Einmahl, de Haan
    1989), k = 1..n-1, and with ``bootstrap`` the double-bootstrap k* (Draisma et al. 1999).
    Same 12-item result as :func:`hill_estimator`."""
    desc = _sorted_desc(data)
    k_arr, xi_arr = _moment_arrays(desc)
    return _with_bootstrap(desc, k_arr, xi_arr, "moment", bootstrap, t_bootstrap, r_bootstrap,
                           eps_stop, diagn_plots, seed)


def pickands_estimator(data):
    """Pickands (1975): xi(k) = log((X(k) - X(2k)) / (X(2k) - X(4k))) / log 2 for
    k = 1..floor(n/4). Returns (k_arr as floats, xi_arr)."""
    desc = _sorted_desc(data)
    big_k = desc.size // 4
    k = np.arange(1, big_k + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.log((desc[k - 1] - desc[2 * k - 1]) / (desc[2 * k - 1] - desc[4 * k - 1])) / np.log(2)
    return k.astype(np.float64), xi


def smooth_hill_estimator(data, r_smooth=2):
    """Smoothed Hill (Resnick, Starica 1997): avH(j) = (1/((r-1) j)) sum_{m=j+1}^{r j} H(m),
    reported at k = j + 1 (the scripts' convention; k = 1 carries H(1)), k = 1..floor(n/r).
    Returns (k_arr, xi_arr)."""
    if isinstance(r_smooth, bool) or not isinstance(r_smooth, int) or r_smooth < 2:
        raise ValueError(f"r_smooth must be an int >= 2, got r_smooth={r_smooth!r}")
    desc = _sorted_desc(data)
    _, hill = _hill_arrays(desc)  # hill[m-1] = H(m)
    big_k = desc.size // r_smooth
    csum = np.concatenate([[0.0], np.cumsum(hill)])  # csum[m] = sum_{i<=m} H(i)
    j = np.arange(1, big_k)
    top = np.minimum(r_smooth * j, hill.size)
    smoothed = (csum[top] - csum[j]) / ((r_smooth - 1) * j)
    return np.arange(1, big_k + 1), np.concatenate([[hill[0]], smoothed])


# --------------------------------------------------------------------------- kernel type
# K(u) and (1 + a) K(u) + u K'(u) as polynomials in u (coefficients of u^0, u^2, ...).
def _kernel_polys(kind: str, a: float):
    if kind == "biweight":
        c = 15.0 / 8.0
        return c * np.array([1.0, -2.0, 1.0]), c * np.array([1 + a, -2 * (3 + a), 5 + a])
    c = 35.0 / 16.0
    return (c * np.array([1.0, -3.0, 3.0, -1.0]),
            c * np.array([1 + a, -3 * (3 + a), 3 * (5 + a), -(7 + a)]))


def _kernel_xi(desc: np.ndarray, hs: np.ndarray, a: float, kind: str) -> np.ndarray:
    """Groeneboom-Lopuhaa-de Wolf estimates at bandwidths hs: with d_i = log X(i) - log X(i+1),
    w_i = i/n, u_i = w_i/h over i = 1..floor(n h) - 1:
    xi(h) = sum u K(u) d - 1 + [sum (w^a/h)((1+a)K(u) + u K'(u)) d] / [sum w^a K(u)/h d]."""
    n = desc.size
    logs = np.log(desc)
    d = logs[:-1] - logs[1:]
    w = np.arange(1, n) / n
    kpoly, dpoly = _kernel_polys(kind, a)
    wa = w ** a
    out = np.full(hs.size, np.nan)
    for idx, h in enumerate(hs):
        m = int(math.floor(n * h)) - 1
        if m < 1:
            continue
        u = w[:m] / h
        u2 = u * u
        k_u = np.polyval(kpoly[::-1], u2)
        dk_u = np.polyval(dpoly[::-1], u2)
        gamma_pos = float(np.sum(u * k_u * d[:m]))
        q1 = float(np.sum(wa[:m] * k_u * d[:m])) / h
        q2 = float(np.sum(wa[:m] * dk_u * d[:m])) / h
        with np.errstate(divide="ignore", invalid="ignore"):
            out[idx] = gamma_pos - 1.0 + q2 / q1 if q1 != 0 else np.nan
    return out


def _kernel_dbs(desc, hsteps, a, t_bootstrap, r_bootstrap, eps_stop, seed):
    """Double bootstrap of the kernel estimator: (biweight - triweight)^2 averaged over
    resamples on each resample's own bandwidth grid; h* = h1^2/h2 * A (capped at 1),
    A = (143 (log n1 + log h1)^2 / (3 (log n1 - 13 log h1)^2))^(-log h1 / log n1)."""
    n = desc.size
    n1, n2 = _sel.bootstrap_sizes(n, t_bootstrap)
    if n2 < hsteps:
        raise ValueError(f"kernel_type_estimator: n2={n2} resample size is below hsteps={hsteps}")
    rng = np.random.default_rng(seed)
    hs_of = {}
    for size in (n1, n2):
        grid = np.logspace(np.log10(1.0 / size), 0, hsteps)
        total = np.zeros(hsteps)
        for _ in range(r_bootstrap):
            # Sorted resample ranks from exponential spacings (no sort), as the compiled kernel.
            e = rng.exponential(size=size + 1)
            ranks = np.minimum(n - 1, np.floor(np.cumsum(e[:size]) * (n / e.sum()))).astype(np.int64)
            sample = desc[ranks]
            total += (_kernel_xi(sample, grid, a, "biweight")
                      - _kernel_xi(sample, grid, a, "triweight")) ** 2
        avg = total / r_bootstrap
        max_index = int(np.argmin(np.abs(grid - eps_stop)))
        hs_of[size] = float(grid[int(np.nanargmin(avg[:max_index]))])
    h1, h2 = hs_of[n1], hs_of[n2]
    big_a = (143 * (np.log(n1) + np.log(h1)) ** 2 / (3 * (np.log(n1) - 13 * np.log(h1)) ** 2)) ** (
        -np.log(h1) / np.log(n1))
    return min(1.0, h1 * h1 / h2 * big_a), h1, h2


def kernel_type_estimator(data, hsteps, alpha=0.6, bootstrap=True, t_bootstrap=0.5,
                          r_bootstrap=500, verbose=False, diagn_plots=False, eps_stop=0.99,
                          seed=None):
    """Kernel-type estimator (Groeneboom, Lopuhaa, de Wolf 2003; biweight kernel) on the
    bandwidth grid h = logspace(log10(1/n), 0, hsteps), k = floor(n h); with ``bootstrap`` the
    double-bootstrap h* (NumPy, resamples from sorted ranks). Returns [k_arr, xi_arr, k_star,
    xi_star, None, None, h1, None, None, None, h2, None] (AMSE curves are not kept)."""
    if isinstance(hsteps, bool) or not isinstance(hsteps, int) or hsteps < 2:
        raise ValueError(f"hsteps must be an int >= 2, got hsteps={hsteps!r}")
    if not alpha > 0.5:
        raise ValueError(f"alpha must be > 0.5, got alpha={alpha!r}")
    desc = _sorted_desc(data)
    n = desc.size
    hs = np.logspace(np.log10(1.0 / n), 0, hsteps)
    xi_arr = _kernel_xi(desc, hs, alpha, "biweight")
    k_arr = np.floor(hs * n)
    if not bootstrap:
        return [k_arr, xi_arr] + [None] * 10
    h_star, h1, h2 = _kernel_dbs(desc, hsteps, alpha, t_bootstrap, r_bootstrap, eps_stop,
                                 _seed(seed))
    idx = int(np.argmin(np.abs(hs - h_star)))
    k_star = int(np.floor(hs[idx] * n)) - 1
    return [k_arr, xi_arr, k_star, float(xi_arr[idx]), None, None, h1, None, None, None, h2, None]

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


# ------------------------------------------------------------------ power-law fit (CSN 2009)
# The direct O(n^2) scan of Clauset, Shalizi, Newman (SIAM Review 51(4) 2009, eqs. 3.1-3.2 and
# section 3.3) with the powerlaw package's conventions for continuous data: candidates are the
# distinct values but the largest two; for each, alpha from the tail by formula (or the truncated
# likelihood equation with xmax, solved by scipy's brentq), D from np.searchsorted's left ECDF.


def power_law_truncated_t(mean_log: float, log_range: float) -> float:
    """Root t (alpha = 1 + t) of 1/t - L/(e^{tL} - 1) = mean log(x/xmin), L = log(xmax/xmin):
    the likelihood equation of a power law truncated to [xmin, xmax]."""
    from scipy.optimize import brentq

    L, m = float(log_range), float(mean_log)

    def score(t: float) -> float:
        if abs(t * L) < 1e-4:
            return L / 2 - L * L * t / 12 - m
        return 1.0 / t - L / np.expm1(t * L) - m

    lo, hi = -1.0, 1.0
    while score(lo) <= 0:
        lo *= 2
    while score(hi) >= 0:
        hi *= 2
    return brentq(score, lo, hi, xtol=1e-300, rtol=4 * EPS, maxiter=2000)


def power_law_scan(x, xmax: float | None = None, xmax_alpha: str = "mle",
                   alpha_range: tuple[float, float] | None = None,
                   nonpositive: str = "error") -> dict:
    """Every candidate's (xmin, alpha, D, n_tail) by the direct scan, and the chosen fit."""
    v = as_float64(x)
    if nonpositive == "drop":
        v = v[v > 0]
    elif np.any(v <= 0):
        raise ValueError("power_law_scan: non-positive values")
    if xmax is not None:
        v = v[v <= xmax]
    v = np.sort(v)
    xmins = np.unique(v)[:-2]
    alphas, ds, n_tails = [], [], []
    for xmin in xmins:
        tail = v[v >= xmin]
        n = tail.size
        s = float(np.sum(np.log(tail / xmin)))
        alpha = 1.0 + n / s
        points = np.unique(tail)
        ecdf = np.searchsorted(tail, points, side="left") / n
        if xmax is None:
            cdf = 1.0 - (points / xmin) ** (1.0 - alpha)
        else:
            L = float(np.log(xmax / xmin))
            if not (xmax_alpha == "powerlaw" and 1.5 < alpha <= 3.0):
                alpha = 1.0 + power_law_truncated_t(s / n, L)
            t = alpha - 1.0
            y = np.log(points / xmin)
            if t > 0:
                cdf = np.expm1(-t * y) / np.expm1(-t * L)
            elif t < 0:
                cdf = np.exp(t * (L - y)) * (np.expm1(t * y) / np.expm1(t * L))
            else:
                cdf = y / L
        alphas.append(alpha)
        ds.append(float(np.max(np.abs(ecdf - cdf))))
        n_tails.append(n)
    alphas, ds, n_tails = np.array(alphas), np.array(ds), np.array(n_tails, dtype=np.int64)
    out = {"xmins": xmins, "alphas": alphas, "Ds": ds, "n_tails": n_tails}
    if xmins.size == 0:
        return {**out, "best": -1, "xmin": np.nan, "alpha": np.nan, "D": np.nan,
                "sigma": np.nan, "n_tail": 0, "n_eligible": 0}
    eligible = np.ones(xmins.size, dtype=bool)
    if alpha_range is not None:
        eligible = (alphas > alpha_range[0]) & (alphas < alpha_range[1])
    best = int(np.argmin(np.where(eligible, ds, np.inf))) if eligible.any() else int(np.argmin(ds))
    return {**out, "best": best, "xmin": float(xmins[best]), "alpha": float(alphas[best]),
            "D": float(ds[best]), "sigma": float((alphas[best] - 1) / np.sqrt(n_tails[best])),
            "n_tail": int(n_tails[best]), "n_eligible": int(eligible.sum())}


# --------------------------------------------------------------------------- spectra (issue 5)
# Spectral references for gradience_kernels.spectral / spectrum_metrics: float64 NumPy full SVDs
# and eigvalsh of Gram matrices, WeightWatcher's slicing written out independently, textbook
# metric formulas, and the Marchenko-Pastur median by numerical quadrature (not the closed form).
def svd_values(a) -> np.ndarray:
    """Singular values (descending) of a matrix or a batch (..., m, n), float64 np.linalg.svd."""
    x = a.detach().to(torch.float64).cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(
        a, dtype=np.float64)
    return np.linalg.svd(x, compute_uv=False)


def ww_esd(w, conv: bool, normalize: bool = True) -> np.ndarray:
    """Eigenvalues (descending) of S^T S / N for each (out, in) matrix S of a weight, pooled over
    the kernel positions of a conv weight (out, in, *kernel): S = w[:, :, i, j, ...]; each S is
    oriented N x M with N >= M (WeightWatcher's conv2D_Wmats) before the M x M Gram matrix."""
    x = w.detach().to(torch.float64).cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(
        w, dtype=np.float64)
    slices = [x[(slice(None), slice(None)) + idx] for idx in np.ndindex(*x.shape[2:])] if conv \
        else [x]
    out = []
    for s in slices:
        if s.shape[0] < s.shape[1]:
            s = s.T
        n_rows = s.shape[0]
        ev = np.linalg.eigvalsh(s.T @ s)
        out.append(ev / n_rows if normalize else ev)
    return np.sort(np.concatenate(out))[::-1]


def mp_median(beta: float) -> float:
    """Median of the unit-scale Marchenko-Pastur law of ratio beta in (0, 1], by quadrature of
    the density (substituting x = a + (b - a) sin^2(phi), which removes the square-root edges) and
    Brent's root finder."""
    from scipy import integrate, optimize

    a, b = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2

    def integrand(phi):
        x = a + (b - a) * np.sin(phi) ** 2
        # f(x) dx with sqrt((b-x)(x-a)) = (b-a) sin cos and dx = 2 (b-a) sin cos dphi
        return (b - a) ** 2 * 2 * (np.sin(phi) * np.cos(phi)) ** 2 / (2 * np.pi * beta * x)

    def cdf(x):
        phi = np.arcsin(np.sqrt(np.clip((x - a) / (b - a), 0, 1)))
        return integrate.quad(integrand, 0, phi, epsabs=1e-15, epsrel=1e-14, limit=400)[0]

    return float(optimize.brentq(lambda x: cdf(x) - 0.5, a, b, xtol=1e-15, rtol=4 * EPS))


def mp_fit(sigma, shape, tw_margin: float = 2.0234) -> dict[str, float]:
    """Gavish-Donoho median noise estimate, MP bulk edge, Johnstone-TW spike threshold and count
    for one matrix's singular values (all min(m, n) of them)."""
    s = np.asarray(sigma, dtype=np.float64)
    n_big, m_small = max(shape), min(shape)
    lam = s * s / n_big
    beta = m_small / n_big
    sigma2 = float(np.median(lam)) / mp_median(beta)
    n1 = max(n_big - 1, 1)
    mu = (np.sqrt(n1) + np.sqrt(m_small)) ** 2
    sd = (np.sqrt(n1) + np.sqrt(m_small)) * (1 / np.sqrt(n1) + 1 / np.sqrt(m_small)) ** (1 / 3)
    threshold = sigma2 * (mu + tw_margin * sd) / n_big
    return {"sigma2": sigma2, "bulk_edge": sigma2 * (1 + np.sqrt(beta)) ** 2,
            "bulk_min": sigma2 * (1 - np.sqrt(beta)) ** 2, "spike_threshold": float(threshold),
            "num_spikes": int(np.sum(lam > threshold))}


def matrix_metrics(sigma, shape, eps: float) -> dict[str, float]:
    """Textbook metrics of one matrix from its singular values (complete spectrum)."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    s1 = s[0]
    out = {"spectral_norm": s1, "frobenius_norm": float(np.sqrt(np.sum(s ** 2))),
           "nuclear_norm": float(np.sum(s)), "log10_spectral_norm": float(np.log10(s1))
           if s1 > 0 else -np.inf,
           "numerical_rank": int(np.sum(s > max(shape) * eps * s1))}
    if s1 > 0:
        out["stable_rank"] = float(np.sum(s ** 2) / s1 ** 2)
        p = s / np.sum(s)
        p = p[p > 0]
        out["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    else:
        out["stable_rank"] = out["effective_rank"] = 0.0
    out["condition_number"] = float(s1 / s[-1]) if s[-1] > 0 else np.inf
    return out


# ---------------------------------------------------------------------------------------------
# Curvature references (issue 6): explicit float64 matrices of small models, built with
# torch.autograd.functional on a float64 deep copy of the model. Independent of
# gradience_kernels.curvature_*: no torch.func, no vmap, no operator code.
# Conventions shared with the operators: batch = (inputs, targets), inputs a tensor or a tuple
# of tensors (model(*inputs)), per-sample slices along dim 0; flat order = the selected
# parameters in model.named_parameters() order, each flattened row-major (as op.flatten).
# ---------------------------------------------------------------------------------------------

def _curv_f64(model, batch=None, inputs=None):
    import copy
    m = copy.deepcopy(model).to(torch.float64)

    def cast(t):
        return t.to(torch.float64) if torch.is_tensor(t) and t.is_floating_point() else t
    if batch is not None:
        x, y = batch
        x = tuple(cast(t) for t in x) if isinstance(x, (tuple, list)) else (cast(x),)
        return m, x, cast(y)
    x = tuple(cast(t) for t in inputs) if isinstance(inputs, (tuple, list)) else (cast(inputs),)
    return m, x, None


def _curv_selected(model, param_names):
    named = [(n, p) for n, p in model.named_parameters()]
    if param_names is None:
        return [n for n, p in named if p.requires_grad]
    if callable(param_names):
        return [n for n, p in named if param_names(n, p)]
    wanted = set(param_names)
    return [n for n, _ in named if n in wanted]


def _curv_flat_fn(m, names, x, make_loss):
    """f(flat) = make_loss(model output at params = flat) with the other parameters fixed."""
    from torch.func import functional_call
    base = {n: p.detach() for n, p in m.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    flat0 = torch.cat([base[n].reshape(-1) for n in names])

    def out_of(flat):
        params = dict(base)
        for n, s, t in zip(names, shapes, torch.split(flat, sizes)):
            params[n] = t.reshape(s)
        return functional_call(m, params, x)
    return flat0, out_of


def explicit_hessian(model, loss_fn, batch, param_names=None) -> torch.Tensor:
    """Float64 [P, P] Hessian of loss_fn(model(*inputs), targets) wrt the selected parameters."""
    m, x, y = _curv_f64(model, batch)
    names = _curv_selected(m, param_names)
    flat0, out_of = _curv_flat_fn(m, names, x, None)
    return torch.autograd.functional.hessian(lambda f: loss_fn(out_of(f), y), flat0)


def explicit_jacobian(model, inputs, param_names=None) -> torch.Tensor:
    """Float64 Jacobian of the model output wrt the selected parameters: [*out_shape, P]."""
    m, x, _ = _curv_f64(model, inputs=inputs)
    names = _curv_selected(m, param_names)
    flat0, out_of = _curv_flat_fn(m, names, x, None)
    return torch.autograd.functional.jacobian(out_of, flat0)


def explicit_ggn(model, loss_fn, batch, param_names=None) -> torch.Tensor:
    """Float64 [P, P] generalized Gauss-Newton J^T H_L J (Schraudolph 2002): J the Jacobian
    of the flattened output wrt the parameters, H_L the Hessian of the loss wrt the output."""
    m, x, y = _curv_f64(model, batch)
    names = _curv_selected(m, param_names)
    flat0, out_of = _curv_flat_fn(m, names, x, None)
    out0 = out_of(flat0).detach()
    J = torch.autograd.functional.jacobian(out_of, flat0).reshape(out0.numel(), -1)
    HL = torch.autograd.functional.hessian(
        lambda o: loss_fn(o.reshape(out0.shape), y), out0.reshape(-1))
    return J.T @ HL @ J


def explicit_per_sample_gradients(model, loss_fn, batch, param_names=None) -> torch.Tensor:
    """Float64 [N, P]: row i = gradient of loss_fn(model(x_i[None]), y_i[None]) wrt the
    selected parameters, by a Python loop of torch.autograd.grad."""
    m, x, y = _curv_f64(model, batch)
    names = _curv_selected(m, param_names)
    params = dict(m.named_parameters())
    sel = [params[n] for n in names]
    rows = []
    for i in range(x[0].shape[0]):
        xi = tuple(t[i:i + 1] for t in x)
        loss = loss_fn(m(*xi), y[i:i + 1])
        g = torch.autograd.grad(loss, sel, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                               for gi, p in zip(g, sel)]))
    return torch.stack(rows)


def explicit_fisher(model, loss_fn, batch, param_names=None) -> torch.Tensor:
    """Float64 [P, P] empirical Fisher (1/N) sum_i g_i g_i^T of the per-sample gradients."""
    G = explicit_per_sample_gradients(model, loss_fn, batch, param_names)
    return G.T @ G / G.shape[0]


def explicit_gradient_gram(model, loss_fn, batch, param_names=None) -> torch.Tensor:
    """Float64 [N, N] Gram G G^T of the per-sample loss gradients."""
    G = explicit_per_sample_gradients(model, loss_fn, batch, param_names)
    return G @ G.T


def explicit_ntk_gram(model, inputs, param_names=None, output_index=None) -> torch.Tensor:
    """Float64 [N, N] empirical NTK Gram (Jacot et al. 2018): K_ij = sum_c <J_ic, J_jc>, the
    trace over output components c of the per-sample output Jacobians (output shape [N, ...]);
    with output_index, only component c = output_index of the flattened per-sample output."""
    J = explicit_jacobian(model, inputs, param_names)
    N = J.shape[0]
    J = J.reshape(N, -1, J.shape[-1])  # [N, C, P]
    if output_index is not None:
        J = J[:, output_index:output_index + 1]
    return torch.einsum("icp,jcp->ij", J, J)


_curv_flat_fn_any_sdpa = _curv_flat_fn


def _curv_flat_fn(m, names, x, make_loss):
    """As above, the forward run with SDPA on its math kernel: the fused attention kernels
    have no double backward, which torch.autograd.functional.hessian needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flat0, out_of = _curv_flat_fn_any_sdpa(m, names, x, make_loss)

    def out_math(flat):
        with sdpa_kernel([SDPBackend.MATH]):
            return out_of(flat)
    return flat0, out_math


# ---------------------------------------------------------------------------------------------
# Curvature eigenvalue references (issue 6, curvature_eigen): dense float64 NumPy versions of
# PyHessian's power iteration with deflation and of stochastic Lanczos quadrature, from the
# same start vectors. Independent of gradience_kernels (no curvature_kernels, no operators).
# ---------------------------------------------------------------------------------------------

def power_iteration_deflated(A, starts, tol: float, max_iter: int):
    """PyHessian's ``hessian.eigenvalues`` loop (Yao et al. 2020) on a dense symmetric A [P, P]:
    for each start row, repeat: Gram-Schmidt against the eigenvectors found so far, normalize,
    w = A v, theta = v.w, v = w / |w|, until |theta - theta_prev| <= tol |theta_prev| (PyHessian
    divides by |theta_prev| + 1e-6 and uses <; curvature_eigen keeps the rule scale-free).
    Returns (eigenvalues [k], eigenvectors [k, P], iterations per eigenvalue [k])."""
    A = np.asarray(A, dtype=np.float64)
    found, values, iters = [], [], []
    for z in np.asarray(starts, dtype=np.float64):
        v = z.copy()
        prev, theta, n = None, 0.0, 0
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / np.linalg.norm(v)
            w = A @ v
            n += 1
            theta = float(v @ w)
            v = w / np.linalg.norm(w)
            if prev is not None and abs(theta - prev) <= tol * abs(prev):
                break
            prev = theta
        found.append(v)
        values.append(theta)
        iters.append(n)
    return np.array(values), np.array(found), np.array(iters)


def slq_nodes_weights(A, start, steps: int):
    """Lanczos with full reorthogonalization (modified Gram-Schmidt, twice) on a dense symmetric
    A from `start` (normalized here), `steps` steps: the Gauss quadrature nodes (eigenvalues of
    T) and weights (squared first components of T's eigenvectors), Golub and Meurant (2010)."""
    A = np.asarray(A, dtype=np.float64)
    q = np.asarray(start, dtype=np.float64)
    q = q / np.linalg.norm(q)
    Q = [q]
    alpha, beta = [], []
    for j in range(steps):
        w = A @ Q[j]
        a = float(Q[j] @ w)
        alpha.append(a)
        for _ in range(2):
            for u in Q:
                w = w - (u @ w) * u
        if j + 1 == steps:
            break
        b = float(np.linalg.norm(w))
        beta.append(b)
        Q.append(w / b)
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    theta, S = np.linalg.eigh(T)
    return theta, S[0] ** 2


# ---------------------------------------------------------------------------------------------
# Trace estimator references (issue 6, curvature_trace.py): dense float64 NumPy, flattened,
# the textbook / paper algorithms on given probes (rows of [m, P] arrays), per-block traces
# from explicit block selectors (index arrays into the flat order). Nothing here shares code
# or algebra with gradience_kernels.curvature_trace (which works from per-block Gram
# matrices): XTrace is computed by its definition, one QR of Y without column i per probe.
# ---------------------------------------------------------------------------------------------

def _trace_blocks_diag(M: np.ndarray, blocks) -> np.ndarray:
    d = np.diag(M)
    return np.array([d[idx].sum() for idx in blocks])


def _trace_mean_se(samples: np.ndarray) -> dict:
    """samples [m, n_blocks] -> block means / SEs and the total (sum of block means, SE of
    the per-sample totals)."""
    m = samples.shape[0]
    tot = samples.sum(1)
    return {"trace": float(samples.mean(0).sum()), "stderr": float(tot.std(ddof=1) / np.sqrt(m)),
            "block_traces": samples.mean(0), "block_stderr": samples.std(0, ddof=1) / np.sqrt(m),
            "samples": samples}


def hutchinson_dense(A, Z, blocks) -> dict:
    """Hutchinson (1989): per-block z_j[b] . (A z_j)[b] for probes Z [m, P]."""
    A, Z = np.asarray(A, np.float64), np.asarray(Z, np.float64)
    AZ = Z @ A.T
    samples = np.stack([(Z[:, idx] * AZ[:, idx]).sum(1) for idx in blocks], 1)
    return _trace_mean_se(samples)


def hutchpp_dense(A, S, G, blocks) -> dict:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) on sketch S [k, P] and
    residual probes G [l, P]: Q = qr(A S^T), tr(Q^T A Q) + Hutchinson on (I - QQ^T) A (I - QQ^T),
    per block: diag of (Pi A + A Pi - Pi A Pi) summed over the block, plus the residual
    forms g'[b] . ((I - Pi) A g')[b], g' = (I - Pi) g. Assumes A S^T has full column rank."""
    A, S, G = (np.asarray(x, np.float64) for x in (A, S, G))
    Q, _ = np.linalg.qr(A @ S.T)
    Pi = Q @ Q.T
    Pp = np.eye(A.shape[0]) - Pi
    exact = _trace_blocks_diag(Pi @ A + A @ Pi - Pi @ A @ Pi, blocks)
    Gp = G @ Pp
    AGp = Gp @ (Pp @ A).T
    samples = np.stack([(Gp[:, idx] * AGp[:, idx]).sum(1) for idx in blocks], 1)
    out = _trace_mean_se(samples)
    out["block_traces"] = out["block_traces"] + exact
    out["trace"] = float(out["block_traces"].sum())
    out["exact"] = exact
    return out


def xtrace_dense(A, Om, blocks, improved: bool) -> dict:
    """XTrace by its definition (Epperly, Tropp, Webber 2024, Algorithm 1.2 / eq. 2.3): for
    each probe i, Q_i = orth(A Omega without column i) (NumPy QR) and
    T_i = tr(Q_i^T A Q_i) + c_i w^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w, w = omega_i, with
    c_i = 1, or, improved (probes on the sphere of radius sqrt(P), sec. 2.2),
    c_i = (P - m + 1) / ||(I - Q_i Q_i^T) omega_i||^2. Per block: diag of
    (Pi_i A + A Pi_i - Pi_i A Pi_i) over the block plus c_i w'[b] . ((I - Pi_i) A w')[b].
    Estimate mean_i T_i, error estimate std(T_i) / sqrt(m). Assumes A Omega has full rank."""
    A, Om = np.asarray(A, np.float64), np.asarray(Om, np.float64)
    n, m = A.shape[0], Om.shape[0]
    Y = Om @ A.T
    rows = []
    for i in range(m):
        Qi, _ = np.linalg.qr(np.delete(Y, i, 0).T)
        Pi = Qi @ Qi.T
        Pp = np.eye(n) - Pi
        exact = _trace_blocks_diag(Pi @ A + A @ Pi - Pi @ A @ Pi, blocks)
        w = Pp @ Om[i]
        Aw = Pp @ (A @ w)
        c = (n - m + 1) / (w @ w) if improved else 1.0
        rows.append(exact + c * np.array([w[idx] @ Aw[idx] for idx in blocks]))
    return _trace_mean_se(np.array(rows))


def xtrace_paper(A, Om, improved: bool) -> tuple[float, float]:
    """The total XTrace estimate and error estimate by the formulas of the paper's code
    (eepperly/XTrace, code/xtrace_helper.m), real case: Y = Q R, S = normalized columns of
    R^-T, W = Q^T Omega, H = Q^T A Q, T = (A Q)^T Omega."""
    A, Om = np.asarray(A, np.float64), np.asarray(Om, np.float64).T  # Om [P, m]
    n, m = Om.shape
    Y = A @ Om
    Q, R = np.linalg.qr(Y)
    W = Q.T @ Om
    S = np.linalg.inv(R).T
    S = S / np.linalg.norm(S, axis=0)
    if improved:
        scale = (n - m + 1) / (n - np.linalg.norm(W, axis=0) ** 2
                               + (np.sum(S * W, 0) * np.linalg.norm(S, axis=0)) ** 2)
    else:
        scale = np.ones(m)
    Z = A @ Q
    H = Q.T @ Z
    HW = H @ W
    T = Z.T @ Om
    dSW = np.sum(S * W, 0)
    dSHS = np.sum(S * (H @ S), 0)
    dTW = np.sum(T * W, 0)
    dWHW = np.sum(W * HW, 0)
    dSRmHW = np.sum(S * (R - HW), 0)
    dTmHRS = np.sum((T - H.T @ W) * S, 0)
    ests = np.trace(H) - dSHS + (-dTW + dWHW + dSW * dSRmHW + dSW ** 2 * dSHS
                                 + dTmHRS * dSW) * scale
    return float(ests.mean()), float(ests.std(ddof=1) / np.sqrt(m))

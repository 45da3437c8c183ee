"""Fits of the tail (GPD, McCulloch stable), intervals and the power-law/exponential test,
against SciPy on the same data."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import gradience_kernels as gk
import reference as ref
from gradience_kernels import tail_fits, tail_inference


@pytest.mark.parametrize("xi", [-0.4, -0.1, 0.25, 0.7, 1.5])
def test_gpd_mle_matches_scipy(xi):
    rng = np.random.default_rng(int(10 * xi) + 40)
    y = stats.genpareto.rvs(xi, scale=1.7, size=4000, random_state=rng)
    got_xi, got_sigma, got_ll = tail_fits.gpd_mle(y)
    want_xi, want_sigma = ref.gpd_fit(y)
    # Both maximise the same likelihood: ours is at least as high, and the optima agree.
    assert got_ll >= ref.gpd_loglik(y, want_xi, want_sigma) - 1e-9 * abs(got_ll)
    assert abs(got_xi - want_xi) <= 1e-6 * max(1.0, abs(want_xi))
    assert abs(got_sigma - want_sigma) <= 1e-6 * want_sigma


def test_gpd_mle_default_scipy_within_its_tolerance():
    """The issue's yardstick: scipy's default genpareto.fit (Nelder-Mead, xtol 1e-4)."""
    rng = np.random.default_rng(3)
    y = stats.genpareto.rvs(0.4, scale=2.0, size=5000, random_state=rng)
    xi, sigma, _ = tail_fits.gpd_mle(y)
    c, _, scale = stats.genpareto.fit(y, floc=0)
    assert abs(xi - c) <= 1e-4 * abs(c)
    assert abs(sigma - scale) <= 1e-4 * scale


def test_fit_gpd_on_exceedances_of_a_tensor():
    g = torch.Generator().manual_seed(8)
    x = torch.empty(200_000, dtype=torch.float64).cauchy_(generator=g).float()
    fit = gk.fit_gpd(x, k=2000)
    desc = ref.tail_sorted(x)
    u = desc[2000]
    y = desc[:2000] - u
    y = y[y > 0]
    want_xi, want_sigma = ref.gpd_fit(y)
    assert fit.threshold == u and fit.n_exceedances == y.size and fit.k == 2000
    assert abs(fit.xi - want_xi) <= 1e-6 * max(1.0, abs(want_xi))
    assert abs(fit.sigma - want_sigma) <= 1e-6 * want_sigma
    # Cauchy |x|: xi = 1; the fit is within 4 of its standard errors.
    assert abs(fit.xi - 1.0) <= 4 * fit.xi_stderr


def test_fit_gpd_errors():
    with pytest.raises(ValueError, match="k_ratio"):
        gk.fit_gpd(torch.randn(1000), k_ratio=1.5)
    with pytest.raises(ValueError, match="exceedances"):
        gk.fit_gpd(torch.ones(1000), k=10)  # all tied: nothing above X(k+1)
    with pytest.raises(ValueError, match="at least 2"):
        tail_fits.gpd_mle(np.array([1.0]))


@pytest.mark.parametrize("alpha,beta", [(1.5, 0.0), (1.2, 0.5), (0.8, -0.7), (1.0, 0.3),
                                        (1.9, 0.2), (0.6, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fit_stable_matches_scipy_fitstart(alpha, beta, dtype):
    rng = np.random.default_rng(int(100 * alpha + 10 * beta) % 1000)
    d = stats.levy_stable.rvs(alpha, beta, loc=0.3, scale=2.0, size=20_001, random_state=rng)
    x = torch.from_numpy(d).to(dtype)
    got = gk.fit_stable(x)
    want = ref.stable_fitstart(x)
    for g, w in zip(got[:4], want):
        assert abs(g - w) <= 1e-9 * max(1.0, abs(w)), (got, want)


@settings(max_examples=40)
@given(q=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=5, max_size=5, unique=True))
def test_stable_from_quantiles_matches_scipy_on_any_quantiles(q):
    """The table lookups (clamping, sign symmetry, alpha = 2 branch) for arbitrary quantiles:
    scipy's _fitstart on data whose 5 percentiles are exactly these values."""
    q05, q25, q50, q75, q95 = sorted(q)
    # 21 points whose linear percentiles at 5/25/50/75/95 are exactly the sorted q.
    data = np.array([q05 - 1] + [q05] * 1 + [q25] * 4 + [q50] * 5 + [q75] * 5 + [q95] * 4 + [q95 + 1])
    data = np.sort(data)
    assert np.allclose(np.percentile(data, [5, 25, 50, 75, 95]), [q05, q25, q50, q75, q95])
    p = np.percentile(data, [5, 25, 50, 75, 95])
    got = tail_fits.stable_from_quantiles(*p)
    want = stats.levy_stable._fitstart(data)
    for g, w in zip(got[:4], want):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-12)


def test_fit_stable_list_equals_concatenation_and_errors():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5000, generator=g), torch.randn(3001, generator=g)
    assert gk.fit_stable([a, b]) == gk.fit_stable(torch.cat([a, b]))
    with pytest.raises(ValueError, match="NaN"):
        gk.fit_stable(torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="degenerate"):
        gk.fit_stable(torch.ones(100))


def test_vuong_test_matches_reference():
    rng = np.random.default_rng(5)
    for x in (stats.pareto.rvs(1.5, scale=2.0, size=3000, random_state=rng),
              2.0 + stats.expon.rvs(scale=0.5, size=3000, random_state=rng)):
        lr = tail_inference.power_law_vs_exponential(x, 2.0)
        r, p = ref.vuong_power_law_vs_exponential(x, 2.0)
        assert lr.ratio == pytest.approx(r, rel=1e-10)
        assert lr.p_value == pytest.approx(p, rel=1e-8, abs=1e-300)
    pareto = tail_inference.power_law_vs_exponential(
        stats.pareto.rvs(1.5, scale=2.0, size=3000, random_state=rng), 2.0)
    assert pareto.ratio > 0 and pareto.p_value < 1e-6


def _coverage(estimate, truth, n_rep=400):
    hits = 0
    for rep in range(n_rep):
        low, high = estimate(rep)
        hits += low <= truth <= high
    return hits / n_rep


def test_hill_interval_coverage_on_pareto():
    """Nominal 95%: 400 Pareto(alpha = 1.5) samples of 2000, k = 200 (no bias: exact Pareto)."""
    def one(rep):
        g = torch.Generator().manual_seed(1000 + rep)
        x = torch.rand(2000, generator=g, dtype=torch.float64) ** (-1 / 1.5)
        h = gk.hill(x, 200)
        iv = tail_inference.hill_interval(h.alpha, h.k, 0.95)
        return iv.low, iv.high

    assert 0.90 <= _coverage(one, 1.5) <= 0.99


def test_hill_interval_coverage_on_student_t():
    """Student-t(3) has second-order bias (rho = -2/3): k = 40 of 10^4 keeps it below the
    standard error, so the nominal 95% interval covers alpha = 3 in 90-99% of 400 replicates."""
    def one(rep):
        g = torch.Generator().manual_seed(5000 + rep)
        z = torch.randn(10_000, generator=g, dtype=torch.float64)
        chi2 = torch.randn(10_000, 3, generator=g, dtype=torch.float64).pow(2).sum(1)
        x = z / torch.sqrt(chi2 / 3)
        h = gk.hill(x, 40)
        iv = tail_inference.hill_interval(h.alpha, h.k, 0.95)
        return iv.low, iv.high

    assert 0.90 <= _coverage(one, 3.0) <= 0.99


@pytest.mark.parametrize("gamma", [0.5, -0.3])
def test_moment_interval_coverage(gamma):
    """GPD samples (the moment estimator is unbiased to first order there) of either sign."""
    def one(rep):
        rng = np.random.default_rng(9000 + rep + int(gamma * 100))
        x = torch.from_numpy(1.0 + stats.genpareto.rvs(gamma, size=4000, random_state=rng))
        m = gk.moment_estimator(x, 400)
        iv = tail_inference.moment_interval(m.gamma, m.k, 0.95)
        return iv.low, iv.high

    assert 0.90 <= _coverage(one, gamma) <= 0.99


def test_interval_errors():
    with pytest.raises(ValueError, match="level"):
        tail_inference.hill_interval(2.0, 100, level=1.5)
    with pytest.raises(ValueError, match="k"):
        tail_inference.moment_interval(0.1, 0, level=0.9)

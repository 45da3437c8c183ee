"""Double-bootstrap choice of k and tail_index against the sort-based NumPy procedures of
python_tests/reference.py (the common tail-estimation scripts' procedures)."""

import math

import numpy as np
import pytest
import torch

import gradience_kernels as gk
import reference as ref
from gradience_kernels import tail_selection

MASK = (1 << 64) - 1


def _splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def _rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & MASK


def _uniforms(seed, stream, count):
    """The kernel's stream (xoshiro256** seeded by splitmix64), uniforms on (0, 1]."""
    state = (seed ^ ((stream * 0xD1B54A32D192ED03) & MASK)) & MASK
    s = []
    for _ in range(4):
        state, v = _splitmix(state)
        s.append(v)
    out = []
    for _ in range(count):
        result = (_rotl((s[1] * 5) & MASK, 7) * 9) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        out.append(((result >> 11) + 1) * 2.0**-53)
    return np.array(out)


def _resample_desc(desc, m, seed, stream):
    """The kernel's resample, rebuilt in NumPy: sorted uniforms from exponential spacings."""
    e = -np.log(_uniforms(seed, stream, m + 1))
    ranks = np.minimum(desc.size - 1, np.floor(np.cumsum(e[:m]) * (desc.size / e.sum())))
    return desc[ranks.astype(np.int64)]


def test_kernel_statistics_equal_numpy_on_the_same_resamples():
    g = torch.Generator().manual_seed(3)
    x = torch.empty(400, dtype=torch.float64).cauchy_(generator=g).abs()
    desc = np.sort(x.numpy())[::-1]
    logs = torch.from_numpy(np.log(desc).copy())
    m, ks = 150, list(range(1, 150))
    out = torch.ops.gradience.bootstrap_tail_statistics(logs, m, ks, 4, 11, 5).numpy()
    for b in range(4):
        sample = _resample_desc(desc, m, 11, 5 + b)
        want_hill = ref.hill_statistic(sample)
        want_moment = ref.moment_statistic(sample)
        np.testing.assert_allclose(out[b, 0], want_hill, rtol=1e-7, atol=1e-12)
        assert np.array_equal(np.isnan(out[b, 1]), np.isnan(want_moment))
        ok = ~np.isnan(want_moment)
        np.testing.assert_allclose(out[b, 1][ok], want_moment[ok], rtol=1e-6, atol=1e-10)


def test_kernel_resamples_have_the_bootstrap_law():
    """Averages over many resamples match NumPy's own resampling (rng.choice + sort) within
    4 standard errors of the difference, at several k."""
    rng = np.random.default_rng(1)
    desc = np.sort(np.abs(rng.standard_t(3, 300)))[::-1]
    m, ks, r = 200, [2, 10, 50, 150], 3000
    out = torch.ops.gradience.bootstrap_tail_statistics(
        torch.from_numpy(np.log(desc).copy()), m, ks, r, 2, 0).numpy()[:, 0, :]
    theirs = np.array([ref.hill_statistic(np.sort(rng.choice(desc, m))[::-1])[np.array(ks) - 1]
                       for _ in range(r)])
    diff = out.mean(0) - theirs.mean(0)
    se = np.sqrt(out.var(0) / r + theirs.var(0) / r)
    assert np.all(np.abs(diff) <= 4 * se), (diff, se)


def test_kernel_is_independent_of_threads_and_splits():
    logs = torch.sort(torch.randn(5000, dtype=torch.float64).abs().log(), descending=True).values
    ks = [1, 5, 100, 1000]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.gradience.bootstrap_tail_statistics(logs, 2000, ks, 8, 4, 0)
        torch.set_num_threads(3)
        three = torch.ops.gradience.bootstrap_tail_statistics(logs, 2000, ks, 8, 4, 0)
    finally:
        torch.set_num_threads(threads)
    split = torch.cat([torch.ops.gradience.bootstrap_tail_statistics(logs, 2000, ks, 3, 4, 0),
                       torch.ops.gradience.bootstrap_tail_statistics(logs, 2000, ks, 5, 4, 3)])
    for other in (three, split):  # bitwise, NaN where NaN
        torch.testing.assert_close(other, one, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(10, dtype=torch.float32), 5, [1], 1, 0, 0), "float64"),
    ((torch.arange(10.0, dtype=torch.float64), 5, [1], 1, 0, 0), "descending"),
    ((torch.zeros(10, dtype=torch.float64), 5, [5], 1, 0, 0), r"k must be in \[1, m\)"),
    ((torch.zeros(10, dtype=torch.float64), 5, [2, 2], 1, 0, 0), "strictly increasing"),
    ((torch.zeros(10, dtype=torch.float64), 1, [1], 1, 0, 0), "m=1"),
    ((torch.zeros(10, dtype=torch.float64), 5, [1], -1, 0, 0), "n_resamples"),
    ((torch.tensor([0.0, float("-inf")], dtype=torch.float64), 2, [1], 1, 0, 0), "finite"),
])
def test_kernel_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.gradience.bootstrap_tail_statistics(*args)


def _student_t(n, seed):
    return np.random.default_rng(seed).standard_t(3, n)


@pytest.mark.parametrize("estimator", ["hill", "moment"])
def test_double_bootstrap_k_star_inside_the_reference_spread(estimator):
    """k* of the kernel procedure lies inside the range of the reference procedure's k* over
    12 seeds on the same data (both draw their own resamples)."""
    x = _student_t(3000, 17)
    desc = ref.tail_sorted(x)
    procedure = ref.hill_double_bootstrap if estimator == "hill" else ref.moment_double_bootstrap
    theirs = [procedure(desc, r=200, seed=s)["k_star"] for s in range(12)]
    for seed in (0, 1, 2):
        ours = gk.double_bootstrap(torch.from_numpy(x), estimator, r_bootstrap=200, seed=seed)
        assert min(theirs) <= ours.k_star <= max(theirs), (ours, sorted(theirs))
        assert (ours.n1, ours.n2) == ref.bootstrap_sizes(desc.size)


def test_double_bootstrap_is_reproducible_and_validates():
    x = torch.from_numpy(_student_t(4000, 2))
    a = gk.double_bootstrap(x, "hill", r_bootstrap=50, seed=9)
    assert a == gk.double_bootstrap(x, "hill", r_bootstrap=50, seed=9)
    assert a == gk.double_bootstrap([x[:1000], x[1000:]], "hill", r_bootstrap=50, seed=9)
    for kwargs, match in [({"t_bootstrap": 1.0}, "t_bootstrap"), ({"r_bootstrap": 0}, "r_bootstrap"),
                          ({"eps_stop": 0.0}, "eps_stop"), ({"estimator": "pickands"}, "estimator")]:
        with pytest.raises(ValueError, match=match):
            gk.double_bootstrap(x, **kwargs)
    with pytest.raises(ValueError, match="at least 16"):
        gk.double_bootstrap(torch.tensor([1.0, 2.0, 0.0, float("nan")]))


def test_moment_prefactor_matches_reference():
    for xi in (-0.6, -0.2, -0.01, 0.0, 0.3, 1.2):
        for n1, k1 in ((707, 40), (70710, 2500)):
            assert tail_selection._moment_prefactor(xi, n1, k1) == pytest.approx(
                ref.moments_prefactor(xi, n1, k1), rel=1e-12)


_CASES = {
    "pareto": (lambda rng, n: rng.pareto(1.5, n) + 1, "power-law"),
    "student_t3": (lambda rng, n: rng.standard_t(3, n), "power-law"),
    "laplace": (lambda rng, n: rng.laplace(size=n), "exponential-type"),
    "gaussian": (lambda rng, n: rng.standard_normal(n), "exponential-type"),
    "uniform": (lambda rng, n: rng.random(n), "bounded"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_tail_index_verdict_on_a_million_samples(case):
    make, verdict = _CASES[case]
    x = torch.from_numpy(make(np.random.default_rng(100), 10**6))
    res = gk.tail_index(x, r_bootstrap=200)
    assert res.verdict == verdict, res
    if verdict == "power-law":
        truth = {"pareto": 1.5, "student_t3": 3.0}[case]
        assert abs(res.alpha - truth) < 0.2 * truth
        assert res.alpha_interval.low < res.alpha < res.alpha_interval.high
    else:
        assert math.isnan(res.alpha)


def test_tail_index_errors():
    x = torch.randn(1000)
    with pytest.raises(ValueError, match="level"):
        gk.tail_index(x, level=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        gk.tail_index(x, tolerance=-0.1)

"""gradience_kernels.numpy against the tail-estimation scripts' outputs: published-convention
test vectors (computed from the scripts' formulas) and the sort-based reference."""

import numpy as np
import pytest

import reference as ref
from gradience_kernels import numpy as gnp

X12 = np.array([20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1.2])
HILL12 = [0.2876820725, 0.5493061443, 0.5893476475, 0.7296928081, 0.7660758033, 0.861540054,
          1.0261449759, 1.0801984107, 1.1833199164, 1.3526699972, 1.4528435488]
MOMENTS12 = [-3.1059307775e13, -6.2424697415, -1.058747016, -0.88725676329, -0.31323920368,
             -0.20874392364, -0.26787489612, 0.011682859535, 0.11307037113, 0.11769319397,
             0.2791887456]


def test_hill_and_moments_vectors_any_order():
    shuffled = np.random.default_rng(0).permutation(X12)
    k, xi = gnp.hill_estimator(shuffled, bootstrap=False)[:2]
    assert list(k) == list(range(1, 12))
    np.testing.assert_allclose(xi, HILL12, rtol=1e-9)
    k, xi = gnp.moments_estimator(shuffled, bootstrap=False)[:2]
    # k = 1 is degenerate (M2 = M1^2 up to rounding): only its order of magnitude is defined.
    np.testing.assert_allclose(xi[1:], MOMENTS12[1:], rtol=1e-9)
    assert abs(xi[0]) > 1e10


def test_pickands_and_smooth_hill_vectors():
    k, xi = gnp.pickands_estimator(X12[::-1])
    assert k.dtype == np.float64 and list(k) == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(xi, [-0.4854268272, 0.4854268272, 0.3959286763], rtol=1e-9)
    k, xi = gnp.smooth_hill_estimator(X12, 2)
    assert list(k) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(xi, [0.2876820725, 0.5493061443, 0.6595202278, 0.7857695551,
                                    0.933489811, 1.1007746709], rtol=1e-9)
    k, xi = gnp.smooth_hill_estimator(X12, 3)
    np.testing.assert_allclose(xi, [0.2876820725, 0.5693268959, 0.7366640782, 0.9411619947],
                               rtol=1e-9)


def test_kernel_type_vectors():
    y = np.sort((1 - np.random.default_rng(7).random(1000)) ** (-0.5))[::-1]
    np.testing.assert_allclose(y[:3], [32.5948337001, 18.9918813031, 17.5985576822], rtol=1e-9)
    k, xi = gnp.kernel_type_estimator(y, 10, 0.6, bootstrap=False)[:2]
    assert list(k) == [1, 2, 4, 10, 21, 46, 100, 215, 464, 1000]
    want = [np.nan, -0.20907094294, 0.20143879984, 0.21777712788, 0.11480724465, 0.44791146559,
            0.42630195474, 0.41947640874, 0.44583495087, 0.4646411205]
    assert np.isnan(xi[0])  # no term at h = 1/n (the scripts read a wrapped index there)
    np.testing.assert_allclose(xi[1:], want[1:], rtol=1e-8)


def test_arrays_equal_reference_on_random_data():
    x = np.abs(np.random.default_rng(3).standard_cauchy(5000)) + 1e-9
    desc = ref.tail_sorted(x)
    _, xi = gnp.hill_estimator(x, bootstrap=False)[:2]
    for k in (1, 10, 500, 4999):
        assert xi[k - 1] == pytest.approx(ref.hill(x, k) ** -1, rel=1e-10)
    _, xi = gnp.moments_estimator(x, bootstrap=False)[:2]
    for k in (10, 500, 4999):
        assert xi[k - 1] == pytest.approx(ref.moment(x, k), rel=1e-9)
    _, xi = gnp.pickands_estimator(x)
    assert xi[99] == pytest.approx(ref.pickands(desc, 100), rel=1e-12)


def test_bootstrap_results_and_conventions():
    x = np.abs(np.random.default_rng(5).standard_t(3, 4000))
    out = gnp.hill_estimator(x, r_bootstrap=100, seed=1)
    assert len(out) == 12
    k_arr, xi_arr, k_star, xi_star = out[:4]
    assert 1 <= k_star < x.size and xi_star == xi_arr[k_star - 1]
    n1, n2 = ref.bootstrap_sizes(x.size)
    assert 0 < out[6] <= 1 and 0 < out[10] <= 1  # k1/n1 and k2/n2 are fractions
    assert out[4] is None and out[5] is None
    diag = gnp.hill_estimator(x, r_bootstrap=100, seed=1, diagn_plots=True)
    assert diag[2] == k_star and diag[4].size == n1 and diag[5].size == n1 - 1
    assert np.nanargmin(diag[5]) + 1 == round(diag[6] * n1)
    np.random.seed(4)
    a = gnp.moments_estimator(x, r_bootstrap=100)[2]
    np.random.seed(4)
    assert gnp.moments_estimator(x, r_bootstrap=100)[2] == a  # np.random.seed makes it repeatable
    k_star_kernel = gnp.kernel_type_estimator(x, 50, r_bootstrap=20, seed=3)[2]
    assert 1 <= k_star_kernel < x.size


def test_dropin_errors():
    with pytest.raises(ValueError, match="data"):
        gnp.hill_estimator([1.0, -2.0, 3.0, 4.0], bootstrap=False)
    with pytest.raises(ValueError, match="data"):
        gnp.hill_estimator([1.0, 2.0], bootstrap=False)
    with pytest.raises(ValueError, match="r_smooth"):
        gnp.smooth_hill_estimator(X12, 1)
    with pytest.raises(ValueError, match="hsteps"):
        gnp.kernel_type_estimator(X12, 1)
    with pytest.raises(ValueError, match="alpha"):
        gnp.kernel_type_estimator(X12, 5, alpha=0.5)

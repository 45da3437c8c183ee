"""Public API behaviour: argument errors, no mutation, list == concatenation, per-tensor,
hill_plot == hill, determinism, estimator semantics."""

import math

import numpy as np
import pytest
import torch

import gradience_kernels as gk
import reference as ref


def cauchy(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(n, dtype=torch.float64).cauchy_(generator=g).to(dtype)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_rejects_non_float_dtypes(dtype):
    x = torch.ones(10, dtype=dtype)
    with pytest.raises(TypeError, match=r"x\[0\].*float16, bfloat16, float32 or float64.*"):
        torch.ops.gradience.hill(x, 2)
    with pytest.raises(TypeError, match=r"xs\[0\]: expected a float16"):
        gk.hill_plot(x, [2])


def test_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match=r"xs\[1\].*share a dtype.*Double.*Float"):
        gk.hill([cauchy(10), cauchy(10, torch.float64)], k=2)


def test_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        gk.hill(torch.empty(0), k=1)
    with pytest.raises(ValueError, match=r"x: expected a tensor or a non-empty list"):
        gk.hill([], k=1)
    with pytest.raises(ValueError, match="non-empty"):
        gk.quantile(torch.empty(0), 0.5)


@pytest.mark.parametrize("k", [0, -3])
def test_rejects_small_k(k):
    with pytest.raises(ValueError, match=rf"k must be >= 1, got k={k}"):
        gk.hill(cauchy(100), k)
    with pytest.raises(ValueError, match=rf"k must be >= 1, got k={k}"):
        torch.ops.gradience.hill(cauchy(100), k)


def test_rejects_k_at_or_above_n_eff():
    x = cauchy(100)
    x[:30] = 0.0
    x[30:35] = float("nan")
    with pytest.raises(ValueError, match=r"k=65 must be < n_eff=65 .*n_zero=30, n_nan=5, n_inf=0"):
        gk.hill(x, 65)
    with pytest.raises(ValueError, match=r"k=100 for a sample of only 100 entries|got k=100"):
        gk.hill(x, 100)
    gk.hill(x, 64)  # the largest valid k


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_rejects_k_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"k_ratio must be in \(0, 1\), got k_ratio="):
        gk.hill(cauchy(100), k_ratio=ratio)


def test_k_ratio_giving_k_zero():
    with pytest.raises(ValueError, match=r"gives k=floor.*=0 for n_eff=100"):
        gk.hill(cauchy(100), k_ratio=0.001)


def test_requires_exactly_one_of_k_and_k_ratio():
    with pytest.raises(ValueError, match=r"exactly one of k and k_ratio, got k=None and k_ratio=None"):
        gk.hill(cauchy(100))
    with pytest.raises(ValueError, match=r"got k=5 and k_ratio=0.1"):
        gk.moment_estimator(cauchy(100), 5, k_ratio=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        gk.pickands(cauchy(100))


def test_other_argument_errors():
    x = cauchy(100)
    with pytest.raises(ValueError, match=r"q\[1\]: q must be in \[0, 1\], got q=1.5"):
        gk.quantile(x, [0.5, 1.5])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        gk.quantile(x, 0.5, interpolation="cubic")
    with pytest.raises(ValueError, match=r"ranks\[0\]: rank must be in \[1, n\], got rank=0"):
        gk.order_statistics(x, [0])
    with pytest.raises(ValueError, match=r"pickands needs 4k <= n_eff, got k=30"):
        gk.pickands(x, 30)
    with pytest.raises(ValueError, match=r"ks: expected at least one k"):
        gk.hill_plot(x, [])
    with pytest.raises(TypeError, match=r"x\[1\]: expected a tensor, got int"):
        gk.hill([x, 3], k=2)


# ----------------------------------------------------------------------------- semantics
def test_inputs_are_not_mutated():
    x = cauchy(50_000)
    x[::5] = float("nan")
    x[1::9] = -0.0
    bits = x.view(torch.int32).clone()
    gk.hill(x, 100)
    gk.moment_estimator(x, k_ratio=0.1)
    gk.quantile(x, [0.1, 0.9])
    gk.order_statistics(x, [1, 2], absolute=False)
    assert torch.equal(x.view(torch.int32), bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_list_is_one_sample(dtype):
    parts = [cauchy(n, dtype, seed=i) for i, n in enumerate([10, 70_000, 3, 150_001])]
    parts[1] = parts[1].reshape(700, 100).t()  # a non-contiguous member
    whole = torch.cat([p.reshape(-1) for p in parts])
    ks = [1, 50, 5000, 100_000]
    rows_list, counts_list = gk.tail_stats(parts, ks)
    rows_cat, counts_cat = gk.tail_stats(whole, ks)
    assert torch.equal(counts_list, counts_cat)
    assert torch.equal(rows_list[:, :3], rows_cat[:, :3])  # k and order statistics: exact
    # Log sums may be grouped differently: equal within the derived floating-point bound.
    ref.assert_log_sums_close(rows_list, rows_cat, whole, ks)


def test_per_tensor_equals_separate_calls():
    parts = [cauchy(n, seed=i) for i, n in enumerate([1000, 5000, 200_000])]
    res = gk.hill(parts, k_ratio=0.05, per_tensor=True)
    mom = gk.moment_estimator(parts, k=20, per_tensor=True)
    for i, p in enumerate(parts):
        single = gk.hill(p, k_ratio=0.05)
        assert torch.equal(res.alpha[i], single.alpha)
        assert torch.equal(res.k[i], single.k)
        assert torch.equal(res.n_eff[i], single.n_eff)
        assert torch.equal(mom.gamma[i], gk.moment_estimator(p, k=20).gamma)


def test_per_tensor_error_names_the_tensor():
    # The second tensor has 30 entries but only 10 of them are nonzero.
    parts = [cauchy(100), torch.cat([cauchy(10), torch.zeros(20)])]
    with pytest.raises(ValueError, match=r"xs\[1\]: k=20 must be < n_eff=10"):
        gk.hill(parts, k=20, per_tensor=True)


def test_hill_plot_equals_hill():
    x = cauchy(300_000)
    ks = [5, 50, 500, 5000, 50_000, 299_000]
    plot = gk.hill_plot(x, ks)
    assert plot.alpha.shape == (len(ks),)
    for i, k in enumerate(ks):
        single = gk.hill(x, k)
        assert math.isclose(plot.alpha[i].item(), single.alpha.item(), rel_tol=1e-12)
        assert plot.threshold[i].item() == single.threshold.item()


def test_deterministic():
    x = cauchy(1_000_003)
    a = gk.tail_stats(x, [10, 1000, 100_000])[0]
    b = gk.tail_stats(x, [10, 1000, 100_000])[0]
    assert torch.equal(a, b)


def test_result_fields():
    x = cauchy(10_000)
    x[:100] = 0.0
    x[100:110] = float("inf")
    x[110:115] = float("nan")
    r = gk.hill(x, k=200)
    assert r.k.item() == 200 and r.n_eff.item() == 9885
    assert (r.n_zero.item(), r.n_nan.item(), r.n_inf.item()) == (100, 5, 10)
    assert r.threshold.item() == ref.tail_sorted(x)[200]
    assert math.isclose(r.stderr.item(), r.alpha.item() / math.sqrt(200))
    assert math.isclose(r.gamma.item() * r.alpha.item(), 1.0)
    assert r.alpha.dtype == torch.float64 and r.alpha.dim() == 0


def test_hill_recovers_pareto_index():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2_000_000, generator=g, dtype=torch.float64)
    x = u.pow(-1.0 / 1.5)  # Pareto(alpha=1.5)
    r = gk.hill(x, k=20_000)
    assert abs(r.alpha.item() - 1.5) < 4 * r.stderr.item()


def test_moment_tells_exponential_from_power_law():
    torch.manual_seed(1)
    n = 1_000_000
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    student = torch.distributions.StudentT(3.0).sample((n,))
    gl = gk.moment_estimator(laplace, k_ratio=0.01)
    gs = gk.moment_estimator(student, k_ratio=0.01)
    assert abs(gl.gamma.item()) < 4 * gl.stderr.item()
    assert abs(gs.gamma.item() - 1 / 3) < 4 * gs.stderr.item()


def test_requires_grad_inputs_are_fine():
    w = cauchy(1000).requires_grad_()
    r = gk.hill(w, 10)
    assert not r.alpha.requires_grad
    np.testing.assert_allclose(r.alpha.item(), ref.hill(w.detach(), 10), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_thread_count_changes_only_rounding(dtype):
    """1 and 2 threads split the work differently: order statistics stay bitwise equal, log
    sums equal within the floating-point bound; each thread count is itself deterministic."""
    x = cauchy(6_000_000, dtype, seed=9)
    ks = [3, 4000, 600_000]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, counts_one = gk.tail_stats(x, ks)
        torch.set_num_threads(2)
        two, counts_two = gk.tail_stats(x, ks)
        again, _ = gk.tail_stats(x, ks)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(two, again)
    assert torch.equal(counts_one, counts_two)
    assert torch.equal(one[:, :3], two[:, :3])
    ref.assert_log_sums_close(one, two, x, ks)

"""The fused tail primitive against the float64 sort-based reference, for any input."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradience_kernels as gk
import reference as ref
from strategies import FLOAT_DTYPES, samples

FIELDS = ["k", "x_k1", "x_k", "s1", "s2", "h1", "h2"]


def assert_rows_match(rows: torch.Tensor, counts: torch.Tensor, x, ks, desc=None) -> None:
    c = ref.counts(x)
    assert counts.tolist() == [c["n_eff"], c["n_zero"], c["n_nan"], c["n_inf"]]
    if desc is None:
        desc = ref.tail_sorted(x)
    for row, k in zip(rows.tolist(), ks):
        want = ref.tail_row(x, k, desc)
        got = dict(zip(FIELDS, row))
        # Order statistics are values of the input: exact.
        assert got["k"] == k
        assert got["x_k1"] == want["x_k1"]
        assert got["x_k"] == want["x_k"]
        tol1, tol2 = ref.log_sum_tolerances(x, k, desc)
        for name, tol in (("s1", tol1), ("h1", tol1), ("s2", tol2), ("h2", tol2)):
            assert abs(got[name] - want[name]) <= tol, (name, k, got[name], want[name], tol)


@given(x=samples(), data=st.data())
def test_tail_stats_matches_sorted_reference(x, data):
    n_eff = ref.counts(x)["n_eff"]
    assume(n_eff >= 2)
    ks = data.draw(st.lists(st.integers(1, n_eff - 1), min_size=1, max_size=6))
    rows, counts = gk.tail_stats(x, ks)
    assert_rows_match(rows, counts, x, ks)


@given(x=samples(nonfinite=False), data=st.data())
def test_order_statistics_both_modes(x, data):
    n = x.numel()
    ranks = data.draw(st.lists(st.integers(1, n), min_size=1, max_size=5))
    got = gk.order_statistics(x, ranks, absolute=False)
    np.testing.assert_array_equal(got.numpy(), ref.kth_smallest(x, ranks))
    n_eff = ref.counts(x)["n_eff"]
    assume(n_eff >= 1)
    ranks = data.draw(st.lists(st.integers(1, n_eff), min_size=1, max_size=5))
    got = gk.order_statistics(x, ranks, absolute=True)
    np.testing.assert_array_equal(got.numpy(), ref.kth_largest_abs(x, ranks))


@given(
    x=samples(nonfinite=False),
    q=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    method=st.sampled_from(["linear", "lower", "higher", "nearest", "midpoint"]),
)
def test_quantile_matches_numpy(x, q, method):
    got = gk.quantile(x, q, interpolation=method)
    assert got.dtype == x.dtype and got.shape == (len(q),)
    want = torch.from_numpy(ref.quantile(x, q, method)).to(x.dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_quantile_nan_propagates():
    x = torch.tensor([1.0, float("nan"), 3.0])
    assert torch.isnan(gk.quantile(x, [0.0, 0.5, 1.0])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["linear", "lower", "higher", "nearest", "midpoint"])
def test_quantile_agrees_with_torch(dtype, method):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_001, generator=g, dtype=torch.float64).to(dtype)
    # Dyadic q: torch computes the position (n-1)q in the input dtype, this library in float64;
    # for these q both are exact, so any difference would be in the selection.
    q = torch.tensor([0.0, 1 / 1024, 0.25, 0.5, 0.75, 1023 / 1024, 1.0], dtype=dtype)
    want = torch.quantile(x, q, interpolation=method)
    got = gk.quantile(x, q, interpolation=method)
    # torch interpolates in the input dtype, this library in float64: one rounding apart.
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("special", ["plain", "zeros_nan_inf", "strided"])
def test_multithreaded_sizes(dtype, special):
    """Inputs large enough to be split across threads and blocks."""
    g = torch.Generator().manual_seed(11)
    x = torch.empty(400_003, dtype=torch.float64).cauchy_(generator=g)
    if special == "zeros_nan_inf":
        x[::7] = 0.0
        x[1::101] = float("nan")
        x[2::103] = float("inf")
        x[3::107] = -0.0
    x = x.to(dtype)
    if special == "strided":
        x = x[: 400_003 // 7 * 7].reshape(-1, 7)[:, 1:5].t()
    n_eff = ref.counts(x)["n_eff"]
    ks = [1, 17, n_eff // 100, n_eff // 10, n_eff // 2, n_eff - 1]
    rows, counts = gk.tail_stats(x, ks)
    assert_rows_match(rows, counts, x, ks)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_estimators_relative_error(dtype):
    """alpha, gamma of Hill/moment/Pickands equal the float64 reference to rel 1e-6 or better."""
    g = torch.Generator().manual_seed(5)
    x = (torch.empty(200_000, dtype=torch.float64).cauchy_(generator=g)).to(dtype)
    for k in [10, 1000, 20_000]:
        assert math.isclose(gk.hill(x, k).alpha.item(), ref.hill(x, k), rel_tol=1e-9)
        assert math.isclose(gk.moment_estimator(x, k).gamma.item(), ref.moment(x, k), rel_tol=1e-9)
        assert math.isclose(gk.pickands(x, k).gamma.item(), ref.pickands(x, k), rel_tol=1e-12)


@functools.lru_cache(maxsize=1)
def _sampled_cases():
    """float32 samples above the engine's sampled-single-pass threshold (2^22 entries)."""
    g = torch.Generator().manual_seed(21)
    n = 5_000_000
    cauchy = torch.empty(n, dtype=torch.float64).cauchy_(generator=g).float()
    specials = cauchy.clone()
    specials[::9] = 0.0
    specials[1::1001] = float("nan")
    specials[2::1003] = float("inf")
    ascending = torch.sort(torch.randn(n, generator=g)).values
    # Huge values in one short run that no sampled block covers: the sample misplaces the top
    # ranks, the pass finds them outside their windows, and the exact path answers.
    burst = torch.randn(n, generator=g) * 1e-3
    burst[2_500_100:2_500_400] = 1e3 + torch.arange(300, dtype=torch.float32)
    ties = torch.randint(1, 6, (n,), generator=g).float()
    # The whole tail in the last quarter of the data: the last of 4 threads meets every key of
    # the rank windows (1.1 MiB of them for the Hill-plot ks below).
    tail_last_quarter = torch.randn(n, generator=g) * 1e-3
    tail_last_quarter[3 * n // 4:] = torch.randn(n - 3 * n // 4, generator=g)
    return {"cauchy": cauchy, "specials": specials, "ascending": ascending, "burst": burst,
            "ties": ties, "tail_last_quarter": tail_last_quarter}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["cauchy", "specials", "ascending", "burst", "ties"])
def test_sampled_single_pass_is_exact(case, dtype):
    x = _sampled_cases()[case].to(dtype)
    n_eff = ref.counts(x)["n_eff"]
    for ks in ([1], [150], [n_eff // 10], [n_eff // 3, n_eff // 3 + 1]):
        rows, counts = gk.tail_stats(x, ks)
        assert_rows_match(rows, counts, x, ks)
    rows, counts = gk.tail_stats(x, [], [0.05])
    assert_rows_match(rows, counts, x, [int(0.05 * n_eff)])
    # Many ranks (a log-spaced Hill plot): the two-pass path with a sampled lower bound.
    ks = sorted({int(v) for v in np.geomspace(1, n_eff // 5, 40)})
    rows, counts = gk.tail_stats(x, ks)
    assert_rows_match(rows, counts, x, ks)


@pytest.mark.parametrize("case", ["cauchy", "ascending", "burst", "ties", "tail_last_quarter"])
def test_hill_plot_window_buffer_paths(case, monkeypatch):
    """Every way the Hill-plot path can take its last digit gives the exact rows.

    The two-pass path keeps the keys of the sampled rank windows in a buffer (budget
    GRADIENCE_WINDOW_BUFFER_MIB) and reads the rank bins from it. It reads the data a second
    time instead with no budget, when the sample expects more keys than half of it, when a
    rank bin lies outside the windows (sorted data, "burst"), or when one thread's share
    overflows ("tail_last_quarter" on 4 threads with 3 MiB: all 1.1 MiB in the last thread,
    0.75 MiB each).
    """
    x = _sampled_cases()[case]
    n_eff = ref.counts(x)["n_eff"]
    desc = ref.tail_sorted(x)
    ks = sorted({int(v) for v in np.geomspace(1, n_eff // 5, 40)})
    threads = torch.get_num_threads()
    try:
        for budget in ("0", "0.5", "3", "8", "48"):
            monkeypatch.setenv("GRADIENCE_WINDOW_BUFFER_MIB", budget)
            for n_threads in (1, 4):
                torch.set_num_threads(n_threads)
                rows, counts = gk.tail_stats(x, ks)
                assert_rows_match(rows, counts, x, ks, desc)
    finally:
        torch.set_num_threads(threads)

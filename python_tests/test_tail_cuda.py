"""The CUDA kernels of the tail ops against the CPU kernels (issue 4): order statistics and
counts bitwise, log sums to rel 1e-9, every op, every dtype, lists with strided tensors,
zeros/NaN/Inf, signed and |x| ranks. Skipped, with the reason, on machines without a GPU; the
host walk those kernels feed is tested on CPU in test_host_descent.py."""

import math

import pytest
import torch

import gradience_kernels as gk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA kernels need a GPU (bench/gpu_check.sh)")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _sample(dtype, n, seed, specials=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.float64).cauchy_(generator=g)
    if specials:
        x[::53] = 0.0
        x[7::211] = -0.0
        x[3::1009] = float("inf")
        x[5::1019] = -float("inf")
        x[4::1013] = float("nan")
    x[100:400] = x[100]  # ties
    return x.to(dtype)


def _lists(dtype, seed):
    """A contiguous tensor, a transposed one and an empty one: one sample of three tensors."""
    a = _sample(dtype, 250_000, seed)
    b = _sample(dtype, 60_000, seed + 1).reshape(300, 200).t()
    return [a, b, torch.empty(0, dtype=dtype)]


def _cuda(xs):
    return [t.cuda() for t in xs]


def _assert_rows(got_rows, want_rows):
    got, want = got_rows.cpu(), want_rows
    assert torch.equal(got[..., :3], want[..., :3])  # k, X(k+1), X(k)
    torch.testing.assert_close(got[..., 3:], want[..., 3:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tail_stats_cuda_equals_cpu(dtype):
    xs = _lists(dtype, 1)
    ks, ratios = [1, 9, 1000, 50_000], [0.01, 0.1, 0.5]
    want_rows, want_counts = torch.ops.gradience.tail_stats(xs, ks, ratios)
    rows, counts = torch.ops.gradience.tail_stats(_cuda(xs), ks, ratios)
    assert rows.device.type == "cuda" and counts.device.type == "cuda"
    assert torch.equal(counts.cpu(), want_counts)
    _assert_rows(rows, want_rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_and_hill_cuda_equal_cpu(dtype):
    xs = _lists(dtype, 2)[:2]
    want_rows, want_counts = torch.ops.gradience.tail_stats_per_tensor(xs, [5, 77], [0.05])
    rows, counts = torch.ops.gradience.tail_stats_per_tensor(_cuda(xs), [5, 77], [0.05])
    assert torch.equal(counts.cpu(), want_counts)
    _assert_rows(rows, want_rows)
    want = torch.ops.gradience.hill(xs[0], 1234)
    got = torch.ops.gradience.hill(xs[0].cuda(), 1234)
    assert got.device.type == "cuda"
    assert math.isclose(float(got), float(want), rel_tol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_order_statistics_cuda_equal_cpu(dtype, absolute):
    xs = [_sample(dtype, 200_000, 4, specials=absolute)]
    n = 200_000
    ranks = [1, 2, 17, n // 3, n // 2, n - 5000] if absolute else [1, 2, n // 2, n - 1, n]
    want = torch.ops.gradience.order_statistics(xs, ranks, absolute)
    got = torch.ops.gradience.order_statistics(_cuda(xs), ranks, absolute)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["linear", "lower", "higher", "nearest", "midpoint"])
def test_quantile_cuda_equals_cpu_and_torch(dtype, method):
    x = _sample(dtype, 100_001, 6, specials=False)
    q = [0.0, 0.001, 0.25, 0.5, 0.999, 1.0]
    want = torch.ops.gradience.quantile([x], q, method)
    got = torch.ops.gradience.quantile([x.cuda()], q, method)
    assert got.dtype == dtype and torch.equal(got.cpu(), want)
    with_nan = x.clone()
    with_nan[10] = float("nan")
    assert torch.isnan(torch.ops.gradience.quantile([with_nan.cuda()], q, method)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_pass_ops_cuda_equal_cpu(dtype, absolute):
    xs = _lists(dtype, 7)
    hist, counts = torch.ops.gradience.tail_histogram(_cuda(xs), absolute)
    want_hist, want_counts = torch.ops.gradience.tail_histogram(xs, absolute)
    assert torch.equal(hist.cpu(), want_hist) and torch.equal(counts.cpu(), want_counts)
    levels = {torch.float32: 2, torch.float64: 4}.get(dtype, 1)
    sums = absolute
    for level in range(1, levels):
        if level == 1:
            top = int(torch.nonzero(want_hist)[-1])
            bins = sorted({top // 3, top // 2, top - 1, top})
        else:
            bins = [1 << 30, (1 << 31) + 5]
        got = torch.ops.gradience.tail_level_pass(_cuda(xs), absolute, level, bins, sums)
        want = torch.ops.gradience.tail_level_pass(xs, absolute, level, bins, sums)
        assert torch.equal(got[0].cpu(), want[0])
        assert float(got[3]) == float(want[3])
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-9, atol=1e-9)


def test_cuda_results_are_deterministic():
    x = _sample(torch.float32, 3_000_000, 8).cuda()
    first = torch.ops.gradience.tail_stats([x], [10, 30_000, 300_000], [])
    for _ in range(3):
        again = torch.ops.gradience.tail_stats([x], [10, 30_000, 300_000], [])
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_cuda_input_not_mutated_and_errors_named():
    x = _sample(torch.float32, 10_000, 9).cuda()
    before = x.clone()
    torch.ops.gradience.tail_stats([x], [10], [0.1])
    assert torch.equal(torch.isnan(x), torch.isnan(before))
    assert torch.equal(x.nan_to_num(), before.nan_to_num())
    with pytest.raises(ValueError, match="k must be"):
        torch.ops.gradience.tail_stats([x], [10**6], [])
    with pytest.raises(ValueError, match="device"):
        torch.ops.gradience.tail_stats([x, x.cpu()], [10], [])

"""The GPU backends of the tail passes against the C++ CPU passes and the float64 sort
reference: Triton (interpreter on CPU, compiled on CUDA) and the C++ library's CUDA kernels
(GPU only)."""

import pytest
import torch

import gradience_kernels as gk
import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _sample(dtype, n=30_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.float64).cauchy_(generator=g)
    x[::53] = 0.0
    x[3::1009] = float("inf")
    x[4::1013] = float("nan")
    x[100:400] = x[100]  # ties
    return x.to(dtype)


def _assert_rows_close(rows, want_rows, x, ks):
    """Order statistics exact, log sums within twice the derived bound (two roundings)."""
    desc = ref.tail_sorted(x)
    for got, want, k in zip(rows.cpu().tolist(), want_rows.tolist(), ks):
        assert got[:3] == want[:3]
        tol1, tol2 = ref.log_sum_tolerances(x, k, desc)
        for j, tol in ((3, tol1), (4, tol2), (5, tol1), (6, tol2)):
            assert abs(got[j] - want[j]) <= 2 * tol, (k, j, got[j], want[j])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_passes_equal_library_passes(dtype):
    x = _sample(dtype)
    want_hist, want_counts = torch.ops.gradience.tail_histogram([x], True)
    hist, counts = torch.ops.gradience_triton.tail_histogram([x.to(DEVICE)])
    assert torch.equal(hist.cpu(), want_hist) and torch.equal(counts.cpu(), want_counts)
    levels = {torch.float32: 2, torch.float64: 4}.get(dtype, 1)
    for level in range(1, levels):
        top = int(torch.nonzero(want_hist)[-1])
        bins = sorted({top // 3, top // 2, top - 1, top}) if level == 1 else [1 << 30, (1 << 31) + 5]
        got = torch.ops.gradience_triton.tail_level_pass([x.to(DEVICE)], level, bins, True)
        want = torch.ops.gradience.tail_level_pass([x], True, level, bins, True)
        assert torch.equal(got[0].cpu(), want[0])
        assert float(got[3]) == pytest.approx(float(want[3]), rel=1e-15)
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_tail_stats_matches_reference(dtype):
    x = _sample(dtype, seed=3)
    xs = [x[:10_000].to(DEVICE), x[10_000:].reshape(100, 200).t().to(DEVICE)]  # one strided
    n_eff = ref.counts(x)["n_eff"]
    ks = [1, 7, 300, n_eff // 2, n_eff - 1]
    rows, counts = gk.tail_stats(xs, ks, backend="triton")
    want_rows, want_counts = gk.tail_stats(x, ks)
    assert torch.equal(counts.cpu(), want_counts)
    _assert_rows_close(rows, want_rows, x, ks)


def test_triton_backend_errors():
    with pytest.raises(ValueError, match="backend"):
        gk.tail_stats(torch.randn(100), [5], backend="gpu")
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.gradience_triton.tail_histogram([torch.arange(10)])
    with pytest.raises(ValueError, match="level"):
        torch.ops.gradience_triton.tail_level_pass([torch.randn(100)], 2, [1], True)
    with pytest.raises(ValueError, match="increasing"):
        torch.ops.gradience_triton.tail_level_pass([torch.randn(100)], 1, [3, 2], True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA passes need a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_passes_equal_cpu_passes(dtype):
    x = _sample(dtype, n=300_000, seed=5)
    xc = x.cuda()
    hist, counts = torch.ops.gradience.tail_histogram([xc], True)
    want_hist, want_counts = torch.ops.gradience.tail_histogram([x], True)
    assert torch.equal(hist.cpu(), want_hist) and torch.equal(counts.cpu(), want_counts)
    n_eff = ref.counts(x)["n_eff"]
    ks = [1, 9, 1000, n_eff // 2, n_eff - 1]
    rows, got_counts = gk.tail_stats(xc, ks, backend="passes")
    want_rows, _ = gk.tail_stats(x, ks)
    assert torch.equal(got_counts.cpu(), want_counts)
    _assert_rows_close(rows, want_rows, x, ks)

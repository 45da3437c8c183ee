"""The host-walked radix descent, which the CUDA engine runs over its device passes
(csrc/tail/host_descent.cpp), held to the float64 sort references on CPU: with
GRADIENCE_HOST_DESCENT=1 the CPU tail ops resolve ranks by walking the CPU engine's pass
histograms on the host exactly as they walk the CUDA passes' histograms on a GPU. Machines
without a GPU thereby test everything of the CUDA path except the kernels themselves."""

import os

import pytest
import torch

import gradience_kernels as gk
import reference as ref

# The reference tests of test_tail_exact, collected again here under the host descent.
from test_tail_exact import (  # noqa: F401
    test_multithreaded_sizes,
    test_order_statistics_both_modes,
    test_quantile_agrees_with_torch,
    test_quantile_matches_numpy,
    test_tail_stats_matches_sorted_reference,
)


@pytest.fixture(autouse=True, scope="module")
def host_descent():
    # Module scope: hypothesis tests may not use function-scoped fixtures. The variable is read
    # by the C++ glue at every call.
    before = os.environ.get("GRADIENCE_HOST_DESCENT")
    os.environ["GRADIENCE_HOST_DESCENT"] = "1"
    yield
    if before is None:
        del os.environ["GRADIENCE_HOST_DESCENT"]
    else:
        os.environ["GRADIENCE_HOST_DESCENT"] = before


def _sum_fields_differ_somewhere() -> bool:
    """True when the log sums differ in some last bit from the fused engine's: the variable is
    honoured (both are within the derived bounds of the reference)."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(200_000, dtype=torch.float64).cauchy_(generator=g)
    ks = list(range(100, 5000, 97))
    walked, _ = torch.ops.gradience.tail_stats([x], ks, [])
    os.environ["GRADIENCE_HOST_DESCENT"] = "0"
    try:
        fused, _ = torch.ops.gradience.tail_stats([x], ks, [])
    finally:
        os.environ["GRADIENCE_HOST_DESCENT"] = "1"
    assert torch.equal(walked[:, :3], fused[:, :3])  # order statistics: exact in both
    return not torch.equal(walked, fused)


def test_the_switch_selects_the_host_walk():
    assert _sum_fields_differ_somewhere()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_per_tensor_and_pass_ops_under_the_host_walk(dtype):
    g = torch.Generator().manual_seed(3)
    xs = [torch.empty(n, dtype=torch.float64).cauchy_(generator=g).to(dtype)
          for n in (5000, 20_000)]
    xs[1][::17] = 0.0
    xs[1][5::101] = float("inf")
    rows, counts = gk.tail_stats(xs, [3, 400], per_tensor=True)
    for t, x in enumerate(xs):
        desc = ref.tail_sorted(x)
        c = ref.counts(x)
        assert counts[t].tolist() == [c["n_eff"], c["n_zero"], c["n_nan"], c["n_inf"]]
        for row, k in zip(rows[t].tolist(), [3, 400]):
            want = ref.tail_row(x, k, desc)
            assert row[1] == want["x_k1"] and row[2] == want["x_k"]
            tol1, tol2 = ref.log_sum_tolerances(x, k, desc)
            assert abs(row[5] - want["h1"]) <= tol1 and abs(row[6] - want["h2"]) <= tol2

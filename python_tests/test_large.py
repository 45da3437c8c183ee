"""More than 2^31 elements (64-bit indexing, 32-bit counter flushes), without allocating them:
a broadcast (stride-0) view repeats 1024 distinct values 2^21 + 1 times."""

import math

import pytest
import torch

import gradience_kernels as gk

REPEATS = 2**21 + 1
N_DISTINCT = 1024


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_than_2_pow_31_elements(dtype):
    # 1024 consecutive bfloat16 numbers from 1.0 up: distinct in both dtypes.
    bits = (torch.arange(N_DISTINCT, dtype=torch.int32) + 0x3F80).to(torch.int16)
    values = bits.view(torch.bfloat16).to(dtype)
    d = values.numel()
    x = values.reshape(1, d).expand(REPEATS, d)
    n = REPEATS * d
    assert n > 2**31
    desc = torch.sort(values.double(), descending=True).values
    top = 10
    k = top * REPEATS
    rows, counts = gk.tail_stats(x, [k])
    assert counts.tolist() == [n, 0, 0, 0]
    assert rows[0, 1].item() == desc[top].item()  # X(k+1): the 11th largest value
    assert rows[0, 2].item() == desc[top - 1].item()
    want_h1 = REPEATS * sum(math.log(desc[j].item() / desc[top].item()) for j in range(top))
    assert math.isclose(rows[0, 5].item(), want_h1, rel_tol=1e-9)
    # The median of the signed values sits between the two middle distinct values.
    mid = gk.order_statistics(x, [n // 2], absolute=False)
    assert mid.item() == torch.sort(values.double()).values[(d - 1) // 2].item()

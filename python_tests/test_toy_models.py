"""The in-code toy models of gradience_kernels.toy_models: sizes, shapes, determinism, SDPA.

Parameter counts by hand (weights + biases):
- tiny mlp 8-32-32-4: (8*32+32) + (32*32+32) + (32*4+4) = 1,476;
- tiny cnn 1x8x8, convs 8, 12, head 5: (1*8*9+8) + (8*12*9+12) + (12*2*2*5+5) = 1,201;
- tiny transformer in 4, d 12, 2 layers, MLP 24, seq 6, 3 classes: per layer LN 24 + qkv
  (12*36+36) + out (12*12+12) + LN 24 + fc1 (12*24+24) + fc2 (24*12+12) = 1,284; plus input
  projection 4*12+12, positions 6*12, final LN 24, head 12*3+3: 2*1,284 + 195 = 2,763.
"""

from unittest import mock

import pytest
import torch

from gradience_kernels import toy_models as tm

NAMES = ["mlp", "cnn", "transformer"]


@pytest.mark.parametrize("name,expected", [("mlp", 1476), ("cnn", 1201), ("transformer", 2763)])
def test_tiny_parameter_counts(name, expected):
    model = tm.make_model(name, "tiny")
    assert tm.count_parameters(model) == expected <= 5000


@pytest.mark.parametrize("name", NAMES)
def test_bench_sizes_in_range(name):
    n = tm.count_parameters(tm.make_model(name, "bench"))
    assert 50_000 <= n <= 300_000


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shapes_and_dtype(name, dtype):
    model, loss_fn, (x, y) = tm.make_problem(name, "tiny", batch=5, dtype=dtype)
    out = model(x)
    classes = {"mlp": 4, "cnn": 5, "transformer": 3}[name]
    assert out.shape == (5, classes) and out.dtype == dtype
    assert y.shape == (5,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < classes
    assert all(p.dtype == dtype for p in model.parameters())
    loss = loss_fn(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_seeded(name):
    a_model, _, (a_x, a_y) = tm.make_problem(name, "tiny", seed=3)
    torch.manual_seed(12345)  # the global RNG must not matter
    b_model, _, (b_x, b_y) = tm.make_problem(name, "tiny", seed=3)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    c_model, _, (c_x, _) = tm.make_problem(name, "tiny", seed=4)
    assert not torch.equal(next(a_model.parameters()), next(c_model.parameters()))
    assert not torch.equal(a_x, c_x)


def test_global_rng_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    tm.make_problem("transformer", "tiny", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_transformer_calls_sdpa():
    """Each of the 2 layers calls torch.nn.functional.scaled_dot_product_attention once per
    forward, with [N, heads, seq, d_head] inputs."""
    model, _, (x, _) = tm.make_problem("transformer", "tiny", batch=4)
    real = torch.nn.functional.scaled_dot_product_attention
    with mock.patch("torch.nn.functional.scaled_dot_product_attention",
                    side_effect=real) as sdpa:
        out = model(x)
    assert sdpa.call_count == 2
    q = sdpa.call_args.args[0]
    assert q.shape == (4, 2, 6, 6)
    assert torch.equal(out, model(x))


def test_transformer_tokens_and_overrides():
    model, _, (x, y) = tm.make_problem("transformer", "tiny", batch=3, vocab=11)
    assert x.dtype == torch.int64 and x.max() < 11
    assert model(x).shape == (3, 3)
    with pytest.raises(ValueError, match="overrides"):
        tm.make_problem("mlp", "tiny", heads=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        tm.make_problem("resnet")
    with pytest.raises(ValueError, match="size"):
        tm.make_problem("mlp", size="huge")
    with pytest.raises(ValueError, match="batch"):
        tm.make_problem("mlp", batch=0)

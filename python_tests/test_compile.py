"""torch.compile(fullgraph=True) over functions calling the ops through the public API."""

import pytest
import torch

import gradience_kernels as gk


def monitor(x: torch.Tensor, layers: list[torch.Tensor]):
    h = gk.hill(x, k=64)
    m = gk.moment_estimator(x, k_ratio=0.05)
    q = gk.quantile(x, [0.01, 0.5, 0.99])
    per_layer = gk.hill(layers, k=8, per_tensor=True)
    plot = gk.hill_plot(layers, [4, 16, 64])
    return h.alpha * 2, m.gamma, q, per_layer.alpha, plot.alpha


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.empty(20_000, dtype=torch.float64).cauchy_(generator=g).float().to(device)
    layers = [torch.randn(64, 32, generator=g).to(device), torch.randn(300, generator=g).to(device)]
    eager = monitor(x, layers)
    compiled = torch.compile(monitor, fullgraph=True, backend=backend)(x, layers)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def passes(x: torch.Tensor, logs: torch.Tensor):
    hist, counts = torch.ops.gradience.tail_histogram([x], True)
    sub, blog, blog2, ref = torch.ops.gradience.tail_level_pass([x], True, 1, [16000, 16256], True)
    boot = torch.ops.gradience.bootstrap_tail_statistics(logs, 200, [20, 100, 199], 4, 1, 0)
    return hist.sum() + counts[0], sub.sum(1), blog * 2, ref, boot.mean(0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_pass_and_bootstrap_ops(backend):
    """The ops of the distributed descent and of the double bootstrap (CPU)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.empty(5000, dtype=torch.float64).cauchy_(generator=g).float()
    logs = torch.sort(x.double().abs().log(), descending=True).values
    eager = passes(x, logs)
    compiled = torch.compile(passes, fullgraph=True, backend=backend)(x, logs)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)

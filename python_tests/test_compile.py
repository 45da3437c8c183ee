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

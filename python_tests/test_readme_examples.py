"""The README's Python examples run as written: each ```python block is executed in order, in
one namespace holding the names the README leaves to the reader (a small model with its
gradients, its loss and batch, heavy-tailed samples, a weight matrix). A renamed function or
argument then fails here rather than in a user's first session."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def reader_names(tmp_path) -> dict:
    """What the README's examples assume: `model` (with .grad set), `loss_fn`, `inputs`,
    `targets`, `x` and `data` (Pareto samples, tail index 2), `W`, `layer`, `local_grads` and
    `dist` (a one-process gloo group)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    inputs = torch.randn(48, 64, generator=gen)
    targets = torch.randint(10, (48,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(inputs), targets).backward()
    pareto = torch.rand(50_000, generator=gen, dtype=torch.float64).pow(-0.5)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
    return {"model": model, "loss_fn": loss_fn, "inputs": inputs, "targets": targets,
            "x": pareto, "data": pareto[:5_000].numpy(), "W": torch.randn(256, 128, generator=gen),
            "layer": model[0], "local_grads": [p.grad for p in model.parameters()],
            "dist": dist, "np": np}


def test_readme_python_blocks_run(tmp_path):
    code = blocks()
    assert len(code) >= 6, "README: expected its Python examples (tails, spectra, curvature, ...)"
    names = reader_names(tmp_path)
    try:
        for i, block in enumerate(code):
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), names)
            except Exception as err:  # noqa: BLE001  name the block that broke
                pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n"
                            f"{block}")
    finally:
        dist.destroy_process_group()
    # the examples' results are what they say they are
    assert names["t"].matvecs <= 1000 and len(names["e"].eigenvalues) == 5
    assert names["K"].shape == (48, 48)

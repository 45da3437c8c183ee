"""Small in-code models and synthetic data for the curvature demo, tests and benchmarks.

Three architectures, each a plain ``torch.nn.Module``:
- ``MLP``: fully connected, tanh activations (smooth: the Hessian differs from the GGN by the
  second-derivative term of the activations, so Hessian and GGN tests are not the same test);
- ``SmallCNN``: 3x3 convolutions with tanh and 2x2 average pooling, then a linear head;
- ``SDPATransformer``: a 2-layer pre-norm transformer encoder whose attention calls
  ``torch.nn.functional.scaled_dot_product_attention`` directly (the fused kernel that has no
  double backward: the curvature operators must switch it to its math kernel themselves),
  with a GELU MLP block, a learned positional embedding and a mean-pooled classification head.

``TINY`` configs have <= 5000 parameters (explicit float64 Hessians in tests); ``BENCH``
configs have 7e4-1.5e5 parameters (one Hessian-vector product takes milliseconds to tens of
milliseconds on a 2-core CPU). ``make_problem(name, size)`` returns a deterministically
initialised model, the cross-entropy loss and a synthetic batch:

    model, loss_fn, (inputs, targets) = make_problem("transformer", "tiny", dtype=torch.float64)
    loss = loss_fn(model(inputs), targets)

Nothing here touches the global random state: the seeds go to local generators (model init
under ``torch.random.fork_rng``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "SDPATransformer", "mlp", "small_cnn", "sdpa_transformer",
           "TINY", "BENCH", "SIZES", "MODELS", "make_problem", "make_model", "make_batch",
           "count_parameters"]


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    """x [N, in_features] -> logits [N, out_features] through `depth` hidden layers of width
    `hidden` with tanh activations: Linear(in, h), tanh, (Linear(h, h), tanh) x (depth-1),
    Linear(h, out)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        widths = [in_features] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Images [N, in_channels, image_size, image_size] -> logits [N, classes].

    Each entry c of `channels` adds Conv2d(3x3, padding 1) -> tanh -> AvgPool2d(2) (so the
    image side halves per stage); the features are flattened into an optional hidden Linear
    (`fc`, tanh) and a Linear head. Average pooling and tanh keep the loss twice
    differentiable everywhere (max pooling and ReLU make the Hessian piecewise)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8,
                 channels: Sequence[int] = (8, 12), classes: int = 5, fc: int | None = None):
        super().__init__()
        side = image_size
        convs = []
        prev = in_channels
        for c in channels:
            if side < 2:
                raise ValueError(f"image_size: {image_size} is too small for {len(channels)} "
                                 "pooling stages")
            convs.append(nn.Conv2d(prev, c, 3, padding=1))
            prev, side = c, side // 2
        self.convs = nn.ModuleList(convs)
        features = prev * side * side
        self.fc = nn.Linear(features, fc) if fc else None
        self.head = nn.Linear(fc or features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nn.functional.avg_pool2d(torch.tanh(conv(x)), 2)
        x = x.flatten(1)
        if self.fc is not None:
            x = torch.tanh(self.fc(x))
        return self.head(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention through torch.nn.functional.scaled_dot_product_attention."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"heads: {heads} does not divide d_model={d_model}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Looked up on the module at call time (not imported by name), so a patched
        # torch.nn.functional.scaled_dot_product_attention (tests) and SDPA backend selection
        # (torch.nn.attention.sdpa_kernel, the operators) both apply.
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(att.transpose(1, 2).reshape(n, s, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x + attn(LN(x)), then x + MLP(LN(x)) (GELU)."""

    def __init__(self, d_model: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp)
        self.fc2 = nn.Linear(mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class SDPATransformer(nn.Module):
    """A small transformer encoder classifier with SDPA attention.

    Input: float features [N, seq_len, in_dim] (linear input projection), or token ids
    [N, seq_len] (int64) when `vocab` is given (embedding). Then a learned positional
    embedding, `layers` pre-norm encoder layers (``EncoderLayer``), a final LayerNorm, the
    mean over positions and a Linear head -> logits [N, classes]."""

    def __init__(self, in_dim: int = 4, d_model: int = 12, heads: int = 2, layers: int = 2,
                 seq_len: int = 6, mlp: int | None = None, classes: int = 3,
                 vocab: int | None = None):
        super().__init__()
        mlp = 2 * d_model if mlp is None else mlp
        self.seq_len = seq_len
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d_model) if vocab else nn.Linear(in_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, mlp) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln(h).mean(1))


def mlp(in_features: int, hidden: int, out_features: int, depth: int = 2) -> MLP:
    """An ``MLP`` (see there)."""
    return MLP(in_features, hidden, out_features, depth)


def small_cnn(in_channels: int = 1, image_size: int = 8, channels: Sequence[int] = (8, 12),
              classes: int = 5, fc: int | None = None) -> SmallCNN:
    """A ``SmallCNN`` (see there)."""
    return SmallCNN(in_channels, image_size, channels, classes, fc)


def sdpa_transformer(in_dim: int = 4, d_model: int = 12, heads: int = 2, layers: int = 2,
                     seq_len: int = 6, mlp: int | None = None, classes: int = 3,
                     vocab: int | None = None) -> SDPATransformer:
    """An ``SDPATransformer`` (see there)."""
    return SDPATransformer(in_dim, d_model, heads, layers, seq_len, mlp, classes, vocab)


# --------------------------------------------------------------------------- configs
MODELS = {"mlp": MLP, "cnn": SmallCNN, "transformer": SDPATransformer}

#: <= 5000 parameters each (explicit float64 Hessians): mlp 1,476, cnn 1,201, transformer 2,763.
TINY: dict[str, dict] = {
    "mlp": {"in_features": 8, "hidden": 32, "out_features": 4, "depth": 2, "batch": 32},
    "cnn": {"in_channels": 1, "image_size": 8, "channels": (8, 12), "classes": 5, "batch": 16},
    "transformer": {"in_dim": 4, "d_model": 12, "heads": 2, "layers": 2, "seq_len": 6,
                    "mlp": 24, "classes": 3, "batch": 16},
}

#: Benchmark sizes: mlp 150,794 parameters (batch 256), cnn 72,042 (batch 64), transformer
#: 102,858 (batch 32); one Hessian-vector product takes ~4-25 ms on 2 CPU threads.
BENCH: dict[str, dict] = {
    "mlp": {"in_features": 64, "hidden": 256, "out_features": 10, "depth": 3, "batch": 256},
    "cnn": {"in_channels": 3, "image_size": 16, "channels": (16, 32), "classes": 10,
            "fc": 128, "batch": 64},
    "transformer": {"in_dim": 16, "d_model": 64, "heads": 4, "layers": 2, "seq_len": 16,
                    "mlp": 256, "classes": 10, "batch": 32},
}

SIZES = {"tiny": TINY, "bench": BENCH}


def _config(name: str, size: str, overrides: dict) -> dict:
    if name not in MODELS:
        raise ValueError(f"name: expected one of {sorted(MODELS)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    cfg = dict(SIZES[size][name])
    unknown = set(overrides) - set(_ctor_args(name)) - {"batch"}
    if unknown:
        raise ValueError(f"overrides: unknown keys {sorted(unknown)} for model {name!r}")
    cfg.update(overrides)
    return cfg


def _ctor_args(name: str) -> tuple[str, ...]:
    code = MODELS[name].__init__.__code__
    return code.co_varnames[1:code.co_argcount]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_model(name: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", **overrides) -> nn.Module:
    """The model `name` ('mlp', 'cnn', 'transformer') of config SIZES[size] (updated by
    `overrides`), initialised from `seed` (PyTorch's default init under a forked RNG, so the
    caller's global random state is untouched), in `dtype`, in eval mode."""
    cfg = _config(name, size, overrides)
    cfg.pop("batch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name](**cfg)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(name: str, size: str = "tiny", batch: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch (inputs, targets) for model `name`: standard normal inputs (token ids
    uniform over the vocabulary when the transformer has one) and uniform random class labels
    (int64), from a generator seeded with `seed`."""
    cfg = _config(name, size, overrides)
    n = cfg["batch"] if batch is None else batch
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"batch: must be a positive integer, got {n!r}")
    gen = torch.Generator().manual_seed(10_007 + seed)
    if name == "mlp":
        x = torch.randn(n, cfg["in_features"], generator=gen, dtype=torch.float64)
        classes = cfg["out_features"]
    elif name == "cnn":
        s = cfg["image_size"]
        x = torch.randn(n, cfg["in_channels"], s, s, generator=gen, dtype=torch.float64)
        classes = cfg["classes"]
    else:
        if cfg.get("vocab"):
            x = torch.randint(cfg["vocab"], (n, cfg["seq_len"]), generator=gen)
        else:
            x = torch.randn(n, cfg["seq_len"], cfg["in_dim"], generator=gen, dtype=torch.float64)
        classes = cfg["classes"]
    y = torch.randint(classes, (n,), generator=gen)
    if x.is_floating_point():
        x = x.to(dtype)
    return x.to(device), y.to(device)


def make_problem(name: str, size: str = "tiny", batch: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 **overrides) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """(model, loss_fn, (inputs, targets)) for the curvature operators.

    model: ``make_model(name, size, seed, dtype, device, **overrides)``; loss_fn:
    ``torch.nn.CrossEntropyLoss()`` (mean over the batch), called as loss_fn(logits, targets);
    batch: ``make_batch(name, size, batch, seed, dtype, device, **overrides)`` (default batch
    size from the config). The same arguments give bitwise the same problem."""
    model = make_model(name, size, seed, dtype, device, **overrides)
    data = make_batch(name, size, batch, seed, dtype, device, **overrides)
    return model, nn.CrossEntropyLoss(), data


def _describe() -> str:  # pragma: no cover - a printout for humans
    lines = []
    for size, table in SIZES.items():
        for name in table:
            m = make_model(name, size)
            lines.append(f"{size:5s} {name:12s} {count_parameters(m):>8,d} parameters")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(_describe())

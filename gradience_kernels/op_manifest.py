"""The op manifest: every registered ``gradience::`` op with sample inputs.

``python_tests/test_op_manifest.py`` runs torch.library.opcheck on every entry for every
available device and fails if an op registered by the extension has no entry here, so no op
can be added without a fake kernel and an opcheck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Registers the gradience_triton:: curvature ops (their entries are below), so that the
# manifest and the registry agree whichever modules a test run has imported.
from . import curvature_kernels  # noqa: F401


@dataclass(frozen=True)
class OpSample:
    name: str  # the op's name without namespace, e.g. "tail_stats"
    make_args: Callable[[torch.device], tuple]
    description: str
    namespace: str = "gradience"  # "gradience_triton": the Triton custom ops (tail_triton.py)
    # Devices with a kernel (opcheck runs on those available on the machine).
    devices: tuple[str, ...] = ("cpu", "cuda")

    @property
    def qualified(self) -> str:
        return f"{self.namespace}::{self.name}"


def _heavy(n: int, device: torch.device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.float64).cauchy_(generator=g)
    return x.to(dtype=dtype, device=device)


def _batch(device: torch.device, rows: int, shapes, dtype=torch.float32, seed: int = 0):
    """A batch list [rows, *shape] of standard normal entries (curvature ops' samples)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, *s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
            for s in shapes]


MANIFEST: list[OpSample] = [
    OpSample(
        "tail_stats",
        lambda d: ([_heavy(3000, d), _heavy(1000, d, seed=1).reshape(10, 100).t()], [10, 100], [0.05]),
        "two tensors (one transposed) as one sample, explicit ks and a k_ratio",
    ),
    OpSample(
        "tail_stats_per_tensor",
        lambda d: ([_heavy(500, d, torch.bfloat16), _heavy(700, d, torch.bfloat16, 2)], [5], [0.1]),
        "per-tensor rows over a bf16 list",
    ),
    OpSample("hill", lambda d: (_heavy(4096, d, torch.float64), 64), "float64 tensor"),
    OpSample(
        "order_statistics",
        lambda d: ([_heavy(2000, d, torch.float16)], [1, 7, 1999], False),
        "signed ranks of a float16 tensor",
    ),
    OpSample(
        "quantile",
        lambda d: ([_heavy(5000, d)], [0.0, 0.25, 0.5, 0.99, 1.0], "linear"),
        "linear quantiles of a float32 tensor",
    ),
    OpSample(
        "tail_histogram",
        lambda d: ([_heavy(3000, d), _heavy(100, d, seed=4).reshape(10, 10).t()], True),
        "top-digit histogram of |x| keys over a two-tensor float32 sample",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "tail_level_pass",
        lambda d: ([_heavy(3000, d, torch.float64)], True, 2, [16383 * 65536 + 1, 16384 * 65536],
                   True),
        "a float64 level-2 pass over two prefixes with log sums",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "tail_histogram",
        lambda d: ([_heavy(3000, d), _heavy(500, d, seed=5).reshape(20, 25).t()],),
        "Triton top-digit histogram of |x| (interpreter on CPU)",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "tail_level_pass",
        lambda d: ([_heavy(3000, d)], 1, [16000, 16256, 16300], True),
        "Triton float32 last-digit pass with log sums",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "bootstrap_tail_statistics",
        lambda d: (torch.sort(_heavy(500, torch.device("cpu"), torch.float64).abs().log(),
                              descending=True).values, 300, [20, 50, 299], 7, 3, 0),
        "Hill and moment statistics of 7 resamples of 300, ks without NaN (CPU only)",
        devices=("cpu",),
    ),
    OpSample(
        "fit_power_law",
        lambda d: ([_heavy(600, d, torch.float64, seed=6), _heavy(300, d, seed=7)], 50.0,
                   "powerlaw", [0.0, 3.0], True, "pruned"),
        "power-law fits of two layers (float64, float32), signs dropped, xmax, alpha range",
        devices=("cpu",),
    ),
    OpSample(
        "fill_probes",
        lambda d: ([torch.empty(3, 4, 5, device=d, dtype=torch.float64),
                    torch.empty(3, 7, device=d, dtype=torch.float64)], 7, 2, True, 2**32 - 9),
        "C++ Gaussian probes 2..4 of stream 7 into a float64 two-tensor batch, across 2^32",
        devices=("cpu",),
    ),
    OpSample(
        "probe_dots",
        lambda d: (_batch(d, 3, [(4, 5), (7,), (2, 3)], torch.bfloat16), [0, 2, 1], [2, 1], 11, 5,
                   False, 2**32 - 9),
        "C++ Rademacher probe dots of a bfloat16 batch in two blocks, entries across 2^32",
        devices=("cpu",),
    ),
    OpSample(
        "block_dots",
        lambda d: (_batch(d, 2, [(6, 5), (9,)]), _batch(d, 2, [(6, 5), (9,)], torch.float64,
                                                          seed=1), [1, 0], [1, 1]),
        "C++ per-block row dots of a float32 batch with a float64 batch",
        devices=("cpu",),
    ),
    OpSample(
        "block_gram",
        lambda d: (_batch(d, 5, [(6, 5), (9,), (3,)], torch.bfloat16),
                   _batch(d, 3, [(6, 5), (9,), (3,)], seed=1), [0, 2, 1], [2, 1]),
        "C++ per-block Gram of a bfloat16 batch (5 rows: a 4-row tile and one left) against "
        "a float32 batch of 3 rows, two blocks",
        devices=("cpu",),
    ),
    OpSample(
        "orthogonalize",
        lambda d: ([t[0] for t in _batch(d, 1, [(6, 5), (9,)], seed=2)],
                   _batch(d, 5, [(6, 5), (9,)], torch.bfloat16, seed=3), 4, 2),
        "C++ CGS2 of a float32 vector against 4 rows of a bfloat16 basis (in place)",
        devices=("cpu",),
    ),
    OpSample(
        "reorthogonalize",
        lambda d: ([t[0] for t in _batch(d, 1, [(6, 5), (9,)], seed=2)],
                   _batch(d, 6, [(6, 5), (9,)], seed=3), 4, 2, 0.5, 4, 0.0),
        "C++ Lanczos reorthogonalization of a float32 vector against 4 rows (local rows 2..3), "
        "normalized into row 4 (in place)",
        devices=("cpu",),
    ),
    OpSample(
        "fill_probes",
        lambda d: ([torch.empty(3, 4, 5, device=d), torch.empty(3, 7, device=d)], 7, 2, True, 0),
        "Triton Gaussian probes 2..4 of stream 7 into a float32 two-tensor batch",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "probe_dots",
        lambda d: (_batch(d, 3, [(4, 5), (7,), (2, 3)], torch.float64), [0, 2, 1], [2, 1], 11, 5,
                   False, 2**32 - 9),
        "Triton Rademacher probe dots of a float64 batch in two blocks, entries across 2^32",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "block_dots",
        lambda d: (_batch(d, 2, [(6, 5), (9,)]), _batch(d, 2, [(6, 5), (9,)], seed=1), [1, 0],
                   [1, 1]),
        "Triton per-block row dots of two float32 batches",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "block_gram",
        lambda d: (_batch(d, 3, [(6, 5), (9,)], torch.bfloat16),
                   _batch(d, 2, [(6, 5), (9,)], seed=1), [0, 1], [2]),
        "Triton Gram of a bfloat16 batch against a float32 batch, one block",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "orthogonalize",
        lambda d: ([t[0] for t in _batch(d, 1, [(6, 5), (9,)], seed=2)],
                   _batch(d, 5, [(6, 5), (9,)], torch.bfloat16, seed=3), 4, 2),
        "Triton CGS2 of a float32 vector against 4 rows of a bfloat16 basis (in place)",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
    OpSample(
        "combine",
        lambda d: (_batch(d, 4, [(6, 5), (9,)], torch.float64, seed=4),
                   3, _batch(d, 3, [(2,)], torch.float64, seed=5)[0], torch.float32),
        "Triton float32 combination of 3 rows of a float64 basis",
        namespace="gradience_triton",
        devices=("cpu", "cuda"),
    ),
]


NAMESPACES = ("gradience", "gradience_triton")


def registered_ops() -> set[str]:
    """Qualified names of every op registered in the package's namespaces."""
    names = torch._C._dispatch_get_all_op_names()
    return {n.split(".")[0] for n in names if n.split("::", 1)[0] in NAMESPACES}

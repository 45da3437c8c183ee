"""Curvature operators: symmetric linear operators over a list of parameter tensors.

Vector convention (every curvature module follows it): a vector of the operator's space is a
list of tensors shaped like the operator's parameters (``op.shapes``); a batch of b vectors is a
list of tensors shaped ``[b, *shape]``. Nothing is flattened into one P-vector: parameters stay
the model's own tensors, and estimators work tensor by tensor (curvature_kernels.py).

Blocks group the parameter tensors (by default one block per module, i.e. per layer); trace
estimators report per-block traces tr(A_bb) whose sum is the full trace.

``MatrixOperator`` wraps an explicit symmetric matrix: the reference operator of the tests.

The model operators (``hessian``, ``ggn``, ``empirical_fisher`` and their classes) live in
curvature_model_operators.py and are re-exported here (lazily, PEP 562, so either module can
be imported first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MODEL_API = ("hessian", "ggn", "empirical_fisher", "HessianOperator", "GGNOperator",
              "FisherOperator", "ModelOperator", "HESSIAN_METHODS")

__all__ = ["Block", "CurvatureOperator", "MatrixOperator", *_MODEL_API]


@dataclass(frozen=True)
class Block:
    """A named group of the operator's parameter tensors (indices into ``op.shapes``)."""

    name: str
    tensors: tuple[int, ...]


def _max_and_asymmetry(matrix: torch.Tensor, rows: int = 256) -> tuple[float, float]:
    """(max |A|, max |A - A^T|), a block of rows at a time: whole-matrix temporaries doubled
    the memory of a large matrix at construction."""
    amax = asym = 0.0
    with torch.no_grad():
        for i in range(0, matrix.shape[0], rows):
            block = matrix[i:i + rows]
            amax = max(amax, float(block.abs().max()))
            asym = max(asym, float((block - matrix[:, i:i + rows].T).abs().max()))
    return amax, asym


def _check_shape(shape, i: int) -> torch.Size:
    """shapes[i] as a torch.Size of non-negative sizes, or a clear error."""
    try:
        size = torch.Size(shape)
    except TypeError:
        raise TypeError(f"shapes[{i}]: expected a tuple of sizes (e.g. (5,) or torch.Size), "
                        f"got {shape!r}") from None
    if any(d < 0 for d in size):
        raise ValueError(f"shapes[{i}]: sizes must be >= 0, got {tuple(size)}")
    return size


class CurvatureOperator:
    """A symmetric P x P operator on lists of parameter-shaped tensors.

    Subclasses implement ``_matmat(V)`` (V: list of [b, *shape] tensors -> the same shapes);
    the base class checks shapes, counts matvecs in ``matvec`` / ``matmat`` (one per vector,
    after ``_matmat`` returns, unless ``_matmat`` counted them itself, as subclasses written to
    an earlier contract do), and builds ``to_matrix``.
    """

    #: True when the operator is positive semi-definite (GGN, Fisher).
    psd: bool = False

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device,
                 blocks: Sequence[Block] | None = None, names: Sequence[str] | None = None):
        self.shapes = [_check_shape(s, i) for i, s in enumerate(shapes)]
        self.dtype = dtype
        self.device = torch.device(device)
        self.names = list(names) if names is not None else [f"t{i}" for i in range(len(shapes))]
        if len(self.names) != len(self.shapes):
            raise ValueError(f"names: expected one per tensor ({len(self.shapes)}), got "
                             f"{len(self.names)}: {self.names}")
        if blocks is None:
            blocks = [Block(n, (i,)) for i, n in enumerate(self.names)]
        blocks = list(blocks)  # a generator would be spent by the coverage check below
        covered = sorted(i for b in blocks for i in b.tensors)
        if covered != list(range(len(self.shapes))):
            raise ValueError(f"blocks: must cover every tensor index exactly once, got "
                             f"{[b.tensors for b in blocks]} for {len(self.shapes)} tensors")
        self.blocks = list(blocks)
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)
        self.matvecs = 0

    # -- products ---------------------------------------------------------------------------
    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A v for one vector (list of parameter-shaped tensors); counts one matvec."""
        self._check(v, batched=False)
        before = self.matvecs
        out = self._matmat([t.unsqueeze(0) for t in v])
        self._count(1, before)
        return [t.squeeze(0) for t in out]

    def matmat(self, V: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A V for a batch of vectors (list of [b, *shape] tensors); counts b matvecs."""
        self._check(V, batched=True)
        before = self.matvecs
        out = self._matmat(list(V))
        self._count(V[0].shape[0], before)
        return out

    def _count(self, b: int, before: int) -> None:
        """Adds what _matmat did not count itself of its b vectors (the counter read `before`
        it): all b for a plain subclass, none for one that counts (the earlier contract), the
        rest for one that serves part of the batch through self.matmat; never more than b (a
        _matmat that resets the count)."""
        self.matvecs += min(b, max(0, b - (self.matvecs - before)))

    def _matmat(self, V: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def reset_count(self) -> None:
        self.matvecs = 0

    def _check(self, v: Sequence[torch.Tensor], batched: bool) -> None:
        if len(v) != len(self.shapes):
            raise ValueError(f"vector: expected {len(self.shapes)} tensors (one per parameter), "
                             f"got {len(v)}")
        lead = None
        for i, (t, s) in enumerate(zip(v, self.shapes)):
            shape = t.shape[1:] if batched else t.shape
            if shape != s or (batched and t.dim() == 0):
                want = f"[b, {', '.join(map(str, s))}]" if batched else str(list(s))
                raise ValueError(f"vector[{i}] ({self.names[i]}): expected shape {want}, "
                                 f"got {list(t.shape)}")
            if batched:
                if lead is None:
                    lead = t.shape[0]
                elif t.shape[0] != lead:
                    raise ValueError(f"vector[{i}]: batch size {t.shape[0]} differs from "
                                     f"vector[0]'s {lead}")
            if t.device != self.device:
                raise ValueError(f"vector[{i}]: expected device {self.device}, got {t.device}")

    # -- dense form ---------------------------------------------------------------------------
    def to_matrix(self, chunk: int = 64) -> torch.Tensor:
        """The dense P x P matrix in the operator's dtype, from P matvecs on the unit vectors
        (batched by `chunk`). For small models only: P^2 memory."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1 (unit vectors per product), got "
                             f"{chunk!r}")
        P = self.numel
        if P > 20_000:
            raise ValueError(f"to_matrix: P = {P} parameters is too large for a dense matrix "
                             "(limit 20000)")
        cols = []
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            eye = torch.zeros(stop - start, P, dtype=self.dtype, device=self.device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            out = self.matmat(self.unflatten(eye))
            cols.append(self.flatten(out))
        return torch.cat(cols, 0).T.contiguous()

    def flatten(self, V: Sequence[torch.Tensor]) -> torch.Tensor:
        """[b, P] from a batch list (tests and dense references only)."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in V], 1)

    def unflatten(self, M: torch.Tensor) -> list[torch.Tensor]:
        """A batch list from [b, P] (tests and dense references only)."""
        out, start = [], 0
        for s, n in zip(self.shapes, self.numels):
            out.append(M[:, start:start + n].reshape(M.shape[0], *s))
            start += n
        return out

    def block_slices(self) -> list[list[slice]]:
        """For each block, the slices of the flat [P] index that its tensors occupy."""
        offsets, start = [], 0
        for n in self.numels:
            offsets.append(slice(start, start + n))
            start += n
        return [[offsets[i] for i in b.tensors] for b in self.blocks]


class MatrixOperator(CurvatureOperator):
    """An explicit symmetric matrix A [P, P] seen through parameter shapes and blocks."""

    def __init__(self, matrix: torch.Tensor, shapes: Sequence[torch.Size] | None = None,
                 blocks: Sequence[Block] | None = None, names: Sequence[str] | None = None,
                 psd: bool = False):
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"matrix: expected a torch.Tensor, got {type(matrix).__name__} "
                            f"(torch.as_tensor converts NumPy arrays)")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: expected a square 2-D tensor, got shape {list(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(f"matrix: expected a float dtype, got {matrix.dtype}")
        # The estimators assume A = A^T (a non-symmetric N made SLQ estimate moments of N^T N
        # silently). The bound leaves room for autograd's float32 Hessians (asymmetric by
        # ~1e-6 ||A||): sqrt(eps) of the dtype, relative to the largest entry.
        amax, asym = _max_and_asymmetry(matrix)
        if math.isfinite(amax) and asym > math.sqrt(torch.finfo(matrix.dtype).eps) * amax:
            raise ValueError(f"matrix: not symmetric (max |A - A^T| = {asym:.3g}, max |A| = "
                             f"{amax:.3g}); pass (A + A^T) / 2 for its symmetric part")
        if shapes is None:
            shapes = [torch.Size([matrix.shape[0]])]
        super().__init__(shapes, matrix.dtype, matrix.device, blocks, names)
        if self.numel != matrix.shape[0]:
            raise ValueError(f"shapes: hold {self.numel} entries, the matrix is {matrix.shape[0]}")
        self.matrix = matrix
        self.psd = psd

    def _matmat(self, V):
        return self.unflatten(self.flatten(V) @ self.matrix.T)


def __getattr__(name: str):
    # Lazy re-export: curvature_model_operators imports this module's base classes.
    if name in _MODEL_API:
        from . import curvature_model_operators
        return getattr(curvature_model_operators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # dir() and tab completion list the lazily re-exported names too (PEP 562).
    return sorted(set(globals()) | set(_MODEL_API))

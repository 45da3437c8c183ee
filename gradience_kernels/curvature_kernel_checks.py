"""Argument checks of curvature_kernels' public functions: each error names the argument and its
value, and every check runs before any work."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from .curvature_probe_hash import _MASK32

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _index(value, name: str, lo: int | None = 0) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


def _real(value, name: str) -> float:
    """A real number (not a bool) as a float; the error names the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def _check_float_dtype(dtype, name: str) -> None:
    if dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a float dtype (float16, bfloat16, float32, float64), "
                        f"got {dtype}")


def _check_list(xs, name: str, batched: bool) -> None:
    """A non-empty list of float tensors of one dtype on one device; batched: each [b, ...]
    with one b."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name}: expected at least one tensor, got an empty list")
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
    _check_float_dtype(xs[0].dtype, f"{name}[0]")
    for i, t in enumerate(xs):
        if t.dtype != xs[0].dtype:
            raise TypeError(f"{name}[{i}]: dtype {t.dtype} differs from {name}[0]'s {xs[0].dtype}")
        if t.device != xs[0].device:
            raise ValueError(f"{name}[{i}]: device {t.device} differs from {name}[0]'s "
                             f"{xs[0].device}")
        if batched and t.dim() == 0:
            raise ValueError(f"{name}[{i}]: expected a batch [b, *shape], got a 0-d tensor")
        if batched and t.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{name}[{i}]: batch size {t.shape[0]} differs from {name}[0]'s "
                             f"{xs[0].shape[0]}")


def _check_pair(X, Y, xname: str, yname: str, same_batch: bool) -> None:
    _check_list(X, xname, batched=True)
    _check_list(Y, yname, batched=True)
    if len(X) != len(Y):
        raise ValueError(f"{yname}: expected {len(X)} tensors (as {xname}), got {len(Y)}")
    if X[0].device != Y[0].device:
        raise ValueError(f"{yname}: device {Y[0].device} differs from {xname}'s {X[0].device}")
    for i, (x, y) in enumerate(zip(X, Y)):
        if x.shape[1:] != y.shape[1:] or (same_batch and x.shape[0] != y.shape[0]):
            want = list(x.shape) if same_batch else f"[c, {', '.join(map(str, x.shape[1:]))}]"
            raise ValueError(f"{yname}[{i}]: expected shape {want} (as {xname}[{i}]), "
                             f"got {list(y.shape)}")


def _check_blocks(blocks, n: int) -> list[list[int]]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise ValueError(f"blocks: expected a non-empty list of tensor-index lists, got {blocks!r}")
    out = []
    for j, members in enumerate(blocks):
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise ValueError(f"blocks[{j}]: expected a list of tensor indices, got {members!r}")
        idx = [_index(i, f"blocks[{j}] entry") for i in members]
        bad = [i for i in idx if i >= n]
        if bad:
            raise ValueError(f"blocks[{j}]: tensor index {bad[0]} out of range for {n} tensors")
        out.append(idx)
    return out


def _check_basis(w, basis, count) -> int:
    """Shared checks of orthogonalize_/combine's basis: returns count."""
    _check_list(basis, "basis", batched=True)
    m_max = basis[0].shape[0]
    count = _index(count, "count")
    if count > m_max:
        raise ValueError(f"count: {count} exceeds the basis' m_max = {m_max} rows")
    if w is not None:
        _check_list(w, "w", batched=False)
        if len(w) != len(basis):
            raise ValueError(f"basis: expected {len(w)} tensors (one per tensor of w), "
                             f"got {len(basis)}")
        if basis[0].device != w[0].device:
            raise ValueError(f"basis: device {basis[0].device} differs from w's {w[0].device}")
        for i, (t, q) in enumerate(zip(w, basis)):
            if q.shape[1:] != t.shape:
                raise ValueError(f"basis[{i}]: expected shape [m_max, "
                                 f"{', '.join(map(str, t.shape))}] (as w[{i}]), "
                                 f"got {list(q.shape)}")
    return count


def _check_coeffs(coeffs, count: int, device) -> None:
    if not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2:
        shape = list(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise ValueError(f"coeffs: expected a 2-D tensor [count, r], got {shape}")
    _check_float_dtype(coeffs.dtype, "coeffs")
    if coeffs.shape[0] != count:
        raise ValueError(f"coeffs: expected {count} rows (count), got shape {list(coeffs.shape)}")
    if coeffs.device != device:
        raise ValueError(f"coeffs: device {coeffs.device} differs from the basis' {device}")


def _check_probe_args(shapes, batch, seed, first, dtype, offset):
    if isinstance(shapes, torch.Tensor) or not isinstance(shapes, Sequence) or len(shapes) == 0:
        raise ValueError(f"shapes: expected a non-empty list of shapes, got {shapes!r}")
    sizes = []
    for i, s in enumerate(shapes):
        try:
            size = torch.Size(s)
        except TypeError:
            raise TypeError(f"shapes[{i}]: expected a shape, got {s!r}") from None
        if any(d < 0 for d in size):
            raise ValueError(f"shapes[{i}]: negative size in {list(size)}")
        sizes.append(size)
    batch = _index(batch, "batch")
    seed = _index(seed, "seed", lo=None)
    first = _index(first, "first")
    if first + batch >= 1 << 63:
        raise ValueError(f"first: probe indices first + batch = {first + batch} exceed 2^63")
    offset = _check_offset(offset, sum(s.numel() for s in sizes))
    _check_float_dtype(dtype, "dtype")
    return sizes, batch, seed & _MASK32, first, offset


def _check_offset(offset, numel: int) -> int:
    offset = _index(offset, "offset")
    if offset + numel >= 1 << 62:
        raise ValueError(f"offset: entry indices offset + P = {offset + numel} reach 2^62 (the "
                         "Gaussian hash indexes 2 x entries in int64)")
    return offset


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _row_len(t: torch.Tensor) -> int:
    """Entries per row of a batch [b, *shape]."""
    return math.prod(t.shape[1:])

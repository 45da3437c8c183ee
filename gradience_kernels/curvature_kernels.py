"""The multi-tensor inner steps of the curvature estimators, over lists of parameter-shaped
tensors (see curvature_operators.py for the vector convention).

These are the only places where estimators touch P-sized data outside the matvecs:
- ``rademacher`` / ``gaussian``: probe batches from a counter-based hash of (seed, probe index,
  entry index), so probe j is the same whatever the batch split, device or backend;
- ``block_gram`` / ``block_dots``: per-block inner products X_b^T Y_b of two batches;
- ``orthogonalize_``: classical Gram-Schmidt, twice (CGS2), of a vector against a basis stored
  tensor by tensor (possibly in a lower precision);
- ``combine``: basis^T coefficients (Ritz vectors).

This first version is the torch path (CPU). TODO(kernels helper): Triton kernels on CUDA
(gradience_kernels/triton/curvature_kernels.py), registered as gradience_triton:: custom ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["rademacher", "gaussian", "block_gram", "block_dots", "orthogonalize_", "combine"]

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's 32-bit finalizer on int64 holding uint32 values (products < 2^64 wrap
    # mod 2^64 in int64 and the mask keeps the low 32 bits, as uint32 arithmetic would).
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _hash_bits(seed: int, probes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """uint32 values (in int64) of the hash of (seed, probe, entry index) -> [b, n]."""
    s = _fmix32(torch.tensor((seed * 0x9E3779B9) & _MASK32, dtype=torch.int64))
    p = _fmix32((probes[:, None] * 0x9E3779B9 + s) & _MASK32)
    lo = index & _MASK32
    hi = index >> 32
    x = _fmix32((p + lo[None, :] * 0x7FEB352D) & _MASK32)
    return _fmix32((x ^ (hi[None, :] * 0x846CA68B)) & _MASK32)


def _offsets(shapes: Sequence[torch.Size]) -> list[int]:
    out, start = [], 0
    for s in shapes:
        out.append(start)
        start += torch.Size(s).numel()
    return out


def rademacher(shapes: Sequence[torch.Size], batch: int, seed: int, first: int = 0,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Probes first .. first+batch-1 of stream `seed`: +-1 entries, list of [batch, *shape]."""
    probes = torch.arange(first, first + batch, dtype=torch.int64)
    out = []
    for s, off in zip(shapes, _offsets(shapes)):
        n = torch.Size(s).numel()
        bits = _hash_bits(seed, probes, torch.arange(off, off + n, dtype=torch.int64))
        signs = 1 - 2 * (bits >> 31)
        out.append(signs.to(dtype=dtype).reshape(batch, *s).to(device))
    return out


def gaussian(shapes: Sequence[torch.Size], batch: int, seed: int, first: int = 0,
             dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Standard normal probes (Box-Muller on two hashes), list of [batch, *shape]."""
    probes = torch.arange(first, first + batch, dtype=torch.int64)
    out = []
    for s, off in zip(shapes, _offsets(shapes)):
        n = torch.Size(s).numel()
        idx = torch.arange(off, off + n, dtype=torch.int64)
        u1 = (_hash_bits(seed, probes, 2 * idx).double() + 0.5) / 2.0**32
        u2 = (_hash_bits(seed, probes, 2 * idx + 1).double() + 0.5) / 2.0**32
        z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
        out.append(z.to(dtype=dtype).reshape(batch, *s).to(device))
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_gram(X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor],
               blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """G[j] = sum over the tensors t of block j of X_t^T Y_t: [n_blocks, a, c] for batches X
    (list of [a, *shape]) and Y (list of [c, *shape])."""
    a, c = X[0].shape[0], Y[0].shape[0]
    acc = _acc_dtype(X[0].dtype)
    out = torch.zeros(len(blocks), a, c, dtype=acc, device=X[0].device)
    for j, members in enumerate(blocks):
        for i in members:
            out[j] += X[i].reshape(a, -1).to(acc) @ Y[i].reshape(c, -1).to(acc).T
    return out


def block_dots(X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor],
               blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """D[j, r] = sum over the tensors of block j of <X_t[r], Y_t[r]>: [n_blocks, b]."""
    b = X[0].shape[0]
    acc = _acc_dtype(X[0].dtype)
    out = torch.zeros(len(blocks), b, dtype=acc, device=X[0].device)
    for j, members in enumerate(blocks):
        for i in members:
            out[j] += (X[i].reshape(b, -1).to(acc) * Y[i].reshape(b, -1).to(acc)).sum(1)
    return out


def orthogonalize_(w: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], count: int,
                   passes: int = 2) -> torch.Tensor:
    """w <- (I - Q Q^T)^passes w in place, Q = the first `count` rows of the basis (list of
    [m_max, *shape], any float dtype); returns the summed coefficients Q^T w [count]."""
    acc = _acc_dtype(w[0].dtype)
    total = torch.zeros(count, dtype=acc, device=w[0].device)
    if count == 0:
        return total
    for _ in range(passes):
        coeffs = torch.zeros(count, dtype=acc, device=w[0].device)
        for q, t in zip(basis, w):
            coeffs += q[:count].reshape(count, -1).to(acc) @ t.reshape(-1).to(acc)
        for q, t in zip(basis, w):
            t.sub_((coeffs @ q[:count].reshape(count, -1).to(acc)).reshape(t.shape).to(t.dtype))
        total += coeffs
    return total


def combine(basis: Sequence[torch.Tensor], count: int, coeffs: torch.Tensor,
            dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """basis^T coeffs: list of [r, *shape] for coeffs [count, r]."""
    out = []
    for q in basis:
        dt = dtype or q.dtype
        acc = _acc_dtype(dt)
        r = coeffs.shape[1]
        flat = coeffs.to(acc).T @ q[:count].reshape(count, -1).to(acc)
        out.append(flat.reshape(r, *q.shape[1:]).to(dt))
    return out

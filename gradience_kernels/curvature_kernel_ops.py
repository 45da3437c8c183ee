"""The custom ops behind curvature_kernels' Triton backend (``gradience_triton::fill_probes``,
``probe_dots``, ``block_dots``, ``block_gram``, ``orthogonalize``, ``combine``: one launch per
step over a chunk table of all tensors, kernels in gradience_kernels/triton/curvature_kernels.py),
and the fake kernels of those ops and of the C++ ``gradience::`` ops of the same signatures."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .curvature_kernel_checks import (_acc_dtype, _check_basis, _check_blocks, _check_coeffs,
                                      _check_float_dtype, _check_list, _check_offset,
                                      _check_pair, _index, _row_len)
from .curvature_probe_hash import _MASK32, _entry_offsets, _probe_keys


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_runnable(device: torch.device) -> None:
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before "
                           "triton is first imported); use backend='torch' on CPU")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tl(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _tiles(rows: int, maxn: int, fixed_rows: int | None = None) -> tuple[int, int, int]:
    """(rows per tile, BK, steps per chunk) of the row-tiled kernels. Compiled: tiles of 4096
    elements and chunks of 16384 entries per program (2 x 64 KiB of float32 per program for
    two operands; few specializations). Interpreter (~ms per program instance and per op on a
    whole tile): one step, tiles sized to the data."""
    if _interpreting():
        br = min(_pow2(rows), 64)
        return br, max(16, min(_pow2(maxn), 1 << 16, (1 << 20) // br)), 1
    br = fixed_rows if fixed_rows is not None else min(_pow2(rows), 4)
    bk = 4096 // br
    return br, bk, 16384 // bk


def _contig(t: torch.Tensor) -> torch.Tensor:
    # Reads of non-contiguous vectors go through one contiguous copy (the estimators' vectors
    # and bases are contiguous; parameters never pass through here).
    return t if t.is_contiguous() else t.contiguous()


class _Table:
    """Chunk table rows [a_addr, b_addr, n, start, stop, entry0, 0, 0] (int64), in the order
    added; ``seg`` = row counts at each ``close()`` (the segment bounds of a block)."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.rows: list[list[int]] = []
        self.seg = [0]
        # The tensors whose addresses the rows hold: a contiguous copy made for the table must
        # outlive it (the kernels read the addresses after the caller's temporaries are gone).
        self.tensors: list[torch.Tensor] = []

    def add(self, a: torch.Tensor, b: torch.Tensor | None, n: int, entry0: int = 0) -> None:
        self.tensors += [a] if b is None else [a, b]
        aa, ba = a.data_ptr(), (b.data_ptr() if b is not None else 0)
        for s in range(0, n, self.chunk):
            self.rows.append([aa, ba, n, s, min(n, s + self.chunk), entry0, 0, 0])

    def close(self) -> None:
        self.seg.append(len(self.rows))

    @classmethod
    def by_block(cls, chunk: int, blocks, xs, ys, numels, entry0s=None) -> "_Table":
        """Rows of the tensors of each block in turn (pairs xs[i], ys[i], or xs[i] alone when
        ys is None), one segment per block, for the per-block reductions."""
        table = cls(chunk)
        for m in blocks:
            for i in m:
                table.add(xs[i], None if ys is None else ys[i], numels[i],
                          0 if entry0s is None else entry0s[i])
            table.close()
        return table

    def tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 8).to(device)


def _segment_sum(partial: torch.Tensor, seg: list[int], width: int) -> torch.Tensor:
    """out[j] = sum of partial rows seg[j] .. seg[j+1]-1, in row order (deterministic)."""
    from .triton.curvature_kernels import segment_sum_kernel

    n_seg = len(seg) - 1
    out = torch.empty(n_seg, width, dtype=partial.dtype, device=partial.device)
    if width == 0:
        return out
    most = max(b - a for a, b in zip(seg, seg[1:]))
    if _interpreting():
        br, bw = max(1, min(_pow2(most), 256)), min(_pow2(width), 1024)
    else:
        br, bw = 32, min(_pow2(width), 128)
    seg_t = torch.tensor(seg, dtype=torch.int64).to(partial.device)
    segment_sum_kernel[(n_seg, math.ceil(width / bw))](partial, seg_t, out, width,
                                                       ACC=_tl(partial.dtype), BR=br, BW=bw)
    return out


@torch.library.custom_op("gradience_triton::fill_probes", mutates_args=("probes",))
def _fill_probes(probes: list[torch.Tensor], seed: int, first: int, gaussian: bool,
                 offset: int) -> None:
    """Fill each [b, *shape] tensor with probes first .. first+b-1 of stream `seed` (entries
    numbered across the list in order from `offset`), as the torch path."""
    from .triton.curvature_kernels import fill_probes_kernel

    _check_list(probes, "probes", batched=True)
    dev = probes[0].device
    _require_runnable(dev)
    b = probes[0].shape[0]
    numels = [_row_len(t) for t in probes]
    offset = _check_offset(offset, sum(numels))
    if b == 0 or sum(numels) == 0:
        return
    keys = torch.from_numpy(_probe_keys(seed & _MASK32, first, b).astype(np.int64)).to(dev)
    bb, bk, steps = _tiles(b, max(numels))
    work = [_contig(t) for t in probes]
    table = _Table(bk * steps)
    for t, n, off in zip(work, numels, _entry_offsets(numels, offset)):
        table.add(t, None, n, off)
    fill_probes_kernel[(len(table.rows), math.ceil(b / bb))](
        table.tensor(dev), keys, b, GAUSSIAN=bool(gaussian), ODT=_tl(probes[0].dtype), BB=bb,
        BK=bk, STEPS=steps)
    for t, c in zip(probes, work):
        if c is not t:
            t.copy_(c)


@_fill_probes.register_fake
def _fill_probes_fake(probes, seed, first, gaussian, offset):
    return None


def _flat_blocks(blocks: list[list[int]]) -> tuple[list[int], list[int]]:
    return [i for m in blocks for i in m], [len(m) for m in blocks]


def _unflat_blocks(members: list[int], sizes: list[int], n: int) -> list[list[int]]:
    if any(s < 0 for s in sizes) or sum(sizes) != len(members):
        raise ValueError(f"sizes: block sizes {sizes} do not add up to {len(members)} members")
    out, start = [], 0
    for s in sizes:
        out.append(members[start:start + s])
        start += s
    return _check_blocks(out, n)


@torch.library.custom_op("gradience_triton::probe_dots", mutates_args=())
def _probe_dots(y: list[torch.Tensor], members: list[int], sizes: list[int], seed: int,
                first: int, gaussian: bool, offset: int) -> torch.Tensor:
    """D[j, r] = sum over the tensors t of block j of <z_r, y_t[r]>, z = probe first + r
    (regenerated, never stored); blocks = consecutive runs of `sizes` entries of `members`."""
    from .triton.curvature_kernels import probe_dots_kernel

    _check_list(y, "y", batched=True)
    blocks = _unflat_blocks(members, sizes, len(y))
    dev, b = y[0].device, y[0].shape[0]
    _require_runnable(dev)
    acc = _acc_dtype(y[0].dtype)
    numels = [_row_len(t) for t in y]
    offset = _check_offset(offset, sum(numels))
    if b == 0 or sum(numels) == 0:
        return torch.zeros(len(blocks), b, dtype=acc, device=dev)
    keys = torch.from_numpy(_probe_keys(seed & _MASK32, first, b).astype(np.int64)).to(dev)
    bb, bk, steps = _tiles(b, max(numels))
    table = _Table.by_block(bk * steps, blocks, [_contig(t) for t in y], None, numels,
                            _entry_offsets(numels, offset))
    partial = torch.empty(max(1, len(table.rows)), b, dtype=acc, device=dev)
    if table.rows:
        probe_dots_kernel[(len(table.rows), math.ceil(b / bb))](
            table.tensor(dev), keys, partial, b, GAUSSIAN=bool(gaussian), YDT=_tl(y[0].dtype),
            ACC=_tl(acc), BB=bb, BK=bk, STEPS=steps)
    return _segment_sum(partial, table.seg, b)


@_probe_dots.register_fake
def _probe_dots_fake(y, members, sizes, seed, first, gaussian, offset):
    return y[0].new_empty((len(sizes), y[0].shape[0]), dtype=_acc_dtype(y[0].dtype))


@torch.library.custom_op("gradience_triton::block_dots", mutates_args=())
def _block_dots_op(x: list[torch.Tensor], y: list[torch.Tensor], members: list[int],
                   sizes: list[int]) -> torch.Tensor:
    """D[j, r] = sum over the tensors t of block j of <x_t[r], y_t[r]> ([n_blocks, b])."""
    from .triton.curvature_kernels import block_dots_kernel

    _check_pair(x, y, "x", "y", same_batch=True)
    blocks = _unflat_blocks(members, sizes, len(x))
    dev, b = x[0].device, x[0].shape[0]
    _require_runnable(dev)
    acc = _acc_dtype(x[0].dtype, y[0].dtype)
    numels = [_row_len(t) for t in x]
    if b == 0 or sum(numels) == 0:
        return torch.zeros(len(blocks), b, dtype=acc, device=dev)
    bb, bk, steps = _tiles(b, max(numels))
    table = _Table.by_block(bk * steps, blocks, [_contig(t) for t in x],
                            [_contig(t) for t in y], numels)
    partial = torch.empty(max(1, len(table.rows)), b, dtype=acc, device=dev)
    if table.rows:
        block_dots_kernel[(len(table.rows), math.ceil(b / bb))](
            table.tensor(dev), partial, b, XDT=_tl(x[0].dtype), YDT=_tl(y[0].dtype), ACC=_tl(acc),
            BB=bb, BK=bk, STEPS=steps)
    return _segment_sum(partial, table.seg, b)


@_block_dots_op.register_fake
def _block_dots_fake(x, y, members, sizes):
    return x[0].new_empty((len(sizes), x[0].shape[0]), dtype=_acc_dtype(x[0].dtype, y[0].dtype))


@torch.library.custom_op("gradience_triton::block_gram", mutates_args=())
def _block_gram_op(x: list[torch.Tensor], y: list[torch.Tensor], members: list[int],
                   sizes: list[int]) -> torch.Tensor:
    """G[j] = sum over the tensors t of block j of x_t y_t^T ([n_blocks, a, c])."""
    from .triton.curvature_kernels import block_gram_kernel

    _check_pair(x, y, "x", "y", same_batch=False)
    blocks = _unflat_blocks(members, sizes, len(x))
    dev, a, c = x[0].device, x[0].shape[0], y[0].shape[0]
    _require_runnable(dev)
    acc = _acc_dtype(x[0].dtype, y[0].dtype)
    numels = [_row_len(t) for t in x]
    if a == 0 or c == 0 or sum(numels) == 0:
        return torch.zeros(len(blocks), a, c, dtype=acc, device=dev)
    ba, bc = min(_pow2(a), 16), min(_pow2(c), 16)
    if _interpreting():
        bk, steps = max(16, min(_pow2(max(numels)), (1 << 20) // (ba * bc))), 1
    else:
        bk = max(16, 4096 // (ba * bc))
        steps = 16384 // bk
    table = _Table.by_block(bk * steps, blocks, [_contig(t) for t in x],
                            [_contig(t) for t in y], numels)
    partial = torch.empty(max(1, len(table.rows)), a * c, dtype=acc, device=dev)
    if table.rows:
        block_gram_kernel[(len(table.rows), math.ceil(a / ba), math.ceil(c / bc))](
            table.tensor(dev), partial, a, c, XDT=_tl(x[0].dtype), YDT=_tl(y[0].dtype),
            ACC=_tl(acc), BA=ba, BC=bc, BK=bk, STEPS=steps)
    return _segment_sum(partial, table.seg, a * c).reshape(len(blocks), a, c)


@_block_gram_op.register_fake
def _block_gram_fake(x, y, members, sizes):
    return x[0].new_empty((len(sizes), x[0].shape[0], y[0].shape[0]),
                          dtype=_acc_dtype(x[0].dtype, y[0].dtype))


@torch.library.custom_op("gradience_triton::orthogonalize", mutates_args=("w",))
def _orthogonalize_op(w: list[torch.Tensor], basis: list[torch.Tensor], count: int,
                      passes: int) -> torch.Tensor:
    """w <- (I - Q Q^T)^passes w in place (CGS), Q = rows 0..count-1 of the basis; returns the
    summed coefficients [count]. Launches: 1 + passes (each update fuses the next pass's
    partial dots)."""
    from .triton.curvature_kernels import ortho_dots_kernel, ortho_update_kernel

    count = _check_basis(w, basis, count)
    passes = _index(passes, "passes", lo=1)
    dev = w[0].device
    _require_runnable(dev)
    acc = _acc_dtype(w[0].dtype)
    numels = [t.numel() for t in w]
    if count == 0 or sum(numels) == 0:
        return torch.zeros(count, dtype=acc, device=dev)
    # Compiled: 16 basis rows per tile whatever count (it grows every Lanczos step: one
    # specialization for all of them), chunks of 4096 entries.
    bm, bk, steps = _tiles(count, max(numels), fixed_rows=16)
    ws, qs = [_contig(t) for t in w], [_contig(q) for q in basis]
    table = _Table(bk * steps)
    for t, q, n in zip(ws, qs, numels):
        table.add(t, q, n)
    tab = table.tensor(dev)
    n_chunks = len(table.rows)
    consts = dict(WDT=_tl(w[0].dtype), QDT=_tl(basis[0].dtype), ACC=_tl(acc), BM=bm, BK=bk,
                  STEPS=steps)
    partial = torch.empty(n_chunks, count, dtype=acc, device=dev)
    ortho_dots_kernel[(n_chunks, math.ceil(count / bm))](tab, partial, count, **consts)
    total = torch.zeros(count, dtype=acc, device=dev)
    for p in range(passes):
        # The fixed-shape sum over chunks is deterministic (no atomics in torch's reductions).
        coeffs = partial.sum(0)
        last = p == passes - 1
        partial = torch.zeros(n_chunks if not last else 1, count, dtype=acc, device=dev)
        ortho_update_kernel[(n_chunks,)](tab, coeffs, partial, count, WITH_DOTS=not last,
                                         **consts)
        total += coeffs
    for t, c in zip(w, ws):
        if c is not t:
            t.copy_(c)
    return total


@_orthogonalize_op.register_fake
def _orthogonalize_fake(w, basis, count, passes):
    return w[0].new_empty((count,), dtype=_acc_dtype(w[0].dtype))


@torch.library.custom_op("gradience_triton::combine", mutates_args=())
def _combine_op(basis: list[torch.Tensor], count: int, coeffs: torch.Tensor,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """out_t[j] = sum_m coeffs[m, j] basis_t[m] for m < count: list of [r, *shape] in dtype."""
    from .triton.curvature_kernels import combine_kernel

    count = _check_basis(None, basis, count)
    dev = basis[0].device
    _check_coeffs(coeffs, count, dev)
    _check_float_dtype(dtype, "dtype")
    _require_runnable(dev)
    acc = _acc_dtype(dtype)
    r = coeffs.shape[1]
    out = [torch.zeros(r, *q.shape[1:], dtype=dtype, device=dev) for q in basis]
    numels = [_row_len(q) for q in basis]
    if r == 0 or count == 0 or sum(numels) == 0:
        return out
    bm, bk, steps = _tiles(count, max(numels), fixed_rows=16)
    qs = [_contig(q) for q in basis]
    table = _Table(bk * steps)
    for q, o, n in zip(qs, out, numels):
        table.add(q, o, n)
    combine_kernel[(len(table.rows), r)](
        table.tensor(dev), coeffs.to(acc).contiguous(), count, r, QDT=_tl(basis[0].dtype),
        ODT=_tl(dtype), ACC=_tl(acc), BM=bm, BK=bk, STEPS=steps)
    return out


@_combine_op.register_fake
def _(basis, count, coeffs, dtype):
    return [q.new_empty((coeffs.shape[1], *q.shape[1:]), dtype=dtype) for q in basis]


# The gradience:: CPU ops (schemas in csrc/registration.cpp) have the Triton ops' signatures and
# output shapes: the same fake kernels serve both.
for _name, _fake in [("fill_probes", _fill_probes_fake), ("probe_dots", _probe_dots_fake),
                     ("block_dots", _block_dots_fake), ("block_gram", _block_gram_fake),
                     ("orthogonalize", _orthogonalize_fake)]:
    torch.library.register_fake(f"gradience::{_name}")(_fake)


@torch.library.register_fake("gradience::reorthogonalize")
def _reorthogonalize_fake(w, basis, count, lo, ratio, out_row, min_norm):
    return (w[0].new_empty((count,), dtype=torch.float64),
            w[0].new_empty((), dtype=torch.float64))

"""Triton backend of the tail passes: launch wrappers of gradience_kernels/triton/tail_passes.py
registered as custom ops (namespace ``gradience_triton``, beside the C++ library's one schema
block), with fake kernels, so they pass opcheck and torch.compile; on CPU they run under
TRITON_INTERPRET=1 (tests), on CUDA compiled.

``TRITON_PASSES`` plugs them into the radix descent of ``distributed.py``:
``tail_stats(x, ..., backend="triton")`` runs the same descent with these passes (the default
for CUDA tensors is the C++ library's CUDA op; bench/bench_tail_gpu.py times both).
"""

from __future__ import annotations

import math
import os

import torch

from . import _sample
from .distributed import _Layout

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float32: torch.int32, torch.float64: torch.int64}


def _block() -> int:
    # The interpreter pays ~ms per program instance: few, large programs; compiled: 2048.
    return 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 2048


def _flat_pieces(xs):
    """1-D contiguous pieces of the sample: contiguous tensors as views, others one bounded
    chunk at a time (copies of at most 2^22 entries)."""
    for t in xs:
        if t.is_contiguous():
            yield t.reshape(-1)
        else:
            for c in _sample._chunks(t):
                yield c.contiguous().reshape(-1)


def _constants(dtype):
    import triton.language as tl

    lay = _Layout(dtype, True)
    wide = tl.int64 if lay.bits == 64 else tl.int32
    floats = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}
    return lay, wide, floats[dtype]


def _check(xs, name="xs"):
    if len(xs) == 0:
        raise ValueError(f"{name}: expected at least one tensor, got an empty list")
    dtypes = {t.dtype for t in xs}
    if len(dtypes) != 1 or xs[0].dtype not in _INT_VIEW:
        raise TypeError(f"{name}: expected one float dtype (float16, bfloat16, float32, float64), "
                        f"got {sorted(map(str, dtypes))}")
    devices = {t.device for t in xs}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if sum(t.numel() for t in xs) == 0:
        raise ValueError(f"{name}: expected a non-empty sample, got 0 elements")


@torch.library.custom_op("gradience_triton::tail_histogram", mutates_args=())
def tail_histogram(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-digit histogram of the |x| keys and (n_eff, n_zero, n_nan, n_inf), as
    gradience::tail_histogram(xs, True)."""
    from .triton.tail_passes import top_histogram_kernel

    _check(xs)
    dev = xs[0].device
    lay, wide, _ = _constants(xs[0].dtype)
    shift = lay.shift(0)
    hist = torch.zeros(1 << (lay.width - shift), dtype=torch.int64, device=dev)
    specials = torch.zeros(3, dtype=torch.int64, device=dev)
    block = _block()
    total = 0
    for piece in _flat_pieces(xs):
        n = piece.numel()
        total += n
        if n == 0:
            continue
        grid = (math.ceil(n / block),)
        top_histogram_kernel[grid](piece.view(_INT_VIEW[piece.dtype]), n, hist, specials,
                                   KEY_MASK=(1 << lay.width) - 1, INF_KEY=lay.max_valid + 1,
                                   SHIFT=shift, WIDE=wide, BLOCK=block)
    zeros, infs, nans = specials[0], specials[1], specials[2]
    counts = torch.stack([total - zeros - infs - nans, zeros, nans, infs])
    return hist, counts


@tail_histogram.register_fake
def _(xs):
    lay = _Layout(xs[0].dtype, True)
    bins = 1 << (lay.width - lay.shift(0))
    return (xs[0].new_empty((bins,), dtype=torch.int64), xs[0].new_empty((4,), dtype=torch.int64))


@torch.library.custom_op("gradience_triton::tail_level_pass", mutates_args=())
def tail_level_pass(xs: list[torch.Tensor], level: int, bins: list[int],
                    with_log_sums: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """As gradience::tail_level_pass(xs, True, level, bins, with_log_sums)."""
    from .triton.tail_passes import level_pass_kernel

    _check(xs)
    lay, wide, flt = _constants(xs[0].dtype)
    if not (1 <= level < lay.levels):
        raise ValueError(f"level must be in [1, {lay.levels}) for dtype {xs[0].dtype}, "
                         f"got level={level}")
    if not bins:
        raise ValueError("bins: expected at least one prefix, got an empty list")
    if any(b2 <= b1 for b1, b2 in zip(bins, bins[1:])):
        raise ValueError(f"bins: must be strictly increasing, got {bins}")
    dev = xs[0].device
    m = len(bins)
    prefix_shift = lay.shift(level - 1)
    digit_shift = lay.shift(level)
    digit_bins = 1 << lay.digit_width(level)
    lo_key = bins[0] << prefix_shift
    log_ref = math.log(lay.value(lo_key if lo_key > 0 else 1))
    bins_t = torch.tensor(bins, dtype=torch.int64, device=dev)
    sub = torch.zeros((m, digit_bins), dtype=torch.int64, device=dev)
    sums = torch.zeros((2, m + 1), dtype=torch.float64, device=dev)
    block = _block()
    steps = max(1, math.ceil(math.log2(m + 1)))
    for piece in _flat_pieces(xs):
        n = piece.numel()
        if n == 0:
            continue
        programs = math.ceil(n / block)
        partial = torch.zeros((programs, 2, m + 1), dtype=torch.float64, device=dev)
        level_pass_kernel[(programs,)](
            piece.view(_INT_VIEW[piece.dtype]), n, bins_t, m, sub, partial, lo_key, log_ref,
            KEY_MASK=(1 << lay.width) - 1, MAX_VALID=lay.max_valid, PREFIX_SHIFT=prefix_shift,
            DIGIT_SHIFT=digit_shift, DIGIT_MASK=digit_bins - 1, DIGIT_BINS=digit_bins,
            SEARCH_STEPS=steps, WITH_LOGS=bool(with_log_sums), WIDE=wide, FLOAT=flt,
            BLOCK=block)
        if with_log_sums:
            sums += partial.sum(0)  # fixed-shape reduction in program order: deterministic
    return sub, sums[0].clone(), sums[1].clone(), torch.tensor(log_ref, dtype=torch.float64,
                                                                 device=dev)


@tail_level_pass.register_fake
def _(xs, level, bins, with_log_sums):
    lay = _Layout(xs[0].dtype, True)
    m = len(bins)
    x = xs[0]
    return (x.new_empty((m, 1 << lay.digit_width(level)), dtype=torch.int64),
            x.new_empty((m + 1,), dtype=torch.float64), x.new_empty((m + 1,), dtype=torch.float64),
            x.new_empty((), dtype=torch.float64))


class _TritonPasses:
    """The pass interface of distributed._Descent, on the Triton ops (|x| keys only)."""

    @staticmethod
    def histogram(xs, absolute):
        if not absolute:
            raise ValueError("the Triton backend ranks |x| only (absolute=True)")
        hist, counts = torch.ops.gradience_triton.tail_histogram(xs)
        return hist.cpu(), counts.cpu()

    @staticmethod
    def level_pass(xs, absolute, level, bins, with_log_sums):
        out = torch.ops.gradience_triton.tail_level_pass(xs, level, bins, with_log_sums)
        return tuple(t.cpu() for t in out)


TRITON_PASSES = _TritonPasses()

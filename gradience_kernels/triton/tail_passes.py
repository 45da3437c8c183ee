"""The two passes of the radix descent over |x| keys, in Triton (see csrc/tail/float_keys.h for
the key layout and gradience_kernels/distributed.py for the descent that drives them).

Bits arrive as the integer view of a contiguous float tensor (int16/int32/int64); the |x| key
clears the sign bit. Histograms use integer atomics (exact, order-free); log sums are reduced
per program with tl.sum and written to a per-program row, which the host adds in program order,
so results are deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def _load_keys(bits_ptr, n, BLOCK: tl.constexpr, KEY_MASK: tl.constexpr, WIDE: tl.constexpr):
    """This program's block: its index, which lanes hold an entry, and their |x| keys."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    bits = tl.load(bits_ptr + offs, mask=inside, other=0)
    return pid, inside, bits.to(WIDE) & KEY_MASK


@triton.jit
def top_histogram_kernel(
    bits_ptr,  # [n] integer view of the floats
    n,
    hist_ptr,  # [2^top_bits] int64, accumulated
    counts_ptr,  # [3] int64: zero, inf, NaN keys, accumulated
    KEY_MASK: tl.constexpr,
    INF_KEY: tl.constexpr,
    SHIFT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, inside, key = _load_keys(bits_ptr, n, BLOCK, KEY_MASK, WIDE)
    tl.atomic_add(hist_ptr + (key >> SHIFT).to(tl.int64), 1, mask=inside)
    zeros = tl.sum((inside & (key == 0)).to(tl.int64), axis=0)
    infs = tl.sum((inside & (key == INF_KEY)).to(tl.int64), axis=0)
    nans = tl.sum((inside & (key > INF_KEY)).to(tl.int64), axis=0)
    tl.atomic_add(counts_ptr + 0, zeros)
    tl.atomic_add(counts_ptr + 1, infs)
    tl.atomic_add(counts_ptr + 2, nans)


@triton.jit
def level_pass_kernel(
    bits_ptr,  # [n] integer view of the floats
    n,
    bins_ptr,  # [m] ascending prefixes of the level above (int64)
    m,
    sub_ptr,  # [m, DIGIT_BINS] int64, accumulated
    partial_ptr,  # [programs, 2, m + 1] float64: per-program bucket sums of y and y^2
    lo_key,  # candidates with log sums: lo_key <= key <= MAX_VALID
    log_ref,
    KEY_MASK: tl.constexpr,
    MAX_VALID: tl.constexpr,
    PREFIX_SHIFT: tl.constexpr,
    DIGIT_SHIFT: tl.constexpr,
    DIGIT_MASK: tl.constexpr,
    DIGIT_BINS: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(m + 1))
    WITH_LOGS: tl.constexpr,
    WIDE: tl.constexpr,
    FLOAT: tl.constexpr,  # the float type of the bits, for the values
    BLOCK: tl.constexpr,
):
    pid, inside, key = _load_keys(bits_ptr, n, BLOCK, KEY_MASK, WIDE)
    prefix = (key >> PREFIX_SHIFT).to(tl.int64)
    # pos = number of bins below the prefix (branch-free binary search over the sorted bins).
    pos = tl.zeros([BLOCK], dtype=tl.int64)
    for s in tl.static_range(SEARCH_STEPS):
        step = 1 << (SEARCH_STEPS - 1 - s)
        cand = pos + step
        ok = cand <= m
        val = tl.load(bins_ptr + cand - 1, mask=ok & inside, other=0)
        pos = tl.where(ok & (val < prefix), cand, pos)
    at_bin = tl.load(bins_ptr + pos, mask=inside & (pos < m), other=-1)
    valid = inside & (key <= MAX_VALID)
    hit = valid & (pos < m) & (at_bin == prefix)
    digit = ((key >> DIGIT_SHIFT) & DIGIT_MASK).to(tl.int64)
    tl.atomic_add(sub_ptr + pos * DIGIT_BINS + digit, 1, mask=hit)
    if WITH_LOGS:
        cand = valid & (key >= lo_key) & (key > 0) & ~hit
        value = key.to(FLOAT, bitcast=True).to(tl.float64)
        y = tl.log(tl.where(cand, value, 1.0)) - log_ref
        y = tl.where(cand, y, 0.0)
        row = partial_ptr + pid * 2 * (m + 1)
        for b in range(0, m + 1):
            inb = cand & (pos == b)
            yb = tl.where(inb, y, 0.0)
            tl.store(row + b, tl.sum(yb, axis=0))
            tl.store(row + (m + 1) + b, tl.sum(yb * yb, axis=0))

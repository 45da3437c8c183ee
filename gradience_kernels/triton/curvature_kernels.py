"""The multi-tensor inner steps of the curvature estimators, in Triton (launch wrappers and the
torch path: gradience_kernels/curvature_kernels.py).

One launch covers a whole list of parameter-shaped tensors through a CHUNK TABLE: an int64
[n_chunks, NCOL] tensor whose rows name one contiguous range [start, stop) of the per-row entries
of one tensor, by the tensor's base address (cast to a typed pointer in the kernel), its row
length n (a batch tensor [b, *shape] is a contiguous [b, n] matrix) and the global index of its
entry 0 (the probe counter). So nothing is concatenated or copied, and a list of hundreds of small
tensors (biases, norms) costs one launch instead of hundreds.

Reductions are deterministic: every program writes its partial sums to its own row (or
accumulates into rows only it owns), and a second pass adds rows in a fixed order
(``segment_sum_kernel`` or a fixed-shape torch sum); no float atomics anywhere.

Probes come from a counter-based hash of (seed, probe index, global entry index), evaluated in
uint32 arithmetic (which wraps, as the torch path's NumPy uint32 arithmetic does), so probe j
is bitwise the same on every backend, device and batch split.
"""

import triton
import triton.language as tl

# Chunk-table columns (built by curvature_kernels._Table; rows of one block are consecutive,
# and partial results are indexed by the table row, i.e. the program id along axis 0).
NCOL = tl.constexpr(8)
A_ADDR = tl.constexpr(0)  # base address of the first operand's tensor
B_ADDR = tl.constexpr(1)  # base address of the second operand's tensor (or 0)
ROWLEN = tl.constexpr(2)  # n: entries per row, the row stride in elements
START = tl.constexpr(3)  # the chunk's entries [start, stop) within a row
STOP = tl.constexpr(4)
ENTRY0 = tl.constexpr(5)  # global index of the tensor's entry 0 (the probe hash counter)


@triton.jit
def _chunk(table_ptr, pid):
    row = table_ptr + pid * NCOL
    return (tl.load(row + A_ADDR), tl.load(row + B_ADDR), tl.load(row + ROWLEN),
            tl.load(row + START), tl.load(row + STOP), tl.load(row + ENTRY0))


@triton.jit
def _round_to(x, ODT: tl.constexpr):
    """x (float32/float64) rounded to ODT as torch rounds: float64 -> float32 -> ODT (c10's
    Half/BFloat16 convert from float). bfloat16 by integer round-to-nearest-even on the float32
    bits (c10::round_to_nearest_even), because the interpreter's float32 -> bfloat16 cast
    truncates (and its direct float64 -> bfloat16 cast gives NaN)."""
    if ODT == tl.float64:
        out = x.to(tl.float64)
    elif ODT == tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(tl.float32).to(ODT)
    return out


@triton.jit
def _fmix32(x):
    # MurmurHash3's 32-bit finalizer; x is uint32, products wrap mod 2^32.
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _hash(p, index):
    """uint32 hash of (probe key p [uint32], global entry index [int64]); as _hash_bits of the
    torch path: fmix32(fmix32(p + lo * 0x7FEB352D) ^ hi * 0x846CA68B), index = hi * 2^32 + lo."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    x = _fmix32(p + lo * 0x7FEB352D)
    return _fmix32(x ^ (hi * 0x846CA68B))


@triton.jit
def _probe(p, index, GAUSSIAN: tl.constexpr):
    """Probe entries: +-1 from the hash's top bit (Rademacher) or Box-Muller on pairs in
    float64 (as the torch path): entries 2k and 2k+1 are r cos(2 pi u2) and r sin(2 pi u2),
    r = sqrt(-2 ln u1), from the hashes of 2k and 2k+1."""
    if GAUSSIAN:
        pair = index - (index & 1)
        h1 = _hash(p, pair)
        h2 = _hash(p, pair + 1)
        # Float64 constants made explicitly: a bare Python float may become an fp32 constant.
        scale = tl.full([], 2.3283064365386963e-10, tl.float64)  # 2^-32, exact
        two_pi = tl.full([], 6.283185307179586, tl.float64)  # the double nearest 2 pi
        u1 = (h1.to(tl.float64) + 0.5) * scale
        angle = two_pi * ((h2.to(tl.float64) + 0.5) * scale)
        trig = tl.where((index & 1) != 0, tl.sin(angle), tl.cos(angle))
        z = tl.sqrt(-2.0 * tl.log(u1)) * trig
    else:
        z = tl.where((_hash(p, index) >> 31) != 0, -1.0, 1.0)
    return z


@triton.jit
def fill_probes_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = the probe tensor [b, n]
    keys_ptr,  # [b] int64 holding the uint32 probe keys
    b,
    GAUSSIAN: tl.constexpr,
    ODT: tl.constexpr,  # the probes' element type
    BB: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,  # BK-blocks per chunk
):
    pid = tl.program_id(0).to(tl.int64)
    addr, _, n, start, stop, entry0 = _chunk(table_ptr, pid)
    out_ptr = addr.to(tl.pointer_type(ODT))
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    in_rows = rows < b
    keys = tl.load(keys_ptr + rows, mask=in_rows, other=0).to(tl.uint32)
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        inside = in_rows[:, None] & (k < stop)[None, :]
        z = _probe(keys[:, None], (entry0 + k)[None, :], GAUSSIAN)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * n + k[None, :], _round_to(z, ODT),
                 mask=inside)


@triton.jit
def probe_dots_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = Y [b, n]
    keys_ptr,  # [b] int64 holding the uint32 probe keys
    partial_ptr,  # [n_chunks, b] ACC: <z_r, y_r> over the chunk
    b,
    GAUSSIAN: tl.constexpr,
    YDT: tl.constexpr,
    ACC: tl.constexpr,
    BB: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    addr, _, n, start, stop, entry0 = _chunk(table_ptr, pid)
    y_ptr = addr.to(tl.pointer_type(YDT))
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    in_rows = rows < b
    keys = tl.load(keys_ptr + rows, mask=in_rows, other=0).to(tl.uint32)
    acc = tl.zeros([BB, BK], dtype=ACC)
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        inside = in_rows[:, None] & (k < stop)[None, :]
        y = tl.load(y_ptr + rows[:, None].to(tl.int64) * n + k[None, :], mask=inside, other=0.0)
        z = _probe(keys[:, None], (entry0 + k)[None, :], GAUSSIAN)
        acc += z.to(ACC) * y.to(ACC)  # y is 0 outside, z finite (u1 >= 2^-33)
    tl.store(partial_ptr + pid * b + rows, tl.sum(acc, axis=1), mask=in_rows)


@triton.jit
def block_dots_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = X [b, n], B_ADDR = Y [b, n]
    partial_ptr,  # [n_chunks, b] ACC: <x_r, y_r> over the chunk
    b,
    XDT: tl.constexpr,
    YDT: tl.constexpr,
    ACC: tl.constexpr,
    BB: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    xa, ya, n, start, stop, _ = _chunk(table_ptr, pid)
    x_ptr = xa.to(tl.pointer_type(XDT))
    y_ptr = ya.to(tl.pointer_type(YDT))
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    in_rows = rows < b
    acc = tl.zeros([BB, BK], dtype=ACC)
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        inside = in_rows[:, None] & (k < stop)[None, :]
        offs = rows[:, None].to(tl.int64) * n + k[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        y = tl.load(y_ptr + offs, mask=inside, other=0.0)
        acc += x.to(ACC) * y.to(ACC)
    tl.store(partial_ptr + pid * b + rows, tl.sum(acc, axis=1), mask=in_rows)


@triton.jit
def block_gram_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = X [a, n], B_ADDR = Y [c, n]
    partial_ptr,  # [n_chunks, a, c] ACC: X Y^T over the chunk
    a,
    c,
    XDT: tl.constexpr,
    YDT: tl.constexpr,
    ACC: tl.constexpr,
    BA: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    # Broadcast-multiply and reduce rather than tl.dot: tl.dot has no float64 path on NVIDIA
    # (triton-lang/triton#5483) and rounds float32 to tf32 unless told otherwise; the Grams
    # here are small (a, c = probe batch sizes), the pass is bandwidth-bound.
    pid = tl.program_id(0).to(tl.int64)
    xa, ya, n, start, stop, _ = _chunk(table_ptr, pid)
    x_ptr = xa.to(tl.pointer_type(XDT))
    y_ptr = ya.to(tl.pointer_type(YDT))
    ia = tl.program_id(1) * BA + tl.arange(0, BA)
    ic = tl.program_id(2) * BC + tl.arange(0, BC)
    acc = tl.zeros([BA, BC], dtype=ACC)
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        in_k = (k < stop)[None, :]
        x = tl.load(x_ptr + ia[:, None].to(tl.int64) * n + k[None, :],
                    mask=(ia < a)[:, None] & in_k, other=0.0).to(ACC)
        y = tl.load(y_ptr + ic[:, None].to(tl.int64) * n + k[None, :],
                    mask=(ic < c)[:, None] & in_k, other=0.0).to(ACC)
        acc += tl.sum(x[:, None, :] * y[None, :, :], axis=2)
    out = partial_ptr + pid * a * c + ia[:, None] * c + ic[None, :]
    tl.store(out, acc, mask=(ia < a)[:, None] & (ic < c)[None, :])


@triton.jit
def segment_sum_kernel(
    partial_ptr,  # [n_rows, width] ACC
    seg_ptr,  # [n_segments + 1] int64: segment j is rows seg[j] .. seg[j+1]-1
    out_ptr,  # [n_segments, width] ACC
    width,
    ACC: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
):
    # Rows in a fixed order per lane, then a fixed tree: the same bits on every run.
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    first = tl.load(seg_ptr + j)
    last = tl.load(seg_ptr + j + 1)
    acc = tl.zeros([BR, BW], dtype=ACC)
    for r0 in range(first, last, BR):
        r = r0 + tl.arange(0, BR)
        inside = (r < last)[:, None] & (cols < width)[None, :]
        acc += tl.load(partial_ptr + r[:, None].to(tl.int64) * width + cols[None, :], mask=inside,
                       other=0.0)
    tl.store(out_ptr + j * width + cols, tl.sum(acc, axis=0), mask=cols < width)


@triton.jit
def ortho_dots_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = w [n], B_ADDR = basis [m_max, n]
    partial_ptr,  # [n_chunks, count] ACC: Q w over the chunk
    count,
    WDT: tl.constexpr,
    QDT: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    wa, qa, n, start, stop, _ = _chunk(table_ptr, pid)
    w_ptr = wa.to(tl.pointer_type(WDT))
    q_ptr = qa.to(tl.pointer_type(QDT))
    im = tl.program_id(1) * BM + tl.arange(0, BM)
    in_m = im < count
    acc = tl.zeros([BM, BK], dtype=ACC)
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        in_k = k < stop
        w = tl.load(w_ptr + k, mask=in_k, other=0.0).to(ACC)
        q = tl.load(q_ptr + im[:, None].to(tl.int64) * n + k[None, :],
                    mask=in_m[:, None] & in_k[None, :], other=0.0).to(ACC)
        acc += q * w[None, :]
    tl.store(partial_ptr + pid * count + im, tl.sum(acc, axis=1), mask=in_m)


@triton.jit
def ortho_update_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = w [n], B_ADDR = basis [m_max, n]
    coeffs_ptr,  # [count] ACC: this pass's coefficients c = Q w
    partial_ptr,  # [n_chunks, count] ACC, zeroed: the next pass's Q w_new over the chunk
    count,
    WITH_DOTS: tl.constexpr,  # also the next pass's partial dots, on the updated chunk
    WDT: tl.constexpr,
    QDT: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    # w_chunk -= Q_chunk^T c, then (CGS2's second pass needs only this chunk of the updated w
    # for its partial dots) Q_chunk w_chunk while the basis chunk is hot: three launches and
    # three reads of the basis per CGS2 instead of four.
    pid = tl.program_id(0).to(tl.int64)
    wa, qa, n, start, stop, _ = _chunk(table_ptr, pid)
    w_ptr = wa.to(tl.pointer_type(WDT))
    q_ptr = qa.to(tl.pointer_type(QDT))
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        in_k = k < stop
        u = tl.zeros([BK], dtype=ACC)
        for m0 in range(0, count, BM):
            im = m0 + tl.arange(0, BM)
            in_m = im < count
            cm = tl.load(coeffs_ptr + im, mask=in_m, other=0.0)
            q = tl.load(q_ptr + im[:, None].to(tl.int64) * n + k[None, :],
                        mask=in_m[:, None] & in_k[None, :], other=0.0).to(ACC)
            u += tl.sum(q * cm[:, None], axis=0)
        w = tl.load(w_ptr + k, mask=in_k, other=0.0).to(ACC)
        w_new = _round_to(w - u, WDT)
        tl.store(w_ptr + k, w_new, mask=in_k)
        if WITH_DOTS:
            wn = w_new.to(ACC)  # the stored (rounded) values: the next pass projects those
            for m0 in range(0, count, BM):
                im = m0 + tl.arange(0, BM)
                in_m = im < count
                q = tl.load(q_ptr + im[:, None].to(tl.int64) * n + k[None, :],
                            mask=in_m[:, None] & in_k[None, :], other=0.0).to(ACC)
                # Rows pid * count + im belong to this program alone: read-add-write in a
                # fixed order, no atomics.
                row = partial_ptr + pid * count + im
                tl.store(row, tl.load(row, mask=in_m, other=0.0) + tl.sum(q * wn[None, :], axis=1),
                         mask=in_m)


@triton.jit
def combine_kernel(
    table_ptr,  # [n_chunks, NCOL] int64: A_ADDR = basis [m_max, n], B_ADDR = out [r, n]
    coeffs_ptr,  # [count, r] ACC, contiguous
    count,
    r,
    QDT: tl.constexpr,
    ODT: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    qa, oa, n, start, stop, _ = _chunk(table_ptr, pid)
    q_ptr = qa.to(tl.pointer_type(QDT))
    o_ptr = oa.to(tl.pointer_type(ODT))
    for s in range(STEPS):
        k = start + s * BK + tl.arange(0, BK)
        in_k = k < stop
        acc = tl.zeros([BK], dtype=ACC)
        for m0 in range(0, count, BM):
            im = m0 + tl.arange(0, BM)
            in_m = im < count
            cm = tl.load(coeffs_ptr + im.to(tl.int64) * r + j, mask=in_m, other=0.0)
            q = tl.load(q_ptr + im[:, None].to(tl.int64) * n + k[None, :],
                        mask=in_m[:, None] & in_k[None, :], other=0.0).to(ACC)
            acc += tl.sum(q * cm[:, None], axis=0)
        tl.store(o_ptr + j * n + k, _round_to(acc, ODT), mask=in_k)

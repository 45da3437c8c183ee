"""Exact tail statistics of a sample sharded across processes (torch.distributed).

The radix descent of the order-statistics engine runs pass by pass: each process histograms
its shard (``gradience::tail_histogram``, ``gradience::tail_level_pass``), the histograms and the
bucket log sums are merged with ``all_reduce`` (O(bins) data per pass, never the data), and every
process walks the merged histograms to the same ranks. Order statistics are therefore exact and
identical on every process; log sums agree with a single-process run on the concatenated data
within the same floating-point bounds (they are sums of per-process compensated sums).

Passes: 1 for 16-bit floats, 2 for float32, 4 for float64 (one all_reduce each).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
             torch.float64: 0x7FF0000000000000}


class _Layout:
    """Digit layout of KeyPolicy (csrc/tail/float_keys.h): 16-bit digits from the top, the last
    digit taking the rest."""

    def __init__(self, dtype: torch.dtype, absolute: bool):
        self.dtype, self.absolute = dtype, absolute
        self.bits = _BITS[dtype]
        self.width = self.bits - 1 if absolute else self.bits
        self.levels = (self.width + 15) // 16
        self.sign = 1 << (self.bits - 1)
        self.max_valid = (_INF_BITS[dtype] - 1) if absolute else (1 << self.width) - 1

    def shift(self, level: int) -> int:
        return 0 if level == self.levels - 1 else self.width - 16 * (level + 1)

    def digit_width(self, level: int) -> int:
        return self.width - 16 * (self.levels - 1) if level == self.levels - 1 else 16

    def value(self, key: int) -> float:
        if self.absolute:
            raw = key
        else:
            raw = (key ^ self.sign) if key & self.sign else (~key) & ((1 << self.bits) - 1)
        if self.bits == 64:
            return struct.unpack("<d", struct.pack("<Q", raw))[0]
        if self.bits == 32:
            return struct.unpack("<f", struct.pack("<I", raw))[0]
        if self.dtype == torch.bfloat16:
            return struct.unpack("<f", struct.pack("<I", raw << 16))[0]
        return float(torch.tensor([raw], dtype=torch.int32).to(torch.int16).view(torch.float16)[0])

    def values(self, keys: torch.Tensor) -> torch.Tensor:
        """float64 values of |x| keys (int64 tensor)."""
        if self.bits == 64:
            return keys.view(torch.float64)
        if self.bits == 32:
            return keys.to(torch.int32).view(torch.float32).double()
        if self.dtype == torch.bfloat16:
            return (keys << 16).to(torch.int32).view(torch.float32).double()
        return keys.to(torch.int16).view(torch.float16).double()


def _all_reduce(tensors: Sequence[torch.Tensor], group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _walk(hist: torch.Tensor, top: int, ranks: Sequence[int]) -> list[tuple[int, int]]:
    """For descending ranks (1-based), the bin (counting down from ``top``) that holds each
    rank and the rank inside that bin."""
    desc = hist[: top + 1].flip(0)
    cum = torch.cumsum(desc, 0)
    idx = torch.searchsorted(cum, torch.tensor(list(ranks), dtype=cum.dtype))
    out = []
    for r, i in zip(ranks, idx.tolist()):
        above = int(cum[i - 1]) if i > 0 else 0
        out.append((top - i, r - above))
    return out


class _LibraryPasses:
    """The passes of the C++ library: CPU kernels, and CUDA kernels (|x| only) where the
    extension was built with nvcc. Results come back to the host for the walk."""

    @staticmethod
    def histogram(xs, absolute):
        hist, counts = torch.ops.gradience.tail_histogram(xs, absolute)
        return hist.cpu(), counts.cpu()

    @staticmethod
    def level_pass(xs, absolute, level, bins, with_log_sums):
        out = torch.ops.gradience.tail_level_pass(xs, absolute, level, bins, with_log_sums)
        return tuple(t.cpu() for t in out)


LIBRARY_PASSES = _LibraryPasses()


class _Descent:
    """Exact keys of descending ranks over a (possibly sharded) sample, with the last pass kept
    for the log sums. ``passes``: the histogram passes (C++ library or Triton), whose CPU
    results are merged across processes and walked here."""

    def __init__(self, xs: list[torch.Tensor], absolute: bool, group, passes=LIBRARY_PASSES):
        self.xs, self.absolute, self.group, self.passes = xs, absolute, group, passes
        dtypes = {t.dtype for t in xs}
        if len(dtypes) != 1:
            raise TypeError(f"xs: expected one dtype, got {sorted(map(str, dtypes))}")
        self.layout = _Layout(xs[0].dtype, absolute)
        hist, counts = passes.histogram(xs, absolute)
        _all_reduce([hist, counts], group)
        self.hist, self.counts = hist, counts
        self.last = None  # (bins, sub_hist, bucket_log, bucket_log_sq, log_ref)

    def keys(self, ranks: Sequence[int], with_log_sums: bool) -> list[tuple[int, int]]:
        """(key, residual) per rank: the key of X(rank) and the rank among its ties."""
        lay = self.layout
        top = lay.max_valid >> lay.shift(0)
        state = _walk(self.hist, top, ranks)
        for level in range(1, lay.levels):
            bins = sorted({p for p, _ in state})
            last = level == lay.levels - 1
            sums = with_log_sums and last
            sub, blog, blog2, ref = self.passes.level_pass(self.xs, self.absolute, level, bins,
                                                           sums)
            _all_reduce([sub, blog, blog2] if sums else [sub], self.group)
            if last:
                self.last = (bins, sub, blog, blog2, float(ref))
            width = lay.digit_width(level)
            row_of = {b: j for j, b in enumerate(bins)}
            new_state = []
            for prefix, residual in state:
                row = sub[row_of[prefix]]
                digit, residual = _walk(row, row.numel() - 1, [residual])[0]
                new_state.append(((prefix << width) | digit, residual))
            state = new_state
        return state


def _rank_sums(descent: _Descent, keys: list[int], ref_key: int):
    """sum over entries with key > K of (log x - ref) and (log x - ref)^2, for each key K,
    with the reference the engine would use."""
    lay = descent.layout
    out = []
    if lay.levels == 1:
        ref = math.log(lay.value(ref_key))
        hist = descent.hist
        valid = torch.arange(1, lay.max_valid + 1, dtype=torch.int64)
        counts = hist[1: lay.max_valid + 1].double()
        y = torch.log(lay.values(valid)) - ref
        terms1, terms2 = (counts * y).tolist(), (counts * y * y).tolist()
        for k in keys:
            out.append((math.fsum(terms1[k:]), math.fsum(terms2[k:])))
        return ref, out
    bins, sub, blog, blog2, ref = descent.last
    width = lay.digit_width(lay.levels - 1)
    digits = torch.arange(sub.shape[1], dtype=torch.int64)
    row_terms = []
    for j, b in enumerate(bins):
        keys_j = (b << width) | digits
        c = sub[j].double()
        nz = c > 0
        y = torch.where(nz & (keys_j > 0), torch.log(lay.values(keys_j).clamp_min(1e-320)) - ref,
                        torch.zeros((), dtype=torch.float64))
        row_terms.append(((c * y).tolist(), (c * y * y).tolist()))
    bucket1, bucket2 = blog.tolist(), blog2.tolist()
    for key in keys:
        prefix, digit = key >> width, key & ((1 << width) - 1)
        j = bins.index(prefix)
        t1 = bucket1[j + 1:] + row_terms[j][0][digit + 1:]
        t2 = bucket2[j + 1:] + row_terms[j][1][digit + 1:]
        for i in range(j + 1, len(bins)):
            t1 += row_terms[i][0]
            t2 += row_terms[i][1]
        out.append((math.fsum(t1), math.fsum(t2)))
    return ref, out


def tail_stats(xs: list[torch.Tensor], ks: Sequence[int], k_ratios: Sequence[float],
               group, passes=LIBRARY_PASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``gradience::tail_stats`` of the union of every process's ``xs`` (see module doc); with
    ``group=None``, of this process's xs alone. Results are CPU tensors."""
    descent = _Descent(xs, True, group, passes)
    n_eff, n_zero, n_nan, n_inf = (int(v) for v in descent.counts.tolist())
    all_ks = []
    for i, k in enumerate(ks):
        if k < 1:
            raise ValueError(f"ks[{i}]: k must be >= 1, got k={k}")
        all_ks.append(int(k))
    for i, r in enumerate(k_ratios):
        if not (0.0 < r < 1.0):
            raise ValueError(f"k_ratios[{i}]: k_ratio must be in (0, 1), got k_ratio={r}")
        all_ks.append(int(math.floor(r * n_eff)))
    for k in all_ks:
        if not (1 <= k < n_eff):
            raise ValueError(
                f"k={k} must be in [1, n_eff) with n_eff={n_eff} over all processes (finite "
                f"nonzero entries; n_zero={n_zero}, n_nan={n_nan}, n_inf={n_inf})")
    counts = torch.tensor([n_eff, n_zero, n_nan, n_inf], dtype=torch.int64)
    if not all_ks:
        return torch.empty((0, 7), dtype=torch.float64), counts
    ranks = sorted({k for k in all_ks} | {k + 1 for k in all_ks})
    state = descent.keys(ranks, with_log_sums=True)
    keys = [k for k, _ in state]
    ref, sums = _rank_sums(descent, keys, ref_key=min(keys))
    by_rank = {}
    for r, (key, residual), (s1, s2) in zip(ranks, state, sums):
        value = descent.layout.value(key)
        by_rank[r] = (value, r - residual, math.log(value) - ref, s1, s2)
    rows = torch.empty((len(all_ks), 7), dtype=torch.float64)
    for i, k in enumerate(all_ks):
        x_k1, n_above, c, s1, s2 = by_rank[k + 1]
        ties = k - n_above
        rows[i] = torch.tensor([
            k, x_k1, by_rank[k][0],
            s1 + ties * c + k * ref,
            s2 + 2 * ref * s1 + n_above * ref * ref + ties * (c + ref) ** 2,
            s1 - n_above * c,
            s2 - 2 * c * s1 + n_above * c * c,
        ], dtype=torch.float64)
    return rows, counts


def order_statistics(xs: list[torch.Tensor], ranks: Sequence[int], absolute: bool,
                     group) -> torch.Tensor:
    """``gradience::order_statistics`` of the union of every process's ``xs``."""
    descent = _Descent(xs, absolute, group)
    n_eff, _, n_nan, _ = (int(v) for v in descent.counts.tolist())
    n_total = n_eff if not absolute else None
    out = torch.empty(len(ranks), dtype=torch.float64)
    if not ranks:
        return out
    if not absolute and n_nan > 0:
        return out.fill_(math.nan)
    limit = n_eff if absolute else n_total
    desc_ranks = []
    for i, r in enumerate(ranks):
        if not (1 <= r <= limit):
            raise ValueError(f"ranks[{i}]: rank must be in [1, {limit}], got rank={r}")
        desc_ranks.append(r if absolute else n_total + 1 - r)
    order = sorted(set(desc_ranks))
    state = dict(zip(order, descent.keys(order, with_log_sums=False)))
    for i, r in enumerate(desc_ranks):
        out[i] = descent.layout.value(state[r][0])
    return out

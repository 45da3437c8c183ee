"""Reading values out of a sample without copying it: exceedances over a threshold and random
draws of the finite nonzero |x|, each in bounded memory (chunks of at most 2^22 entries).

These serve the procedures of the tail suite (fits, bootstrap); the hot paths are the compiled
ops. A sample is a list of tensors read as one set of values, as everywhere in the package.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # entries read at a time: 16 MiB of float32 plus its mask


def _chunks(t: torch.Tensor):
    """Views of t's values in chunks of <= CHUNK entries, without copying a strided tensor
    as a whole (a chunk of a non-contiguous tensor is copied, one chunk at a time)."""
    if t.dim() == 0:
        yield t.reshape(1)
        return
    # Split along the leading dimension; a single huge row is split along the next one.
    if t.numel() <= CHUNK:
        yield t
        return
    rows = t.shape[0]
    per_row = t.numel() // max(rows, 1)
    if per_row >= CHUNK and t.dim() > 1:
        for i in range(rows):
            yield from _chunks(t[i])
        return
    if t.dim() == 1:
        for start in range(0, rows, CHUNK):
            yield t[start:start + CHUNK]
        return
    step = max(1, CHUNK // max(per_row, 1))
    for start in range(0, rows, step):
        yield t[start:start + step]


def exceedances(xs: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The finite |x| strictly above ``threshold`` (> 0), float64, sorted descending.

    Memory: the result plus one chunk; never a mask or a copy of the whole sample.
    """
    parts = []
    for t in xs:
        for c in _chunks(t):
            a = c.abs()
            keep = (a > threshold) & torch.isfinite(a)
            if bool(keep.any()):
                parts.append(a[keep].to(torch.float64).cpu())
    if not parts:
        return torch.empty(0, dtype=torch.float64)
    return torch.sort(torch.cat(parts), descending=True).values


def finite_nonzero_abs(xs: list[torch.Tensor]) -> torch.Tensor:
    """All finite nonzero |x| as one float64 CPU tensor (only for small samples)."""
    parts = []
    for t in xs:
        a = t.detach().abs().reshape(-1).to(torch.float64).cpu()
        parts.append(a[torch.isfinite(a) & (a > 0)])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def draw_abs(xs: list[torch.Tensor], size: int, n_eff: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` draws with replacement from the finite nonzero |x| (float64, CPU).

    Positions are drawn uniformly over all entries and the zero/non-finite ones rejected, which
    gives exactly uniform draws over the valid entries. When valid entries are rare (under 1 in
    8) the valid values are gathered once instead (memory O(n_eff), small in that case).
    """
    n_total = sum(t.numel() for t in xs)
    if n_eff <= 0:
        raise ValueError("the sample has no finite nonzero entries to draw from")
    if 8 * n_eff < n_total:
        pool = finite_nonzero_abs(xs)
        idx = torch.randint(0, pool.numel(), (size,), generator=generator)
        return pool[idx]
    sizes = torch.tensor([t.numel() for t in xs], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < size:
        want = size - out.numel()
        draw = int(want * n_total / n_eff * 1.1) + 64
        pos = torch.randint(0, n_total, (draw,), generator=generator)
        which = torch.searchsorted(offsets, pos, right=True) - 1
        values = torch.empty(draw, dtype=torch.float64)
        for i, t in enumerate(xs):
            sel = which == i
            if not bool(sel.any()):
                continue
            local = pos[sel] - offsets[i]
            if t.dim() == 0:
                v = t.reshape(1).expand(int(local.numel()))
            else:
                index = torch.unravel_index(local.to(t.device), t.shape)
                v = t.detach()[index]
            values[sel] = v.to(torch.float64).cpu()
        a = values.abs()
        out = torch.cat([out, a[torch.isfinite(a) & (a > 0)]])
    return out[:size]

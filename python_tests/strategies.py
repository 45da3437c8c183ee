"""Hypothesis strategies for samples: dtypes, shapes, strides, ties, zeros, -0.0, NaN/Inf,
subnormals and values near the dtype's maximum."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

KINDS = ["cauchy", "normal", "laplace", "pareto", "uniform", "ties", "subnormal", "huge", "mixed"]


def _base_values(kind: str, n: int, dtype: torch.dtype, rng: np.random.Generator) -> np.ndarray:
    fi = torch.finfo(dtype)
    smallest_subnormal = float(fi.tiny) * float(fi.eps)
    if kind == "cauchy":
        return rng.standard_cauchy(n)
    if kind == "normal":
        return rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)
    if kind == "laplace":
        return rng.laplace(size=n)
    if kind == "pareto":
        return (rng.pareto(1.5, n) + 1.0) * rng.choice([-1.0, 1.0], n)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, n)
    if kind == "ties":
        return rng.choice([-3.0, -1.0, 0.5, 1.0, 2.0, 7.0], n) * rng.integers(1, 3, n)
    if kind == "subnormal":
        return smallest_subnormal * rng.integers(1, 64, n) * rng.choice([-1.0, 1.0], n)
    if kind == "huge":
        return float(fi.max) * rng.uniform(0.25, 1.0, n) * rng.choice([-1.0, 1.0], n)
    # mixed: a heavy tail spanning the dtype's whole range
    parts = [
        rng.standard_cauchy(n),
        smallest_subnormal * rng.integers(1, 8, n),
        float(fi.max) * rng.uniform(0.5, 1.0, n),
        rng.standard_normal(n),
    ]
    return np.choose(rng.integers(0, 4, n), parts)


@st.composite
def samples(draw, min_n: int = 2, max_n: int = 1500, dtypes=FLOAT_DTYPES, nonfinite: bool = True):
    """A tensor of a float dtype with a random layout; values drawn from a seeded generator."""
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(["flat", "transposed", "sliced", "permuted3d", "expanded"]))
    n = draw(st.integers(min_n, max_n))
    rng = np.random.default_rng(seed)
    values = _base_values(kind, n, dtype, rng)
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5]))
    mask = rng.random(n) < zero_frac
    values[mask] = rng.choice([0.0, -0.0], int(mask.sum()))
    if nonfinite and draw(st.booleans()):
        for special in (np.nan, np.inf, -np.inf):
            m = rng.random(n) < draw(st.sampled_from([0.0, 0.01, 0.1]))
            values[m] = special
    t = torch.from_numpy(values).to(dtype)
    if layout == "transposed" and n >= 4:
        rows = draw(st.integers(2, max(2, n // 2)))
        cols = n // rows
        t = t[: rows * cols].reshape(rows, cols).t()
    elif layout == "sliced" and n >= 4:
        step = draw(st.integers(2, 3))
        t = t[::step]
    elif layout == "permuted3d" and n >= 8:
        a = draw(st.integers(2, 4))
        b = draw(st.integers(2, 4))
        c = n // (a * b)
        if c >= 1:
            t = t[: a * b * c].reshape(a, b, c).permute(2, 0, 1)
    elif layout == "expanded" and n >= 4:
        cols = draw(st.integers(2, max(2, n // 2)))
        reps = draw(st.integers(1, 4))
        t = t[:cols].reshape(1, cols).expand(reps, cols)
    return t

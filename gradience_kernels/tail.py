"""Tail order statistics and tail-index estimators of |x| (DESIGN 3.1).

Every estimator is O(1) arithmetic on one fused pass family of the ``gradience::tail_stats`` op,
which returns, for each requested k, the order statistics X(k+1), X(k) of |x| (zeros and
non-finite entries excluded and counted) and the log sums of the top k, exactly (float64, no
sort, O(bins) extra memory). Inputs may be one tensor of any float dtype, shape and strides, or a
list of tensors read as one sample without concatenation. Results are tensors on the input's
device; nothing here calls ``.item()``.

Notation: X(1) >= X(2) >= ... >= X(n_eff) are the finite nonzero |x|;
H1(k) = sum_{i<=k} log(X(i)/X(k+1)) and H2(k) = sum_{i<=k} log^2(X(i)/X(k+1)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

from . import _C  # noqa: F401  (registers the ops before the fake kernels below)
from .distributed import _Layout

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = [
    "HillResult",
    "MomentResult",
    "PickandsResult",
    "hill",
    "hill_plot",
    "moment_estimator",
    "pickands",
    "quantile",
    "order_statistics",
    "tail_stats",
]

_ROW = {"k": 0, "x_k1": 1, "x_k": 2, "s1": 3, "s2": 4, "h1": 5, "h2": 6}
_INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("gradience::tail_stats")
def _tail_stats_fake(xs, ks, k_ratios):
    x0 = xs[0]
    rows = x0.new_empty((len(ks) + len(k_ratios), 7), dtype=torch.float64)
    return rows, x0.new_empty((4,), dtype=torch.int64)


@torch.library.register_fake("gradience::tail_stats_per_tensor")
def _tail_stats_per_tensor_fake(xs, ks, k_ratios):
    x0 = xs[0]
    rows = x0.new_empty((len(xs), len(ks) + len(k_ratios), 7), dtype=torch.float64)
    return rows, x0.new_empty((len(xs), 4), dtype=torch.int64)


@torch.library.register_fake("gradience::hill")
def _hill_fake(x, k):
    return x.new_empty((), dtype=torch.float64)


@torch.library.register_fake("gradience::order_statistics")
def _order_statistics_fake(xs, ranks, absolute):
    return xs[0].new_empty((len(ranks),), dtype=torch.float64)


@torch.library.register_fake("gradience::tail_histogram")
def _tail_histogram_fake(xs, absolute):
    lay = _Layout(xs[0].dtype, absolute)
    bins = 1 << (lay.width - lay.shift(0))
    return xs[0].new_empty((bins,), dtype=torch.int64), xs[0].new_empty((4,), dtype=torch.int64)


@torch.library.register_fake("gradience::tail_level_pass")
def _tail_level_pass_fake(xs, absolute, level, bins, with_log_sums):
    digit = _Layout(xs[0].dtype, absolute).digit_width(level)
    m = len(bins)
    return (xs[0].new_empty((m, 1 << digit), dtype=torch.int64),
            xs[0].new_empty((m + 1,), dtype=torch.float64),
            xs[0].new_empty((m + 1,), dtype=torch.float64),
            xs[0].new_empty((), dtype=torch.float64))


@torch.library.register_fake("gradience::quantile")
def _quantile_fake(xs, q, interpolation):
    return xs[0].new_empty((len(q),))


# --------------------------------------------------------------------------- results
class HillResult(NamedTuple):
    """Hill estimate(s); fields are tensors (0-dim, or 1-D for ``hill_plot``/``per_tensor``).

    alpha = 1/gamma, gamma = H1(k)/k, threshold = X(k+1), stderr = alpha/sqrt(k) (the
    asymptotic standard error of alpha for a Pareto-type tail, Hill 1975).
    """

    alpha: torch.Tensor
    gamma: torch.Tensor
    k: torch.Tensor
    n_eff: torch.Tensor
    n_zero: torch.Tensor
    n_nan: torch.Tensor
    n_inf: torch.Tensor
    threshold: torch.Tensor
    stderr: torch.Tensor


class MomentResult(NamedTuple):
    """Moment (Dekkers-Einmahl-de Haan 1989) estimate(s) of the extreme-value index gamma.

    gamma > 0: power-law tail with alpha = 1/gamma; gamma ~ 0: exponential-type tail
    (Gaussian, Laplace); gamma < 0: bounded support. stderr = sqrt(v(gamma)/k) with the
    asymptotic variance v = 1 + gamma^2 for gamma >= 0 and
    v = (1-gamma)^2 (1-2gamma) (1-gamma+6gamma^2) / ((1-3gamma)(1-4gamma)) for gamma < 0.
    """

    gamma: torch.Tensor
    k: torch.Tensor
    n_eff: torch.Tensor
    n_zero: torch.Tensor
    n_nan: torch.Tensor
    n_inf: torch.Tensor
    threshold: torch.Tensor
    m1: torch.Tensor
    m2: torch.Tensor
    stderr: torch.Tensor


class PickandsResult(NamedTuple):
    """Pickands (1975) estimate of gamma from X(k), X(2k), X(4k)."""

    gamma: torch.Tensor
    k: torch.Tensor
    n_eff: torch.Tensor
    n_zero: torch.Tensor
    n_nan: torch.Tensor
    n_inf: torch.Tensor
    x_k: torch.Tensor
    x_2k: torch.Tensor
    x_4k: torch.Tensor


# --------------------------------------------------------------------------- argument handling
def _as_sample(x: TensorOrList, name: str = "x") -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x.detach()]
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty list of tensors, got []")
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        return [t.detach() for t in x]
    raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")


def _k_arguments(k: int | None, k_ratio: float | None) -> tuple[list[int], list[float]]:
    if (k is None) == (k_ratio is None):
        raise ValueError(
            f"give exactly one of k and k_ratio, got k={k!r} and k_ratio={k_ratio!r}"
        )
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got k={k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got k={k}")
        return [k], []
    if isinstance(k_ratio, bool) or not isinstance(k_ratio, (int, float)):
        raise TypeError(f"k_ratio must be a float, got k_ratio={k_ratio!r}")
    if not (0.0 < float(k_ratio) < 1.0) or math.isnan(k_ratio):
        raise ValueError(f"k_ratio must be in (0, 1), got k_ratio={k_ratio}")
    return [], [float(k_ratio)]


def tail_stats(
    x: TensorOrList,
    ks: Sequence[int] = (),
    k_ratios: Sequence[float] = (),
    *,
    per_tensor: bool = False,
    process_group=None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused primitive: rows (k, X(k+1), X(k), S1, S2, H1, H2) and counts.

    S1(k) = sum_{i<=k} log X(i), S2(k) = sum_{i<=k} log^2 X(i); H1, H2 the same centred at
    log X(k+1). k_ratios give k = floor(k_ratio * n_eff). counts = (n_eff, n_zero, n_nan, n_inf).
    With ``per_tensor=True`` each tensor of the list is its own sample (leading dim len(x)).

    ``process_group`` (torch.distributed): the sample is the union of every process's x (each
    process passes its shard; with ``per_tensor`` tensor i of every process is one sample), and
    every process gets the exact global result, from merged histograms (see ``distributed``).

    ``backend``: "cpp" (default: the fused C++ op of the tensors' device: the CPU engine, or
    on CUDA the passes of csrc/tail/tail_passes_cuda.cu walked in C++), "passes" (the library's
    pass ops with the descent walked in Python, as the distributed path runs them) or "triton"
    (the Triton passes: CUDA compiled, CPU under TRITON_INTERPRET=1, walked in Python). The
    default stays "cpp" on CUDA as well: one dispatcher call that torch.compile keeps in one
    graph, against a Python walk per pass for the Triton passes; bench/bench_tail_gpu.py times
    both per dtype on a GPU (see the README for the figures).
    """
    xs = _as_sample(x)
    ks = [int(k) for k in ks]
    k_ratios = [float(r) for r in k_ratios]
    if backend not in (None, "cpp", "passes", "triton"):
        raise ValueError(
            f"backend must be 'cpp', 'passes' or 'triton', got backend={backend!r}")
    if backend is None:
        backend = "cpp"
    if process_group is not None or backend != "cpp":
        from . import distributed

        passes = distributed.LIBRARY_PASSES
        if backend == "triton":
            from .tail_triton import TRITON_PASSES as passes

        def one(sample):
            rows, counts = distributed.tail_stats(sample, ks, k_ratios, process_group, passes)
            return rows.to(xs[0].device), counts.to(xs[0].device)

        if not per_tensor:
            return one(xs)
        parts = [one([t]) for t in xs]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    if per_tensor:
        return torch.ops.gradience.tail_stats_per_tensor(xs, ks, k_ratios)
    return torch.ops.gradience.tail_stats(xs, ks, k_ratios)


def _counts(counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3]


def _hill_from_rows(rows: torch.Tensor, counts: torch.Tensor) -> HillResult:
    k = rows[..., _ROW["k"]]
    gamma = rows[..., _ROW["h1"]] / k
    alpha = 1.0 / gamma
    n_eff, n_zero, n_nan, n_inf = _counts(counts)
    if rows.dim() == 3:  # per tensor: counts broadcast over ks
        n_eff, n_zero, n_nan, n_inf = (c.unsqueeze(-1) for c in (n_eff, n_zero, n_nan, n_inf))
    return HillResult(
        alpha=alpha,
        gamma=gamma,
        k=k.to(torch.int64),
        n_eff=n_eff,
        n_zero=n_zero,
        n_nan=n_nan,
        n_inf=n_inf,
        threshold=rows[..., _ROW["x_k1"]],
        stderr=alpha / torch.sqrt(k),
    )


# --------------------------------------------------------------------------- estimators
def hill(
    x: TensorOrList,
    k: int | None = None,
    *,
    k_ratio: float | None = None,
    per_tensor: bool = False,
    process_group=None,
) -> HillResult:
    """Hill (1975) tail index of |x| from its k largest finite nonzero entries.

    gamma = (1/k) sum_{i<=k} log X(i) - log X(k+1),  alpha = 1/gamma,
    stderr(alpha) = alpha / sqrt(k).

    Give exactly one of ``k`` (1 <= k < n_eff) or ``k_ratio`` in (0, 1), which takes
    k = floor(k_ratio * n_eff). ``x`` is a tensor or a list of tensors read as one sample; with
    ``per_tensor=True`` a list gives one estimate per tensor (fields of shape [len(x)]).
    ``process_group``: the exact estimate of the union of every process's x (see tail_stats).

    Reference: B. M. Hill, "A simple general approach to inference about the tail of a
    distribution", Ann. Statist. 3 (1975) 1163-1174.
    """
    ks, ratios = _k_arguments(k, k_ratio)
    rows, counts = tail_stats(x, ks, ratios, per_tensor=per_tensor, process_group=process_group)
    return _hill_from_rows(rows[..., 0, :], counts)


def hill_plot(x: TensorOrList, ks: Sequence[int] | torch.Tensor, *,
              process_group=None) -> HillResult:
    """Hill estimates for many k from one pass family (fields are 1-D, one entry per k).

    Same definitions as :func:`hill`; every k must satisfy 1 <= k < n_eff.
    """
    if isinstance(ks, torch.Tensor):
        ks = ks.tolist()
    ks = list(ks)
    if len(ks) == 0:
        raise ValueError("ks: expected at least one k, got an empty sequence")
    for i, k in enumerate(ks):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"ks[{i}]: expected an int, got {k!r}")
    rows, counts = tail_stats(x, ks, (), process_group=process_group)
    res = _hill_from_rows(rows, counts)
    return res._replace(
        n_eff=res.n_eff.expand(len(ks)),
        n_zero=res.n_zero.expand(len(ks)),
        n_nan=res.n_nan.expand(len(ks)),
        n_inf=res.n_inf.expand(len(ks)),
    )


def _moment_variance(gamma: torch.Tensor) -> torch.Tensor:
    positive = 1.0 + gamma * gamma
    g = torch.clamp(gamma, max=0.0)
    negative = (
        (1 - g) ** 2 * (1 - 2 * g) * (1 - g + 6 * g * g) / ((1 - 3 * g) * (1 - 4 * g))
    )
    return torch.where(gamma >= 0, positive, negative)


def moment_estimator(
    x: TensorOrList,
    k: int | None = None,
    *,
    k_ratio: float | None = None,
    per_tensor: bool = False,
    process_group=None,
) -> MomentResult:
    """Moment estimator of the extreme-value index (Dekkers, Einmahl, de Haan 1989).

    M1 = (1/k) sum_{i<=k} log(X(i)/X(k+1)),  M2 = (1/k) sum_{i<=k} log^2(X(i)/X(k+1)),
    gamma = M1 + 1 - 1 / (2 (1 - M1^2/M2)).

    Real-valued: gamma > 0 for power-law tails, ~0 for exponential-type tails (Gaussian,
    Laplace), < 0 for bounded support; Hill alone cannot tell the first two apart.

    Reference: A. L. M. Dekkers, J. H. J. Einmahl, L. de Haan, "A moment estimator for the index
    of an extreme-value distribution", Ann. Statist. 17 (1989) 1833-1855.
    """
    ks, ratios = _k_arguments(k, k_ratio)
    rows, counts = tail_stats(x, ks, ratios, per_tensor=per_tensor, process_group=process_group)
    rows = rows[..., 0, :]
    kk = rows[..., _ROW["k"]]
    m1 = rows[..., _ROW["h1"]] / kk
    m2 = rows[..., _ROW["h2"]] / kk
    gamma = m1 + 1.0 - 0.5 / (1.0 - m1 * m1 / m2)
    n_eff, n_zero, n_nan, n_inf = _counts(counts)
    return MomentResult(
        gamma=gamma,
        k=kk.to(torch.int64),
        n_eff=n_eff,
        n_zero=n_zero,
        n_nan=n_nan,
        n_inf=n_inf,
        threshold=rows[..., _ROW["x_k1"]],
        m1=m1,
        m2=m2,
        stderr=torch.sqrt(_moment_variance(gamma) / kk),
    )


def pickands(
    x: TensorOrList,
    k: int | None = None,
    *,
    k_ratio: float | None = None,
    process_group=None,
) -> PickandsResult:
    """Pickands (1975) estimator: gamma = log((X(k) - X(2k)) / (X(2k) - X(4k))) / log 2.

    Needs 4k <= n_eff. With ``k_ratio``, k = floor(k_ratio * n_eff) (one extra counting pass,
    since k must be known before the ranks 2k and 4k are).

    Reference: J. Pickands III, "Statistical inference using extreme order statistics",
    Ann. Statist. 3 (1975) 119-131.
    """
    ks, ratios = _k_arguments(k, k_ratio)
    xs = _as_sample(x)
    if ratios:
        rows, _ = tail_stats(xs, [], ratios, process_group=process_group)
        kk = int(rows[0, _ROW["k"]].item())
    else:
        kk = ks[0]
    n_total = sum(t.numel() for t in xs)
    if process_group is None and 4 * kk > n_total:
        raise ValueError(f"pickands needs 4k <= n_eff, got k={kk} for a sample of {n_total}")
    # X(4k) is X(k'+1) for k' = 4k - 1, and k' < n_eff is exactly 4k <= n_eff.
    try:
        rows, counts = tail_stats(xs, [kk, 2 * kk, 4 * kk - 1], [], process_group=process_group)
    except ValueError as err:
        raise ValueError(f"pickands needs 4k <= n_eff, got k={kk}: {err}") from None
    x_k = rows[0, _ROW["x_k"]]
    x_2k = rows[1, _ROW["x_k"]]
    x_4k = rows[2, _ROW["x_k1"]]
    gamma = torch.log((x_k - x_2k) / (x_2k - x_4k)) / math.log(2.0)
    n_eff, n_zero, n_nan, n_inf = _counts(counts)
    return PickandsResult(
        gamma=gamma,
        k=torch.tensor(kk, dtype=torch.int64, device=rows.device),
        n_eff=n_eff,
        n_zero=n_zero,
        n_nan=n_nan,
        n_inf=n_inf,
        x_k=x_k,
        x_2k=x_2k,
        x_4k=x_4k,
    )


def quantile(
    x: TensorOrList,
    q: float | Sequence[float] | torch.Tensor,
    interpolation: str = "linear",
    *,
    process_group=None,
) -> torch.Tensor:
    """Quantiles of the values of x (signed, all entries), as torch.quantile/numpy.quantile.

    For the sorted sample v_0 <= ... <= v_{n-1} and h = (n-1) q: 'linear' gives
    v_floor(h) + (h - floor(h)) (v_floor(h)+1 - v_floor(h)) (numpy's two-sided lerp),
    'lower' v_floor(h), 'higher' v_ceil(h), 'nearest' v_round-half-even(h), 'midpoint' the mean
    of lower and higher. NaN anywhere gives NaN. No 2^24 size limit (torch.quantile has one);
    positions are computed in float64, the result is in the input dtype with the shape of q.

    Reference: R. J. Hyndman, Y. Fan, "Sample quantiles in statistical packages", Amer.
    Statist. 50 (1996) 361-365 (definition 7 for 'linear').
    """
    xs = _as_sample(x)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {_INTERPOLATIONS}, got interpolation={interpolation!r}"
        )
    if isinstance(q, torch.Tensor):
        shape = q.shape
        qs = [float(v) for v in q.reshape(-1).tolist()]
    elif isinstance(q, (int, float)):
        shape = torch.Size([])
        qs = [float(q)]
    else:
        qs = [float(v) for v in q]
        shape = torch.Size([len(qs)])
    for i, v in enumerate(qs):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"q[{i}]: q must be in [0, 1], got q={v}")
    if process_group is not None:
        out = float64_quantiles(xs, qs, interpolation, process_group)
        return torch.tensor(out, dtype=torch.float64).to(xs[0].dtype).reshape(shape)
    return torch.ops.gradience.quantile(xs, qs, interpolation).reshape(shape)


def numpy_quantiles(n: int, qs: Sequence[float], mode: str, order_statistics_of) -> list[float]:
    """numpy.quantile's positions (h = (n - 1) q) and interpolation over exact order
    statistics, in float64: ``order_statistics_of(ranks)`` returns the ascending 1-based ranks'
    values. Mirrors quantile_cpu (csrc/tail/tail_ops_cpu.cpp) for the paths without that op."""
    plan = []
    for q in qs:
        h = (n - 1) * q
        lo, hi = math.floor(h), math.ceil(h)
        if mode == "linear":
            plan.append((lo, min(lo + 1, n - 1), h - lo))
        elif mode == "lower":
            plan.append((lo, lo, 0.0))
        elif mode == "higher":
            plan.append((hi, hi, 0.0))
        elif mode == "nearest":
            r = round(h)  # Python rounds half to even, as numpy
            plan.append((r, r, 0.0))
        else:
            plan.append((lo, hi, 0.0 if lo == hi else 0.5))
    ranks = sorted({i + 1 for a, b, _ in plan for i in (a, b)})
    values = dict(zip(ranks, order_statistics_of(ranks)))
    out = []
    for a, b, t in plan:
        va, vb = values[a + 1], values[b + 1]
        if mode in ("linear", "midpoint"):
            # numpy's two-sided lerp (exact at both ends).
            out.append(vb - (vb - va) * (1.0 - t) if t >= 0.5 else va + (vb - va) * t)
        else:
            out.append(va)
    return out


def float64_quantiles(xs: list[torch.Tensor], qs: Sequence[float], mode: str,
                      process_group=None) -> list[float]:
    """numpy.quantile of the signed sample (the union of every process's xs with a
    ``process_group``), positions and interpolation in float64 whatever the dtype."""
    n = sum(t.numel() for t in xs)
    if process_group is None:
        return numpy_quantiles(n, qs, mode, lambda ranks: torch.ops.gradience.order_statistics(
            xs, ranks, False).tolist())
    import torch.distributed as dist

    from . import distributed

    total = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(total, group=process_group)
    return numpy_quantiles(int(total), qs, mode, lambda ranks: distributed.order_statistics(
        xs, ranks, False, process_group).tolist())


def order_statistics(
    x: TensorOrList, ranks: Sequence[int] | torch.Tensor, *, absolute: bool = True,
    process_group=None,
) -> torch.Tensor:
    """Order statistics at 1-based ranks, float64, exact for any sample size.

    absolute=True (default): X(r), the r-th largest finite nonzero |x| (1 <= r <= n_eff), the
    tail convention of the estimators. absolute=False: the r-th smallest x (1 <= r <= n), as
    torch.kthvalue; NaN everywhere if the sample holds a NaN.
    """
    xs = _as_sample(x)
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.tolist()
    ranks = [int(r) for r in ranks]
    if process_group is not None:
        from . import distributed

        return distributed.order_statistics(xs, ranks, bool(absolute), process_group)
    return torch.ops.gradience.order_statistics(xs, ranks, bool(absolute))

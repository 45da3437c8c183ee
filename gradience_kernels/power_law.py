"""Continuous power-law fit of the tail of eigenvalue spectra (DESIGN 3.2).

The method of Clauset, Shalizi and Newman, "Power-law distributions in empirical data", SIAM
Review 51(4) (2009) 661-703, with the conventions of the ``powerlaw`` package (2.x) for
continuous data, the package WeightWatcher fits with. For each candidate ``xmin``:

    alpha = 1 + n_tail / sum_{x_i >= xmin} log(x_i / xmin)                 (CSN eq. 3.1)
    sigma = (alpha - 1) / sqrt(n_tail)                                     (CSN eq. 3.2)
    D     = max_{u in tail, distinct} | E(u) - F(u) |                      (CSN section 3.3)

with F(x) = 1 - (x / xmin)^(1 - alpha) the fitted CDF and E the tail's empirical CDF; the fit is
the candidate of minimal D. One op call fits every layer of a batch: a C++ kernel gets all the
alphas in O(n log n) from a sort and suffix sums of log x, and each exact D from block bounds
(E and F are both non-decreasing along the tail, so |E - F| on a block is bounded by its ends;
only blocks that can exceed the running max are looked into), the same D as the O(n^2) scan.

Conventions, read from powerlaw 2.x's source (``Fit.find_xmin``, ``statistics.cdf``,
``Distribution.compute_distance_metrics``, ``Power_Law``):

- candidates: the distinct values but the largest two (``np.unique``, the maximum excluded by
  ``data < max``, then ``[:-1]``), ascending; a layer with fewer than 3 distinct values has
  none, and its fit is NaN (powerlaw needs 2 candidates and returns NaN below that).
- ECDF in D: left-continuous at the distinct tail values, E(u) = #{tail values < u} / n_tail
  (``searchsorted(side='left')``, i/n steps; ties counted once); D = max(D+, D-) over those
  points only.
- ties on D: the first (smallest) xmin, as ``numpy.argmin``.
- ``alpha_range=(lo, hi)``: only candidates with lo < alpha < hi are eligible (powerlaw's
  ``Power_Law`` has parameter range alpha in (0, 3) and skips candidates outside; pass
  ``alpha_range=(0, 3)`` to reproduce that). With no eligible candidate the fit is the minimal D
  over all (as powerlaw) and ``in_range`` is False. Default ``None``: every candidate (CSN;
  spectral tails often have alpha > 3).
- ``xmax``: values above it are left out (counted in ``n_above_xmax``) and the fitted CDF is
  that of the power law truncated to [xmin, xmax], F(x) = (1 - (x/xmin)^(1-alpha)) /
  (1 - (xmax/xmin)^(1-alpha)), as powerlaw's D. powerlaw's alpha with xmax is not one
  estimator: the untruncated closed form where that lies in (1.5, 3], a numerical (Nelder-Mead,
  tol 1e-4) truncated maximum likelihood elsewhere. ``xmax_alpha='mle'`` (default) takes the
  truncated maximum-likelihood alpha everywhere (the root t = alpha - 1 of
  1/t - L/(e^{tL} - 1) = S/n_tail, L = log(xmax/xmin), solved to machine precision; alpha may be
  <= 1); ``xmax_alpha='powerlaw'`` reproduces powerlaw's switch (equal where powerlaw uses the
  closed form, equal to its optimiser's tolerance elsewhere).
- sigma: (alpha - 1)/sqrt(n_tail), powerlaw's ``standard_err`` (also with xmax, where it is
  only nominal); n_tail counts the tail values at most xmax (powerlaw's ``Fit.n_tail`` adds the
  values above xmax; ours reports them apart).
- non-positive values: ``nonpositive='error'`` (default) rejects them, naming the value;
  ``'drop'`` leaves them out and counts them (``n_dropped``), as powerlaw does with zeros and as
  WeightWatcher does with tiny eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from . import _C  # noqa: F401  (registers the ops before the fake kernel below)

__all__ = ["PowerLawFit", "fit_power_law"]

LayersInput = Union[torch.Tensor, Sequence[torch.Tensor]]

_FIT_COLUMNS = 4  # xmin, alpha, D, sigma
_COUNT_COLUMNS = 7  # n_candidates, best, n_tail, n_used, n_dropped, n_above_xmax, n_eligible
_XMAX_ALPHA = ("mle", "powerlaw")
_NONPOSITIVE = ("error", "drop")
_D_MODES = ("pruned", "exhaustive")


@torch.library.register_fake("gradience::fit_power_law")
def _fit_power_law_fake(xs, xmax, xmax_alpha, alpha_range, drop_nonpositive, d_mode):
    x0 = xs[0]
    total = sum(x.numel() for x in xs)
    return (x0.new_empty((len(xs), _FIT_COLUMNS), dtype=torch.float64),
            x0.new_empty((len(xs), _COUNT_COLUMNS), dtype=torch.int64),
            x0.new_empty((3, total), dtype=torch.float64),
            x0.new_empty((total,), dtype=torch.int64))


@dataclass(frozen=True)
class PowerLawFit:
    """One layer's fit. Scalars are 0-dim tensors (float64, int64 counts, bool ``in_range``);
    the per-candidate curves are 1-D, in ascending xmin (views into the op's outputs).

    alpha, xmin, D, sigma, n_tail: the chosen candidate (NaN, NaN, NaN, NaN, 0 without one).
    xmins, alphas, Ds, n_tails: every candidate (for D(xmin) plots).
    n_used: values fitted (positive, at most xmax); n_dropped: values <= 0 left out;
    n_above_xmax: values above xmax left out; n_eligible: candidates inside alpha_range;
    in_range: whether the chosen alpha is inside alpha_range.
    """

    alpha: torch.Tensor
    xmin: torch.Tensor
    D: torch.Tensor
    sigma: torch.Tensor
    n_tail: torch.Tensor
    xmins: torch.Tensor
    alphas: torch.Tensor
    Ds: torch.Tensor
    n_tails: torch.Tensor
    n_used: torch.Tensor
    n_dropped: torch.Tensor
    n_above_xmax: torch.Tensor
    n_eligible: torch.Tensor
    in_range: torch.Tensor


def _layers(x: LayersInput) -> tuple[list[torch.Tensor], bool]:
    """The layers as a list of 1-D tensors, and whether the caller gave a batch."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 1:
            return [x.detach()], False
        if x.dim() == 2:
            if x.shape[0] == 0:
                raise ValueError(f"x: expected at least one row, got shape {tuple(x.shape)}")
            return list(x.detach().unbind(0)), True
        raise ValueError(f"x: expected a 1-D tensor, a 2-D tensor of rows or a list of 1-D "
                         f"tensors, got shape {tuple(x.shape)}")
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError("x: expected at least one layer, got an empty list")
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"x[{i}]: expected a tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"x[{i}]: expected a 1-D tensor, got shape {tuple(t.shape)}")
        return [t.detach() for t in x], True
    raise TypeError(f"x: expected a tensor or a list of tensors, got {type(x).__name__}")


def _check_layer(i: int, t: torch.Tensor, batched: bool) -> None:
    name = f"x[{i}]" if batched else "x"
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one value, got an empty tensor")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor (the fit has a CPU kernel only), got "
                         f"device {t.device}")


def fit_power_law(
    x: LayersInput,
    *,
    xmax: float | None = None,
    xmax_alpha: str = "mle",
    alpha_range: tuple[float, float] | None = None,
    nonpositive: str = "error",
    d_mode: str = "pruned",
) -> PowerLawFit | list[PowerLawFit]:
    """Clauset-Shalizi-Newman power-law fit of each layer's values (eigenvalues).

    For every candidate xmin (the distinct values but the largest two), with the tail
    x_i >= xmin of size n_tail:

        alpha(xmin) = 1 + n_tail / sum_{x_i >= xmin} log(x_i / xmin)        (CSN eq. 3.1)
        D(xmin)     = max_u | #{x_i < u}/n_tail - (1 - (u/xmin)^(1-alpha)) |  (section 3.3)

    over the distinct tail values u; the fit is the xmin of minimal D (the first on ties), with
    sigma = (alpha - 1)/sqrt(n_tail) (eq. 3.2). The conventions (candidates, ECDF, ties, xmax,
    sigma) are powerlaw 2.x's for continuous data; see the module docstring for the details
    and for ``xmax``, ``xmax_alpha`` and ``alpha_range``.

    Args:
        x: a 1-D tensor (one layer: returns a PowerLawFit), or a 2-D tensor of rows or a list
            of 1-D tensors of any lengths (returns a list, one fit per layer, from ONE op
            call). Any float dtype, CPU; values finite. Never modified.
        xmax: leave out values above it and fit the power law truncated at xmax.
        xmax_alpha: 'mle' (truncated maximum likelihood) or 'powerlaw' (powerlaw's switch).
        alpha_range: (lo, hi): only candidates with lo < alpha < hi may be chosen.
        nonpositive: 'error' (reject values <= 0) or 'drop' (leave them out, counted).
        d_mode: 'pruned' (block bounds, default) or 'exhaustive' (F at every point, O(n^2));
            both give bitwise the same D; the second exists to check and time the first.

    Reference: A. Clauset, C. R. Shalizi, M. E. J. Newman, "Power-law distributions in
    empirical data", SIAM Review 51(4) (2009) 661-703, eqs. (3.1)-(3.2) and section 3.3.
    """
    layers, batched = _layers(x)
    for i, t in enumerate(layers):
        _check_layer(i, t, batched)
    if xmax is not None:
        if isinstance(xmax, bool) or not isinstance(xmax, (int, float)):
            raise TypeError(f"xmax: expected a float or None, got xmax={xmax!r}")
        if not (math.isfinite(xmax) and xmax > 0):
            raise ValueError(f"xmax: expected a finite value > 0, got xmax={xmax}")
        xmax = float(xmax)
    if xmax_alpha not in _XMAX_ALPHA:
        raise ValueError(f"xmax_alpha: expected one of {_XMAX_ALPHA}, got "
                         f"xmax_alpha={xmax_alpha!r}")
    if nonpositive not in _NONPOSITIVE:
        raise ValueError(f"nonpositive: expected one of {_NONPOSITIVE}, got "
                         f"nonpositive={nonpositive!r}")
    if d_mode not in _D_MODES:
        raise ValueError(f"d_mode: expected one of {_D_MODES}, got d_mode={d_mode!r}")
    bounds: list[float] = []
    if alpha_range is not None:
        if not isinstance(alpha_range, (tuple, list)) or len(alpha_range) != 2:
            raise ValueError(f"alpha_range: expected (low, high) or None, got "
                             f"alpha_range={alpha_range!r}")
        lo, hi = (float(a) for a in alpha_range)
        if not lo < hi:  # also rejects NaN
            raise ValueError(f"alpha_range: expected low < high, got alpha_range={alpha_range!r}")
        bounds = [lo, hi]
    # Data checks (finite, positive unless dropped, xmax above the smallest value) are the op's,
    # before any work; their messages name the op's argument xs[layer][index].
    fits, counts, curves, n_tails = torch.ops.gradience.fit_power_law(
        layers, xmax, xmax_alpha, bounds, nonpositive == "drop", d_mode)
    results = []
    offset = 0
    counts_list = counts.tolist()
    for i, t in enumerate(layers):
        n_cand = counts_list[i][0]
        cols = slice(offset, offset + n_cand)
        alpha = fits[i, 1]
        in_range = (alpha > bounds[0]) & (alpha < bounds[1]) if bounds else alpha == alpha
        results.append(PowerLawFit(
            alpha=alpha, xmin=fits[i, 0], D=fits[i, 2], sigma=fits[i, 3], n_tail=counts[i, 2],
            xmins=curves[0, cols], alphas=curves[1, cols], Ds=curves[2, cols],
            n_tails=n_tails[cols], n_used=counts[i, 3], n_dropped=counts[i, 4],
            n_above_xmax=counts[i, 5], n_eligible=counts[i, 6], in_range=in_range,
        ))
        offset += t.numel()
    return results if batched else results[0]

"""Model-level spectral analysis (DESIGN 3.2): one row of spectral metrics per weight matrix.

``analyze(model_or_state_dict)`` reads the weight matrices of an ``nn.Module``, a state_dict
(name -> tensor) or a saved state_dict file (.pt/.pth/.bin by ``torch.load(weights_only=True)``,
.safetensors when the ``safetensors`` package is importable), computes the eigenvalues of
W^T W of every matrix (a worker pool on the CPU, batches of same-shape matrices on CUDA), fits
the power-law tail of every layer in ONE batched ``fit_power_law`` call, and returns a list of
dicts (``format_table`` prints them).
Layout: the layers and their filters in analysis_layers, the spectra in analysis_spectra, the
fits, metrics and rows in analysis_fits, the table/JSON/CSV output in analysis_output, the
progress bar in analysis_progress; this module holds ``analyze`` and re-exports the rest.

Conventions: those of WeightWatcher 0.7.7's plain ``WeightWatcher(model).analyze()``, read from
its source (weightwatcher/weightwatcher.py, constants.py, WW_powerlaw.py):

- Which tensors (``PyTorchLayer.layer_type``, ``PyStateDictLayer``): for an nn.Module, every
  submodule whose type name (``str(type(module)).lower()``, so the class's module path counts)
  contains 'linear' (dense), else 'conv1d', else 'conv2d', else 'embedding', and has a
  ``weight`` tensor; types containing 'norm' and all others are skipped (LayerNorm, the
  in_proj_weight of nn.MultiheadAttention, biases). For a state_dict, every key ending in
  '.weight' whose tensor is 2-D (dense) or 4-D (conv2d) and has at least 2 rows. A dict with a
  'state_dict' entry is unwrapped first (WeightWatcher's ``set_model_``).
- Matrices (``WWLayer.set_weight_matrices``, ``conv2D_Wmats``): a dense/embedding weight is one
  N x M matrix, N = max(shape), M = min(shape), rf = 1. A Conv2d weight (out, in, kh, kw) is
  rf = kh*kw matrices W[:, :, i, j], whose eigenvalues are pooled into one ESD of rf*M values
  (``pool=True``), each matrix scaled by sqrt(1/2) first (``conv2d_norm=True`` in
  ``apply_normalize_Wmats``: the eigenvalues are halved). Conv1d weights (out, in, k) are read
  the same way (k matrices, pooled, no scaling): WeightWatcher 0.7.7 passes the 3-D tensor to
  its SVD unsliced, which fails or, for k < 8, gets the layer skipped as having k eigenvalues.
  WeightWatcher's N and M of a Conv2d with an even kernel size and out < in come out swapped
  (the swap sits inside its loop over kernel positions); here N >= M always, which can only
  change the min_evals/max_evals decision of such a layer.
- Eigenvalues (``combined_eigenvalues``): lambda_i = s_i^2, the squared singular values, NOT
  divided by N (``normalize=False`` since 0.6.5). All M per matrix are kept for the metrics.
- Filters (``analyze`` defaults, ``WWLayerIterator.layer_supported``): a layer is skipped when
  M*rf < min_evals = 8 (``DEFAULT_MIN_EVALS``; its docstring's "10" and describe()'s "50" are
  stale), when M*rf > max_evals = 15000 (``DEFAULT_MAX_EVALS``), or when N > max_N = 50000
  (``DEFAULT_MAX_N``). ``min_evals=0``/``max_evals=0`` disable those two (as in WeightWatcher).
- Power-law fit (``fit_powerlaw`` with ``xmax=None``, ``pl_package='ww'`` -> ``WWFit``): the
  fit uses the eigenvalues > 1e-5 (``EVALS_THRESH``); no xmax (WWFit's default since issue 199:
  the largest eigenvalue bounds nothing). Every value but the largest is a candidate xmin;
  alpha = 1 + n/sum log(x/xmin), D = max |E - F| with E = i/n at the sorted tail points and
  F(x) = 1 - (x/xmin)^(1-alpha), the candidate of minimal D (first on ties); sigma =
  (alpha-1)/sqrt(n); ``n_tail`` (WeightWatcher's num_pl_spikes) counts the eigenvalues >= xmin.
  That is ``power_law.fit_power_law`` (powerlaw 2.x conventions, one batched op call), whose
  candidates leave out the second-largest value as well: WWFit's extra candidate, the 2-point
  tail, always has D = 1 - e^-2 - 1/2 = 0.3647 and is taken here in the (rare) case that every
  other candidate has a larger D. With fewer than 20 values above 1e-5 WWFit switches to a
  small-sample rule (``fit_powerlaw_smallN``), reproduced here: tails of at least 8 values,
  alpha = 1 + (n-1)/sum log(x/xmin), xmin minimising D - 0.868/sqrt(n). Tied eigenvalues
  (exactly repeated values) are candidates once here and once per copy in WWFit.
- Metrics (``apply_norm_metrics``, ``apply_esd``): lambda_max, log_spectral_norm =
  log10(lambda_max), log_norm = log10(sum lambda), stable_rank = sum lambda / lambda_max,
  alpha_weighted = alpha * log10(lambda_max), log_alpha_norm = log10(sum lambda^alpha),
  matrix_rank = #{s > s_max * N * eps}, warning 'over-trained' (alpha < 2) / 'under-trained'
  (alpha > 6), entropy (matrix_entropy: -sum p log p / log(rank), p = lambda / sum lambda).
  Added here, from ``spectrum_metrics``: spectral_norm = sqrt(lambda_max) (||W||_2 for a dense
  layer), frobenius_norm, nuclear_norm = sum s, effective_rank = exp(entropy of s / sum s) (Roy
  and Vetterli 2007), condition_number = s_max / s_min (for a pooled conv layer those of the
  block-diagonal matrix of its slices), and per matrix the Marchenko-Pastur fit of
  ``marchenko_pastur_fit`` (Gavish-Donoho median noise level, bulk edge, Tracy-Widom 0.99
  margin): mp_spikes = eigenvalues above it, summed over a conv layer's slices, mp_bulk_edge =
  the largest slice's edge in lambda units (s^2). Values of a Conv2d layer include the 1/2.

Precision and speed. WeightWatcher runs one float64 SVD per matrix (scipy.linalg.svd). Here
the eigenvalues of W^T W come from the Gram matrix and a symmetric eigensolver (about half the
flops of an SVD: N M^2 for the Gram by SYRK, 4/3 M^3 for the tridiagonal reduction). On CUDA
same-shape matrices are grouped: one batched Gram product and one batched eigvalsh per chunk.
On the CPU each matrix is one task of a pool of torch.get_num_threads() workers running
single-threaded LAPACK (numpy.linalg.eigvalsh releases the GIL; see ``analysis_spectra._cpu_spectra``).
``precision='auto'`` (default): the Gram matrix in the weight's precision (float32 for
float32/bfloat16/float16 weights: exact products, float32 sums), the eigensolver in float64;
the Gram matrix's rounding moves the eigenvalues by ~1e-7..1e-6 of lambda_max, and the alphas
of the 26 layers of bench/bench_spectral.py's model by at most ~2e-6 from WeightWatcher's float64
SVD (measured). ``'float64'``: everything in float64 (alphas equal to WeightWatcher's to ~1e-11).
``'float32'``: everything in float32 (eigenvalue errors of a few 1e-6 of lambda_max: alpha
errors up to 1e-4..1e-3 on short tails with alpha > 30, measured). The ``precision`` column says
which route each layer took.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from .analysis_fits import _fit_layers, _row
from .analysis_layers import (_dims, _filter, _from_module, _from_state_dict, _storage_key,
                              load_state_dict)
from .analysis_output import DEFAULT_COLUMNS, format_rows, format_table, write_rows
from .analysis_progress import _Progress
from .analysis_spectra import _spectra

__all__ = [
    "analyze",
    "format_table",
    "load_state_dict",
    "format_rows",
    "write_rows",
    "DEFAULT_COLUMNS",
    "WW_MIN_EVALS",
    "WW_MAX_EVALS",
    "WW_MAX_N",
    "WW_EVALS_THRESH",
]

# WeightWatcher 0.7.7 defaults (constants.py, used by WeightWatcher.analyze).
WW_MIN_EVALS = 8          # DEFAULT_MIN_EVALS
WW_MAX_EVALS = 15000      # DEFAULT_MAX_EVALS
WW_MAX_N = 50000          # DEFAULT_MAX_N
WW_EVALS_THRESH = 1e-5    # EVALS_THRESH: eigenvalues at most this are left out of the fit

ModelInput = Union[torch.nn.Module, Mapping[str, Any], str, os.PathLike]


def analyze(
    model_or_state_dict: ModelInput,
    *,
    layers: Sequence[str] | str | None = None,
    min_evals: int = WW_MIN_EVALS,
    max_evals: int = WW_MAX_EVALS,
    max_N: int = WW_MAX_N,
    conv2d_norm: bool = True,
    evals_thresh: float = WW_EVALS_THRESH,
    precision: str = "auto",
    device: str | torch.device | None = None,
    include_skipped: bool = False,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Spectral metrics and the power-law fit of every weight matrix: a list of dicts.

    Args:
        model_or_state_dict: an ``nn.Module``, a state_dict (name -> tensor; a dict with a
            'state_dict' entry is unwrapped) or the path of a saved one (.pt/.pth/.bin/.ckpt,
            read with ``torch.load(weights_only=True)``; .safetensors with the safetensors
            package).
        layers: names (or fnmatch patterns, e.g. 'blocks.*.fc1') of the layers to analyse;
            None: all.
        min_evals, max_evals, max_N: WeightWatcher's layer filters (defaults 8, 15000, 50000):
            layers with M*rf < min_evals or M*rf > max_evals eigenvalues, or N > max_N, are
            skipped; 0 disables min_evals/max_evals.
        conv2d_norm: halve the eigenvalues of Conv2d layers (WeightWatcher's default).
        evals_thresh: eigenvalues at most this are left out of the power-law fit (1e-5).
        precision: 'auto' (default), 'float64' or 'float32': see the module docstring.
        device: compute the spectra there (default: where each weight lives).
        include_skipped: also return a row (name, kind, shape, status='skipped: reason') for
            every weight matrix left out by the filters.
        progress: progress bar on stderr: None (default) shows it on a TTY once the run takes
            more than 0.5 s; True on a TTY from the start; False never.

    Returns one dict per analysed weight matrix, in model (or state_dict) order, with keys:
    name, kind, shape, N, M, rf, num_evals, alpha, xmin, xmax, D, sigma, n_tail, status,
    warning, fit_rule, lambda_max, spectral_norm, log_spectral_norm, frobenius_norm, log_norm,
    stable_rank, nuclear_norm, effective_rank, condition_number, matrix_rank, entropy,
    mp_bulk_edge, mp_spikes, alpha_weighted, log_alpha_norm, precision. The conventions are
    WeightWatcher 0.7.7's (module docstring).

    Raises FileNotFoundError / ValueError / TypeError / ImportError naming the path, key or
    argument for a missing or unreadable file, a non-tensor state_dict value, bad arguments,
    or a model without any weight matrix to analyse.
    """
    if precision not in ("auto", "float64", "float32"):
        raise ValueError(f"precision: expected 'auto', 'float64' or 'float32', got "
                         f"precision={precision!r}")
    for name, v in (("min_evals", min_evals), ("max_evals", max_evals), ("max_N", max_N)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {name}={v!r}")
    if not (isinstance(evals_thresh, (int, float)) and math.isfinite(evals_thresh)
            and evals_thresh >= 0):
        raise ValueError(f"evals_thresh: expected a finite float >= 0, got "
                         f"evals_thresh={evals_thresh!r}")
    if isinstance(layers, str):
        layers = [layers]

    src = model_or_state_dict
    if isinstance(src, (str, os.PathLike)):
        what = repr(str(src))
        found = _from_state_dict(load_state_dict(src), what)
    elif isinstance(src, torch.nn.Module):
        what = type(src).__name__
        found = _from_module(src)
    elif isinstance(src, Mapping):
        what = "state_dict"
        found = _from_state_dict(src, what)
    else:
        raise TypeError(f"model_or_state_dict: expected an nn.Module, a state_dict or a path, "
                        f"got {type(src).__name__}")
    if layers is not None:
        patterns = list(layers)
        found = [L for L in found if any(fnmatch.fnmatchcase(L.name, p) for p in patterns)]
        if not found:
            raise ValueError(f"layers={patterns!r} matches no weight matrix of {what}")
    if not found:
        hint = ("Linear/Conv1d/Conv2d/Embedding submodules with a weight" if what not in
                ("state_dict",) and not what.startswith("'") else
                "'.weight' keys holding 2-D or 4-D tensors with at least 2 rows")
        raise ValueError(f"no weight matrices in {what}: expected {hint}")
    for L in found:
        _dims(L, conv2d_norm)
        if L.skip is None:
            _filter(L, min_evals, max_evals, max_N)
    todo = [i for i, L in enumerate(found) if L.skip is None]
    if not todo and not include_skipped:
        reasons = "; ".join(f"{L.name} {tuple(L.weight.shape)}: {L.skip}" for L in found[:6])
        more = f" (and {len(found) - 6} more)" if len(found) > 6 else ""
        raise ValueError(f"no weight matrix of {what} passes the filters (min_evals={min_evals}, "
                         f"max_evals={max_evals}, max_N={max_N}): {reasons}{more}")

    # Same storage, same spectrum (tied embeddings): computed once.
    first_of: dict[tuple, int] = {}
    alias: dict[int, int] = {}
    for i in todo:
        key = _storage_key(found[i].weight)
        if key in first_of:
            alias[i] = first_of[key]
        else:
            first_of[key] = i
    unique = [i for i in todo if i not in alias]

    n_mats = sum(found[i].rf for i in unique)
    bar = _Progress(n_mats + 1, "analyze: spectra", progress)
    try:
        with torch.no_grad():
            _spectra(found, unique, precision, device, bar.advance)
        bar.advance(0, "analyze: power-law fits")
        _fit_layers(found, unique, evals_thresh)
        for i, j in alias.items():
            src_layer = found[j]
            found[i].evals, found[i].per_matrix = src_layer.evals, src_layer.per_matrix
            found[i].fit, found[i].route = src_layer.fit, src_layer.route
        bar.advance(1)
    finally:
        bar.close()

    rows = []
    for L in found:
        if L.skip is None:
            rows.append(_row(L, evals_thresh))
        elif include_skipped:
            rows.append({"name": L.name, "kind": L.kind,
                         "shape": tuple(int(d) for d in L.weight.shape),
                         "N": L.N, "M": L.M, "rf": L.rf, "status": f"skipped: {L.skip}"})
    return rows

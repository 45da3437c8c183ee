"""Model-level spectral analysis (DESIGN 3.2): one row of spectral metrics per weight matrix.

``analyze(model_or_state_dict)`` reads the weight matrices of an ``nn.Module``, a state_dict
(name -> tensor) or a saved state_dict file (.pt/.pth/.bin by ``torch.load(weights_only=True)``,
.safetensors when the ``safetensors`` package is importable), computes the eigenvalues of
W^T W of every matrix (a worker pool on the CPU, batches of same-shape matrices on CUDA), fits
the power-law tail of every layer in ONE batched ``fit_power_law`` call, and returns a list of
dicts (``format_table`` prints them).

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
single-threaded LAPACK (numpy.linalg.eigvalsh releases the GIL; see ``_cpu_spectra``).
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
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

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
_WW_SMALL_N = 20          # WW_powerlaw.SMALL_N_CUTOFF: below, WWFit's small-sample rule
_WW_SMALL_N_KMIN = 8      # fit_powerlaw_smallN's k_min
_WW_SMALL_N_PENALTY = 0.868
_TWO_POINT_D = 1.0 - math.exp(-2.0) - 0.5   # D of WWFit's 2-point tail candidate, always
_OVER_TRAINED, _UNDER_TRAINED = 2.0, 6.0    # constants.OVER/UNDER_TRAINED_THRESH
_CHUNK_BYTES = 256 << 20   # one batched spectrum computation holds at most this much input

ModelInput = Union[torch.nn.Module, Mapping[str, Any], str, os.PathLike]

DEFAULT_COLUMNS: list[tuple[str, str, str]] = [
    ("name", "layer", ""),
    ("shape", "shape", ""),
    ("num_evals", "evals", "d"),
    ("alpha", "alpha", ".3f"),
    ("xmin", "xmin", ".4g"),
    ("D", "D", ".4f"),
    ("n_tail", "n_tail", "d"),
    ("stable_rank", "stable rank", ".2f"),
    ("effective_rank", "eff. rank", ".1f"),
    ("spectral_norm", "||W||_2", ".4g"),
    ("log_spectral_norm", "log10 lmax", ".3f"),
    ("frobenius_norm", "||W||_F", ".4g"),
    ("mp_spikes", "MP spikes", "d"),
    ("warning", "warning", ""),
]


# --------------------------------------------------------------------------- loading
def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a saved state_dict: .pt/.pth/.bin/.ckpt (``torch.load(weights_only=True)``, on CPU)
    or .safetensors (needs the ``safetensors`` package). Errors name the path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"expected a state_dict file (.pt, .pth, .bin, .ckpt or "
                                f".safetensors), got a directory: {str(path)!r}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {str(path)!r} needs the safetensors package (pip "
                              f"install safetensors), which is not importable: {err}") from None
        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise ValueError(f"could not read {str(path)!r} as a safetensors file: "
                             f"{type(err).__name__}: {err}") from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"could not read {str(path)!r} with torch.load(weights_only=True): "
                             f"{type(err).__name__}: {first}") from None
        if not isinstance(obj, Mapping):
            raise TypeError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state_dict "
                            f"(a dict of name -> tensor)")
        return dict(obj)
    raise ValueError(f"unsupported file type {p.suffix!r} for {str(path)!r}: expected .pt, .pth, "
                     f".bin, .ckpt or .safetensors")


# --------------------------------------------------------------------------- layers
@dataclass
class _Layer:
    name: str
    kind: str                 # linear | embedding | conv1d | conv2d | dense (state_dict 2-D)
    weight: torch.Tensor
    N: int = 0
    M: int = 0
    rf: int = 1
    scale: float = 1.0        # eigenvalue factor (1/2 for Conv2d under conv2d_norm)
    skip: str | None = None
    evals: torch.Tensor | None = None   # float64 ascending, all rf*M values (scaled)
    per_matrix: torch.Tensor | None = None  # (rf, M) float64 ascending per matrix (scaled)
    route: str = ""
    fit: dict = field(default_factory=dict)


def _module_kind(module: torch.nn.Module) -> str | None:
    # WeightWatcher's PyTorchLayer.layer_type: substring tests on the lower-cased type string.
    typestr = str(type(module)).lower()
    if "linear" in typestr:
        return "linear"
    if "conv1d" in typestr:
        return "conv1d"
    if "conv2d" in typestr:
        return "conv2d"
    if "embedding" in typestr:
        return "embedding"
    return None  # 'norm' types and everything else: no weight matrix


_NDIM = {"linear": 2, "embedding": 2, "dense": 2, "conv1d": 3, "conv2d": 4}


def _from_module(model: torch.nn.Module) -> list[_Layer]:
    layers = []
    for name, module in model.named_modules():
        kind = _module_kind(module)
        if kind is None:
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        layers.append(_Layer(name or type(module).__name__, kind, w.detach()))
    return layers


def _from_state_dict(sd: Mapping[str, Any], what: str) -> list[_Layer]:
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: state_dict keys must be strings, got key {key!r} "
                            f"({type(key).__name__})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: state_dict[{key!r}] is a {type(value).__name__}, expected "
                            f"a tensor")
    layers = []
    for key, value in sd.items():
        if not key.endswith(".weight"):
            continue
        if value.dim() == 2:
            kind = "dense"
        elif value.dim() == 4:
            kind = "conv2d"
        else:
            continue  # WeightWatcher: LAYER_TYPE.UNKNOWN (biases, norms, 1-D/3-D tensors)
        if value.shape[0] < 2:
            continue  # PyStateDictLayer.layer_type: len(weights) < 2 is UNKNOWN
        layers.append(_Layer(key[: -len(".weight")], kind, value.detach()))
    return layers


def _dims(layer: _Layer, conv2d_norm: bool) -> None:
    w = layer.weight
    if w.dim() != _NDIM[layer.kind]:
        layer.skip = f"{layer.kind} weight of shape {tuple(w.shape)} is not {_NDIM[layer.kind]}-D"
        return
    if w.is_complex() or not w.dtype.is_floating_point:
        layer.skip = f"dtype {w.dtype} is not a real floating-point type"
        return
    if w.numel() == 0:
        layer.skip = "empty weight"
        return
    out_c, in_c = int(w.shape[0]), int(w.shape[1])
    layer.N, layer.M = max(out_c, in_c), min(out_c, in_c)
    layer.rf = int(math.prod(w.shape[2:])) if w.dim() > 2 else 1
    layer.scale = 0.5 if (layer.kind == "conv2d" and conv2d_norm) else 1.0


def _filter(layer: _Layer, min_evals: int, max_evals: int, max_N: int) -> None:
    n_evals = layer.M * layer.rf
    if min_evals and n_evals < min_evals:
        layer.skip = f"{n_evals} eigenvalues < min_evals={min_evals}"
    elif max_evals and n_evals > max_evals:
        layer.skip = f"{n_evals} eigenvalues > max_evals={max_evals}"
    elif layer.N > max_N:
        layer.skip = f"N={layer.N} > max_N={max_N}"


def _matrices(layer: _Layer) -> list[torch.Tensor]:
    """The layer's matrices, each oriented tall (rows >= cols)."""
    w = layer.weight
    if w.dim() == 2:
        mats = [w]
    else:
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        mats = [flat[:, :, i] for i in range(flat.shape[2])]
    return [m if m.shape[0] >= m.shape[1] else m.mT for m in mats]


def _storage_key(w: torch.Tensor) -> tuple:
    try:
        ptr = w.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return (id(w),)
    return (ptr, w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype, str(w.device))


# --------------------------------------------------------------------------- progress
class _Progress:
    """A one-line progress bar on stderr (no dependency): on only when stderr is a TTY and
    ``progress`` is not False; with progress=None it appears once the run passes 0.5 s."""

    def __init__(self, total: int, label: str, progress: bool | None, stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        self.enabled = progress is not False and tty and total > 0
        self.delay = 0.0 if progress else 0.5
        self.total, self.label, self.done = total, label, 0
        self.t0 = time.perf_counter()
        self.last = -1.0
        self.shown = False
        self.width = 0
        self.lock = threading.Lock()  # advanced from the CPU worker pool

    def advance(self, n: int = 1, label: str | None = None) -> None:
        with self.lock:
            self.done = min(self.total, self.done + n)
            if label is not None:
                self.label = label
            if self.enabled:
                self._draw()

    def _draw(self) -> None:
        now = time.perf_counter()
        if now - self.t0 < self.delay or (now - self.last < 0.1 and self.done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * self.done / self.total)
        text = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} {now - self.t0:5.1f}s")
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- spectra
def _numpy_blas_thread_setter():
    """NumPy's OpenBLAS ``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27: the thread count
    of the calling thread only), or None (another BLAS, or a platform without /proc)."""
    global _BLAS_SETTER
    if _BLAS_SETTER is not False:
        return _BLAS_SETTER
    _BLAS_SETTER = None
    try:
        import ctypes

        import numpy.linalg  # noqa: F401  (loads NumPy's BLAS/LAPACK)

        seen = set()
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(None, 1)[-1]
                if ("openblas" not in os.path.basename(path).lower() or path in seen
                        or "numpy" not in path):
                    continue
                seen.add(path)
                fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                    _BLAS_SETTER = fn
                    break
    except (OSError, AttributeError, ImportError):
        _BLAS_SETTER = None
    return _BLAS_SETTER


_BLAS_SETTER: Any = False


def _cpu_eigvals(m: torch.Tensor, gram_dtype: type, eig_dtype: type, threads: int) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of X^T X for one tall CPU matrix view X, with NumPy's
    BLAS/LAPACK limited to ``threads`` threads in this thread."""
    setter = _numpy_blas_thread_setter()
    prev = setter(threads) if setter is not None else None
    try:
        if m.dtype not in (torch.float32, torch.float64):
            m = m.to(torch.float32)  # NumPy has no bfloat16; float16 sums would overflow
        a = m.numpy()
        if a.dtype != gram_dtype:
            a = a.astype(gram_dtype)
        # a.T @ a on one buffer is a single SYRK in NumPy (half a GEMM's flops); torch runs a GEMM.
        G = a.T @ a
        if G.dtype != eig_dtype:
            G = G.astype(eig_dtype)
        # numpy.linalg.eigvalsh (LAPACK ?syevd) releases the GIL, unlike scipy.linalg's wrappers:
        # the pool in _cpu_spectra runs one matrix per core.
        ev = np.linalg.eigvalsh(G)
    finally:
        if setter is not None:
            setter(prev)
    return torch.from_numpy(ev.astype(np.float64))


def _cpu_spectra(items: list[tuple[int, torch.Tensor, type, type]], tick
                 ) -> list[torch.Tensor]:
    """Eigenvalues of every (key, X, gram dtype, eig dtype) item on the CPU, in item order.

    Workers: torch.get_num_threads() over the matrices, largest first, each LAPACK call with
    threads // workers BLAS threads. One matrix per core beats threaded LAPACK on one matrix at a
    time for the M ~ 10^3 matrices of a model (the tridiagonal reduction scales poorly across
    threads: 1.2x from 2 threads, measured), and single-threaded BLAS calls do not stall when
    another process holds a core (threaded ones wait at every synchronisation point: 2-10x and
    worse slowdowns seen on shared 2-core machines). Without NumPy's OpenBLAS thread setter: one
    matrix at a time with the BLAS default threads."""
    n_threads = max(1, torch.get_num_threads())
    setter = _numpy_blas_thread_setter()
    workers = min(n_threads, len(items)) if setter is not None else 1
    per = max(1, n_threads // workers)
    order = sorted(range(len(items)), key=lambda j: -items[j][1].numel())
    out: list[torch.Tensor | None] = [None] * len(items)

    def run(j: int) -> None:
        _, m, g, e = items[j]
        out[j] = _cpu_eigvals(m, g, e, per)
        tick(1)

    if workers == 1:
        for j in order:
            run(j)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            for fut in [pool.submit(run, j) for j in order]:
                fut.result()
    return out  # type: ignore[return-value]


def _group_torch(items: list[tuple[int, torch.Tensor]], gram_dtype: torch.dtype,
                 eig_dtype: torch.dtype, device: torch.device,
                 tick) -> dict[int, list[torch.Tensor]]:
    """One batched Gram product and one batched eigvalsh per chunk of same-shape matrices."""
    rows, cols = items[0][1].shape
    per = max(1, _CHUNK_BYTES // max(1, rows * cols * torch.finfo(gram_dtype).bits // 8))
    out: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(items), per):
        chunk = items[start:start + per]
        X = torch.stack([m.to(device=device, dtype=gram_dtype) for _, m in chunk])
        G = (X.mT @ X).to(eig_dtype)
        del X
        ev = torch.linalg.eigvalsh(G).to("cpu", torch.float64)
        for b, (key, _) in enumerate(chunk):
            out.setdefault(key, []).append(ev[b])
        tick(len(chunk))
    return out


def _spectra(layers: list[_Layer], idx: list[int], precision: str, device, tick) -> None:
    """Fill layer.evals (float64, ascending, all rf*M values, scaled) and layer.per_matrix
    for the layers in idx.

    On CUDA, matrices are grouped by shape and precision: one batched Gram product and one
    batched eigvalsh per memory-bounded chunk of each group. On the CPU every matrix is one task
    of a worker pool (``_cpu_spectra``): LAPACK has no batched CPU eigensolver, a batch is the
    same loop."""
    cuda_groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    cpu_items: list[tuple[int, torch.Tensor, type, type]] = []
    for i in idx:
        L = layers[i]
        dev = torch.device(device) if device is not None else L.weight.device
        if precision == "float32":
            gram_dtype, eig_dtype = torch.float32, torch.float32
        elif precision == "float64" or L.weight.dtype == torch.float64:
            gram_dtype, eig_dtype = torch.float64, torch.float64
        else:  # auto, float32/16-bit weights: float32 Gram, float64 eigensolver
            gram_dtype, eig_dtype = torch.float32, torch.float64
        L.route = ("float64" if gram_dtype == eig_dtype == torch.float64 else
                   "float32" if eig_dtype == torch.float32 else "float32 Gram, float64 eig")
        for m in _matrices(L):
            if dev.type == "cpu":
                cpu_items.append((i, m.to("cpu"), _NP[gram_dtype], _NP[eig_dtype]))
            else:
                key = (str(dev), gram_dtype, eig_dtype, tuple(m.shape))
                cuda_groups.setdefault(key, []).append((i, m))
    results: dict[int, list[torch.Tensor]] = {}
    for (key, *_), ev in zip(cpu_items, _cpu_spectra(cpu_items, tick)):
        results.setdefault(key, []).append(ev)
    for (dev, gram_dtype, eig_dtype, _), items in cuda_groups.items():
        got = _group_torch(items, gram_dtype, eig_dtype, torch.device(dev), tick)
        for key, evs in got.items():
            results.setdefault(key, []).extend(evs)
    for i, evs in results.items():
        per = torch.stack(evs).clamp_min(0.0) * layers[i].scale
        layers[i].per_matrix = per
        layers[i].evals = torch.sort(per.flatten()).values if len(evs) > 1 else per[0]


_NP = {torch.float32: np.float32, torch.float64: np.float64}


# --------------------------------------------------------------------------- power-law fit
def _small_n_fit(x: np.ndarray) -> dict:
    """WWFit's rule for fewer than 20 values (fit_powerlaw_smallN, lambda_prior = 0): tails of
    at least 8 values, alpha = 1 + (n - 1)/S, xmin minimising D - 0.868/sqrt(n)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n_all = x.size
    logs = np.log(x)
    best, best_j = None, math.inf
    for i in range(n_all - 1):
        n = n_all - i
        if n < _WW_SMALL_N_KMIN:
            continue
        s = float(np.sum(logs[i:]) - n * logs[i])
        if s <= 1e-12:
            continue
        alpha = 1.0 + (n - 1.0) / s
        if alpha <= 1.0:
            continue
        F = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        D = float(np.max(np.abs(np.arange(n) / n - F)))
        J = D - _WW_SMALL_N_PENALTY / math.sqrt(n)
        if J < best_j:
            best_j, best = J, (i, alpha, D, n)
    if best is None:
        if n_all == 0:
            return {}
        s = float(np.sum(logs) - n_all * logs[0])
        if s <= 1e-12:
            return {"xmin": float(x[0]), "alpha": 1.0, "D": 1.0, "sigma": 0.0}
        alpha = 1.0 + (n_all - 1.0) / s
        F = 1.0 - (x / x[0]) ** (1.0 - alpha)
        D = float(np.max(np.abs(np.arange(n_all) / n_all - F)))
        best = (0, alpha, D, n_all)
    i, alpha, D, n = best
    return {"xmin": float(x[i]), "alpha": alpha, "D": D, "sigma": (alpha - 1.0) / math.sqrt(n)}


def _fit_layers(layers: list[_Layer], idx: list[int], thresh: float) -> None:
    """Fit every layer in idx: one batched fit_power_law call for the layers with >= 20 values
    above thresh, WWFit's small-sample rule for the others."""
    from .power_law import fit_power_law

    big, big_vals = [], []
    for i in idx:
        layer = layers[i]
        v = layer.evals[layer.evals > thresh]
        layer.fit = {}
        if v.numel() >= _WW_SMALL_N:
            big.append(i)
            big_vals.append(v)
        elif v.numel() > 0:
            layer.fit = _small_n_fit(v.numpy())
            if layer.fit:
                layer.fit["rule"] = "small-N"
    if big:
        fits = fit_power_law(big_vals, nonpositive="error")
        for i, v, f in zip(big, big_vals, fits):
            D = float(f.D)
            if math.isnan(D) or D > _TWO_POINT_D:
                # WWFit's extra candidate (the second-largest value, a 2-point tail) wins.
                top = torch.sort(v).values[-2:].tolist()
                if top[1] > top[0]:
                    alpha = 1.0 + 2.0 / math.log(top[1] / top[0])
                    layers[i].fit = {"xmin": top[0], "alpha": alpha, "D": _TWO_POINT_D,
                                     "sigma": (alpha - 1.0) / math.sqrt(2.0), "rule": "2-point"}
                    continue
            if math.isnan(float(f.alpha)):
                continue
            layers[i].fit = {"xmin": float(f.xmin), "alpha": float(f.alpha), "D": D,
                             "sigma": float(f.sigma), "rule": "CSN"}


# --------------------------------------------------------------------------- metrics
def _metrics(layer: _Layer) -> dict[str, Any]:
    from .spectrum_metrics import marchenko_pastur_fit, spectral_metrics

    lam = layer.evals.numpy()
    lmax = float(lam[-1])
    total = float(lam.sum())
    N, M, rf = layer.N, layer.M, layer.rf
    # A pooled conv layer's values are the singular values of the block-diagonal matrix of its
    # rf slices, (rf N) x (rf M): its metrics are those of that matrix (rf = 1: W itself).
    sm = spectral_metrics(layer.evals, (rf * N, rf * M), values_are="squared",
                          dtype=torch.float64)
    # Marchenko-Pastur per slice (the slices are the random matrices), Gavish-Donoho noise level
    # and Tracy-Widom 0.99 margin (spectrum_metrics.marchenko_pastur_fit); edge in lambda units.
    mp = marchenko_pastur_fit(layer.per_matrix, (N, M), values_are="squared")
    s = np.sqrt(lam)
    out: dict[str, Any] = {
        "lambda_max": lmax,
        "spectral_norm": float(sm.spectral_norm),
        "log_spectral_norm": math.log10(lmax) if lmax > 0 else -math.inf,
        "frobenius_norm": float(sm.frobenius_norm),
        "log_norm": math.log10(total) if total > 0 else -math.inf,
        "stable_rank": total / lmax if lmax > 0 else math.nan,
        "nuclear_norm": float(sm.nuclear_norm),
        "effective_rank": float(sm.effective_rank),
        "condition_number": float(sm.condition_number),
        # WeightWatcher's matrix_rank: s > s_max N eps(float64), N of one matrix.
        "matrix_rank": int(np.count_nonzero(s > s[-1] * N * np.finfo(np.float64).eps)),
    }
    if total > 0:
        p = lam[lam > 0] / total
        rank = max(out["matrix_rank"], 2)
        out["entropy"] = float(-np.sum(p * np.log(p)) / math.log(rank))
    else:
        out["entropy"] = math.nan
    out["mp_bulk_edge"] = float(mp.bulk_edge.max()) * N
    out["mp_spikes"] = int(mp.num_spikes.sum())
    alpha = layer.fit.get("alpha") if layer.fit else None
    if alpha is not None and math.isfinite(alpha) and lmax > 0:
        out["alpha_weighted"] = alpha * math.log10(lmax)
        with np.errstate(over="ignore"):
            lan = float(np.sum(lam ** alpha))
        out["log_alpha_norm"] = math.log10(lan) if lan > 0 else -math.inf
    else:
        out["alpha_weighted"] = math.nan
        out["log_alpha_norm"] = math.nan
    return out


def _row(layer: _Layer, thresh: float) -> dict[str, Any]:
    f = layer.fit
    row: dict[str, Any] = {
        "name": layer.name, "kind": layer.kind, "shape": tuple(int(d) for d in layer.weight.shape),
        "N": layer.N, "M": layer.M, "rf": layer.rf, "num_evals": int(layer.evals.numel()),
    }
    if f:
        alpha = f["alpha"]
        row.update({
            "alpha": alpha, "xmin": f["xmin"], "xmax": float(layer.evals[-1]), "D": f["D"],
            "sigma": f["sigma"], "n_tail": int((layer.evals >= f["xmin"]).sum()),
            "status": "success",
            "warning": ("over-trained" if alpha < _OVER_TRAINED else
                        "under-trained" if alpha > _UNDER_TRAINED else ""),
            "fit_rule": f.get("rule", ""),
        })
    else:
        n_fit = int((layer.evals > thresh).sum())
        row.update({"alpha": math.nan, "xmin": math.nan, "xmax": float(layer.evals[-1]),
                    "D": math.nan, "sigma": math.nan, "n_tail": 0,
                    "status": f"failed: {n_fit} eigenvalues > {thresh:g} (too few distinct)",
                    "warning": "", "fit_rule": ""})
    row.update(_metrics(layer))
    row["precision"] = layer.route
    return row


# --------------------------------------------------------------------------- analyze
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


# --------------------------------------------------------------------------- output
def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if spec:
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            return str(value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    """Aligned text table of ``analyze`` rows. columns: (key, header, format spec) triples
    (default ``DEFAULT_COLUMNS``); text columns left-aligned, numbers right-aligned; missing
    or NaN values print as '-', shapes as 768x3072."""
    cols = list(DEFAULT_COLUMNS if columns is None else columns)
    cells = [[h for _, h, _ in cols]]
    numeric = [True] * len(cols)
    for row in rows:
        line = []
        for j, (key, _, spec) in enumerate(cols):
            v = row.get(key)
            if isinstance(v, (str, tuple)):
                numeric[j] = False
            line.append(_cell(v, spec))
        cells.append(line)
    widths = [max(len(c[j]) for c in cells) for j in range(len(cols))]
    lines = []
    for r, line in enumerate(cells):
        parts = [s.rjust(w) if numeric[j] else s.ljust(w)
                 for j, (s, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
        if r == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def format_rows(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """``analyze`` rows as text: 'table' (``format_table``), 'json' (a list of objects; NaN as
    null, infinities as "inf"/"-inf") or 'csv' (every key a column; shapes as 768x3072)."""
    if fmt == "table":
        return format_table(rows)
    if fmt == "json":
        import json

        return json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows], indent=1) + "\n"
    if fmt == "csv":
        import csv
        import io

        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, tuple) else v)
                             for k, v in r.items()})
        return buf.getvalue()
    raise ValueError(f"fmt: expected 'table', 'json' or 'csv', got fmt={fmt!r}")


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``analyze`` rows to a .json or .csv file (``format_rows``), chosen by the suffix."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("json", "csv"):
        raise ValueError(f"unsupported output file type {p.suffix!r} for {str(path)!r}: expected "
                         f".json or .csv")
    p.write_text(format_rows(rows, fmt))
    return p

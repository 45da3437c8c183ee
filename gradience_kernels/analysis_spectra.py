"""Eigenvalues of W^T W for every matrix of ``analysis.analyze``: a pool of single-threaded
LAPACK calls on the CPU, batched Gram products and eigvalsh per same-shape chunk on CUDA."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .analysis_layers import _Layer, _matrices

_CHUNK_BYTES = 256 << 20   # one batched spectrum computation holds at most this much input


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

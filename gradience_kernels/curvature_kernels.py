"""The multi-tensor inner steps of the curvature estimators, over lists of parameter-shaped
tensors (see curvature_operators.py for the vector convention).

These are the only places where estimators touch P-sized data outside the matvecs:
- ``rademacher`` / ``gaussian``: probe batches from a counter-based hash of (seed, probe index,
  entry index), so probe j is the same whatever the batch split, device or backend;
- ``rademacher_dots`` / ``gaussian_dots``: per-block <z_r, y_r> of a batch Y with the probes
  z_r regenerated on the fly (Hutchinson's z^T A z without reading z back);
- ``block_gram`` / ``block_dots``: per-block inner products X_b^T Y_b of two batches;
- ``orthogonalize_``: classical Gram-Schmidt, twice (CGS2), of a vector against a basis stored
  tensor by tensor (possibly in a lower precision);
- ``reorthogonalize_``: a Lanczos product's whole reorthogonalization (local pass, full pass,
  Kahan's second pass, norm, next basis row) in one call;
- ``combine``: basis^T coefficients (Ritz vectors).

Backends (argument ``backend``, default ``"auto"``, or ``use_backend`` for a whole block of
code): ``"cpp"``, the C++ CPU ops ``gradience::fill_probes``, ``probe_dots``, ``block_dots``,
``block_gram``, ``orthogonalize`` and ``reorthogonalize`` (csrc/curvature/: one call over the
whole list, probes hashed in vectorized tiles and consumed in cache, basis rows swept 4 at a
time; ``combine`` takes the torch path); ``"torch"``, per-tensor BLAS calls and NumPy uint32
hashing (no Python loop over entries, no concatenation: the reference the other backends are
tested against); ``"triton"``, the kernels of gradience_kernels/triton/curvature_kernels.py
registered as ``gradience_triton::`` custom ops with fake kernels (compiled on CUDA, under
TRITON_INTERPRET=1 on CPU for tests); ``"auto"``, Triton for CUDA tensors and cpp otherwise.
On the bench's three models (bench/bench_curvature_kernels.py, 2-core AMD EPYC VM, e753efa) the
cpp path measured 6.1-8.0x faster than torch for Rademacher probes, 5.2-7.4x for Gaussian
probes, 6.4-9.4x for probe dots and 1.5-2.5x for block dots, and 1.4-2.0x (block_gram),
1.7-1.9x (orthogonalize) and 1.7-2.9x (reorthogonalize) faster than per-tensor BLAS.

Multi-tensor design of the Triton path: ONE launch per step over a chunk table (an int64
[n_chunks, 8] tensor of base addresses, row lengths and entry ranges; the kernels cast the
addresses to typed pointers, which works compiled and under the interpreter). A launch per
tensor would be simpler, but a transformer has hundreds of parameter tensors, mostly small
(biases, norms), and a Triton launch costs ~20-40 us of host time, so CGS2 would pay
3 x n_tensors launches per Lanczos step; with the table it pays 3 (plus one small host-to-device
copy of the table). Cross-program reductions are deterministic: per-chunk partial rows, then a
fixed-order segment sum (bitwise reproducible; no float atomics).

Accumulation: float64 for float64 data, float32 otherwise (bfloat16/float16 storage included).

Layout: this module holds the public functions and the backend choice; the probe hash is in
curvature_probe_hash, the argument checks in curvature_kernel_checks, the torch path in
curvature_kernels_torch, the Triton custom ops and every fake kernel in curvature_kernel_ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from . import curvature_kernel_ops as _ops  # noqa: F401  registers the ops and fake kernels
from .curvature_kernel_checks import (_check_basis, _check_blocks, _check_coeffs,
                                      _check_float_dtype, _check_list, _check_offset,
                                      _check_pair, _check_probe_args, _index, _real,
                                      _row_len)
from .curvature_kernel_ops import _flat_blocks
from .curvature_kernels_torch import (_torch_block_dots, _torch_block_gram, _torch_combine,
                                      _torch_orthogonalize_, _torch_probe_dots, _torch_probes)
from .curvature_probe_hash import _MASK32

__all__ = ["rademacher", "gaussian", "rademacher_dots", "gaussian_dots", "block_gram",
           "block_dots", "orthogonalize_", "reorthogonalize_", "combine", "use_backend"]

_BACKENDS = ("auto", "torch", "cpp", "triton")
_default_backend = "auto"


def _pick(backend: str | None, device: torch.device) -> str:
    backend = _default_backend if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpp"
    return backend


def _cpp_device(device: torch.device) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got device {device} (use 'auto' "
                         "or 'triton' for CUDA tensors)")


@contextlib.contextmanager
def use_backend(backend: str):
    """Default backend of every function here inside the block (``"auto"``, ``"torch"``,
    ``"cpp"`` or ``"triton"``; an explicit ``backend=`` argument wins). For tests: ``"triton"`` runs whole
    estimators through the Triton kernels, under TRITON_INTERPRET=1 on CPU."""
    global _default_backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    before, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = before


# ------------------------------------------------------------------------------- public API
def _probes(shapes, batch, seed, first, dtype, device, backend, gaussian, offset):
    sizes, batch, seed, first, offset = _check_probe_args(shapes, batch, seed, first, dtype,
                                                          offset)
    device = torch.device(device)
    path = _pick(backend, device)
    if path == "torch":
        return _torch_probes(sizes, batch, seed, first, dtype, device, gaussian, offset)
    if path == "cpp":
        # Generated on the CPU (as the torch path) and moved if another device was asked for.
        out = [torch.empty(batch, *s, dtype=dtype) for s in sizes]
        torch.ops.gradience.fill_probes(out, seed, first, gaussian, offset)
        return [t.to(device) for t in out]
    out = [torch.empty(batch, *s, dtype=dtype, device=device) for s in sizes]
    torch.ops.gradience_triton.fill_probes(out, seed, first, gaussian, offset)
    return out


def rademacher(shapes: Sequence[torch.Size], batch: int, seed: int, first: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               backend: str | None = None, offset: int = 0) -> list[torch.Tensor]:
    """Probes first .. first+batch-1 of stream `seed`: +-1 entries, list of [batch, *shape].

    Entry i of probe j (entries numbered across the list in order, starting at `offset`: a
    shard of a larger vector passes its first global index) is the sign of the top bit of a
    counter-based hash h(seed mod 2^32, j mod 2^32, i) (MurmurHash3's 32-bit finalizer applied
    twice; counter-based generation as in Salmon et al. 2011, "Parallel random numbers: as easy
    as 1, 2, 3"): probe j is bitwise the same whatever the batch split, device or backend. A
    stream thus holds 2^32 distinct probes (probe j + 2^32 is probe j again), far beyond any
    estimator's budget; entries i go to 2^63."""
    return _probes(shapes, batch, seed, first, dtype, device, backend, False, offset)


def gaussian(shapes: Sequence[torch.Size], batch: int, seed: int, first: int = 0,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             backend: str | None = None, offset: int = 0) -> list[torch.Tensor]:
    """Standard normal probes, list of [batch, *shape]: Box-Muller (Box & Muller 1958) on
    pairs of global entries, z_2k = r cos(2 pi u2) and z_2k+1 = r sin(2 pi u2) with
    r = sqrt(-2 ln u1), in float64 on u = (h + 1/2) 2^-32 of the hashes of indices 2k and
    2k+1 (two independent normals per pair of hashes). Backends agree to rounding: the
    transcendental functions of the paths differ by a few float64 ulps, then one rounding to
    `dtype`."""
    return _probes(shapes, batch, seed, first, dtype, device, backend, True, offset)


def _probe_dots_api(Y, blocks, seed, first, backend, gaussian, offset) -> torch.Tensor:
    _check_list(Y, "Y", batched=True)
    blocks = _check_blocks(blocks, len(Y))
    seed = _index(seed, "seed", lo=None) & _MASK32
    first = _index(first, "first")
    if first + Y[0].shape[0] >= 1 << 63:
        raise ValueError(f"first: probe indices first + batch = {first + Y[0].shape[0]} exceed "
                         "2^63")
    offset = _check_offset(offset, sum(_row_len(y) for y in Y))
    path = _pick(backend, Y[0].device)
    if path == "torch":
        return _torch_probe_dots(Y, blocks, seed, first, gaussian, offset)
    members, sizes = _flat_blocks(blocks)
    if path == "cpp":
        _cpp_device(Y[0].device)
        return torch.ops.gradience.probe_dots(list(Y), members, sizes, seed, first, gaussian,
                                              offset)
    return torch.ops.gradience_triton.probe_dots(list(Y), members, sizes, seed, first, gaussian,
                                                 offset)


def rademacher_dots(Y: Sequence[torch.Tensor], blocks: Sequence[Sequence[int]], seed: int,
                    first: int = 0, backend: str | None = None, offset: int = 0) -> torch.Tensor:
    """D[j, r] = sum over the tensors t of block j of <z_r, Y_t[r]> for the Rademacher probes
    z_r = probe first + r of stream `seed` (as ``rademacher`` with Y's shapes): [n_blocks, b].

    Hutchinson's estimator tr(A_jj) ~ mean_r z_r^T (A z_r)_j (Hutchinson 1989) with Y = A Z:
    the probes are regenerated from the hash instead of read back (one pass over Y only)."""
    return _probe_dots_api(Y, blocks, seed, first, backend, False, offset)


def gaussian_dots(Y: Sequence[torch.Tensor], blocks: Sequence[Sequence[int]], seed: int,
                  first: int = 0, backend: str | None = None, offset: int = 0) -> torch.Tensor:
    """As ``rademacher_dots`` for the Gaussian probes of ``gaussian``."""
    return _probe_dots_api(Y, blocks, seed, first, backend, True, offset)


def block_gram(X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor],
               blocks: Sequence[Sequence[int]], backend: str | None = None) -> torch.Tensor:
    """G[j] = sum over the tensors t of block j of X_t Y_t^T: [n_blocks, a, c] for batches X
    (list of [a, *shape]) and Y (list of [c, *shape]); float64 when X or Y is float64, else
    float32."""
    _check_pair(X, Y, "X", "Y", same_batch=False)
    blocks = _check_blocks(blocks, len(X))
    path = _pick(backend, X[0].device)
    if path == "torch":
        return _torch_block_gram(X, Y, blocks)
    members, sizes = _flat_blocks(blocks)
    if path == "cpp":
        _cpp_device(X[0].device)
        return torch.ops.gradience.block_gram(list(X), list(Y), members, sizes)
    return torch.ops.gradience_triton.block_gram(list(X), list(Y), members, sizes)


def block_dots(X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor],
               blocks: Sequence[Sequence[int]], backend: str | None = None) -> torch.Tensor:
    """D[j, r] = sum over the tensors t of block j of <X_t[r], Y_t[r]>: [n_blocks, b]."""
    _check_pair(X, Y, "X", "Y", same_batch=True)
    return _block_dots_run(X, Y, _check_blocks(blocks, len(X)), backend)


# The _run functions are the public ones without their Python argument checks, for the
# estimators' inner loops: their lists are the operator's own products and the rows the
# estimator allocated with the operator's shapes, and a check of 31 tensors' dtypes, devices
# and shapes measured 0.1 ms a call, as long as the kernel itself on a 100k-parameter
# transformer's vector. The C++ glue and the Triton launchers still check what they index.
def _block_dots_run(X, Y, blocks, backend: str | None = None) -> torch.Tensor:
    path = _pick(backend, X[0].device)
    if path == "torch":
        return _torch_block_dots(X, Y, blocks)
    members, sizes = _flat_blocks(blocks)
    if path == "cpp":
        _cpp_device(X[0].device)
        return torch.ops.gradience.block_dots(list(X), list(Y), members, sizes)
    return torch.ops.gradience_triton.block_dots(list(X), list(Y), members, sizes)


def orthogonalize_(w: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], count: int,
                   passes: int = 2, backend: str | None = None) -> torch.Tensor:
    """w <- (I - Q Q^T)^passes w in place, Q = the first `count` rows of the basis (list of
    [m_max, *shape], any float dtype: float64, float32 or bfloat16 storage); returns the summed
    coefficients Q^T w [count] (float64 for float64 w, else float32 accumulation).

    Classical Gram-Schmidt applied twice (CGS2): with Q orthonormal to working precision u, two
    passes leave ||Q^T w|| = O(u) ||w|| ("twice is enough": Giraud, Langou, Rozloznik & van den
    Eshof 2005; Parlett 1998 sec. 6.9). A basis stored with unit roundoff u_Q (bfloat16:
    2^-8) is a perturbed Q~ = Q + E, |E| <= u_Q |Q|; the passes make w orthogonal to Q~, so
    ||Q^T w|| is O(u_Q) ||w|| instead (measured in python_tests/test_curvature_kernels.py)."""
    count = _check_basis(w, basis, count)
    passes = _index(passes, "passes", lo=1)
    return _orthogonalize_run(w, basis, count, passes, backend)


def _orthogonalize_run(w, basis, count: int, passes: int,
                       backend: str | None = None) -> torch.Tensor:
    # 'auto' on CPU takes the C++ op: 4 basis rows per sweep of a 32K-entry chunk, one call for
    # the whole list; measured 0.73-0.94x the time of the torch path's BLAS gemv + addmv on an
    # MLP's 8 tensors and 0.39-0.67x on a transformer's 31 (count 8-60, 2 threads).
    path = _pick(backend, w[0].device)
    if path == "torch":
        return _torch_orthogonalize_(w, basis, count, passes)
    if path == "cpp":
        _cpp_device(w[0].device)
        return torch.ops.gradience.orthogonalize(list(w), list(basis), count, passes)
    return torch.ops.gradience_triton.orthogonalize(list(w), list(basis), count, passes)


def reorthogonalize_(w: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], count: int,
                     lo: int, ratio: float = 0.5, out_row: int | None = None,
                     min_norm: float = 0.0, backend: str | None = None) -> tuple[torch.Tensor,
                                                                                 float]:
    """The reorthogonalization of one Lanczos product w = A q_j in place against the basis
    rows 0..count-1, in one call: a classical Gram-Schmidt pass against rows lo..count-1 (the
    three-term recurrence's q_{j-1}, q_j, which hold w's large components), a full pass against
    rows 0..count-1, and a second full pass only when the first left
    ||w||^2 < ratio^2 (||w||^2 + ||c||^2), i.e. removed more than 1 - ratio of the norm
    (Kahan's test, "twice is enough": Parlett 1998 sec. 6.9). Then, when out_row is given and
    ||w|| > min_norm, basis row out_row = w / ||w|| (rounded to the basis' dtype). lo = count
    skips the local pass (partial reorthogonalization orthogonalizes against its two local
    rows by passing them as the whole basis: full passes with Kahan's test, one sweep fewer).

    Returns (coefficients Q^T w on rows 0..count-1 summed over the passes, float64 [count] on
    the host; ||w||^2 after, a float). On CPU the C++ op fuses the local pass's update with the
    full pass's dots and each full update with the norm: 3 sweeps over w where separate calls
    take 5, and one call instead of 3; with lo = count the first full update also takes the
    second pass's dots, which Kahan's test then nearly always asks for (the torch and Triton
    paths compose orthogonalize_)."""
    count = _check_basis(w, basis, count)
    lo = _index(lo, "lo")
    if lo > count:
        raise ValueError(f"lo: expected 0 <= lo <= count = {count}, got {lo}")
    ratio = _real(ratio, "ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a value in [0, 1], got {ratio}")
    m_max = basis[0].shape[0]
    if out_row is not None:
        out_row = _index(out_row, "out_row")
        if not count <= out_row < m_max:
            raise ValueError(f"out_row: expected a row in [count, m_max) = [{count}, {m_max}), "
                             f"got {out_row}")
    min_norm = _real(min_norm, "min_norm")
    if not min_norm >= 0.0:
        raise ValueError(f"min_norm: expected a value >= 0, got {min_norm}")
    return _reorthogonalize_run(w, basis, count, lo, ratio, out_row, min_norm, backend)


def _reorthogonalize_run(w, basis, count: int, lo: int, ratio: float, out_row: int | None,
                         min_norm: float, backend: str | None = None) -> tuple[torch.Tensor,
                                                                               float]:
    path = _pick(backend, w[0].device)
    if path == "cpp":
        _cpp_device(w[0].device)
        total, norm2 = torch.ops.gradience.reorthogonalize(
            list(w), list(basis), count, lo, ratio, -1 if out_row is None else out_row,
            min_norm)
        return total, float(norm2)
    total = torch.zeros(count, dtype=torch.float64)
    if lo < count:
        total[lo:] += _orthogonalize_run(w, [b[lo:] for b in basis], count - lo, 1,
                                         backend).double().cpu()
    wb = [t.unsqueeze(0) for t in w]
    everything = [list(range(len(w)))]
    for p in range(2):
        c = _orthogonalize_run(w, basis, count, 1, backend).double().cpu()
        total += c
        after = float(_block_dots_run(wb, wb, everything, backend)[0, 0])
        if p == 1 or after >= ratio * ratio * (after + float(c @ c)):
            break
    if out_row is not None and after > 0.0 and math.sqrt(after) > min_norm:
        scale = 1.0 / math.sqrt(after)
        for b, t in zip(basis, w):
            if b.dtype == t.dtype:
                torch.mul(t, scale, out=b[out_row])
            else:
                b[out_row].copy_(t * scale)  # rounded once to the basis' storage dtype
    return total, after


def combine(basis: Sequence[torch.Tensor], count: int, coeffs: torch.Tensor,
            dtype: torch.dtype | None = None, backend: str | None = None) -> list[torch.Tensor]:
    """basis^T coeffs: list of [r, *shape] (out_t[j] = sum_m coeffs[m, j] basis_t[m]) for
    coeffs [count, r], in `dtype` (default: the basis' dtype)."""
    count = _check_basis(None, basis, count)
    _check_coeffs(coeffs, count, basis[0].device)
    dtype = basis[0].dtype if dtype is None else dtype
    _check_float_dtype(dtype, "dtype")
    if _pick(backend, basis[0].device) in ("torch", "cpp"):  # BLAS-3 shaped: the torch path
        return _torch_combine(basis, count, coeffs, dtype)
    return torch.ops.gradience_triton.combine(list(basis), count, coeffs, dtype)

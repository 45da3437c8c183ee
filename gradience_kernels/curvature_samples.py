"""Sample-space curvature: n x n Gram matrices of per-sample gradients and Jacobians.

For N samples and P parameters, the P x P matrices J^T J (Gauss-Newton / NTK side) and
G^T G / N (empirical Fisher) share their nonzero eigenvalues with the N x N Grams J J^T and
G G^T / N, which are cheap when N << P. Nothing here forms a P x P matrix: rows (per-sample
gradients or Jacobians) are computed with ``torch.func.vmap`` in chunks of samples and
multiplied tensor by tensor (``curvature_kernels.block_gram``).

- ``per_sample_gradients``: g_i = grad of loss_fn(model(x_i[None]), y_i[None]), [N, *shape].
- ``ntk_gram``: the empirical neural tangent kernel K_ij = sum_c <J_ic, J_jc> (Jacot, Gabriel
  & Hongler 2018; Novak et al. 2022, "Fast finite width neural tangent kernel"): the trace
  over the C output components of the per-sample output Jacobians, or one component.
- ``gradient_gram``: G G^T of the per-sample loss gradients.
- ``gram_eigenvalues`` / ``gram_logdet``: float64 spectra and log-determinants of a Gram.
- ``fisher_trace``: tr(F) = (1/N) sum_i ||g_i||^2 exactly, per block too, in one streaming
  pass (no N x P storage); ``fisher_eigs``: the top-k eigenvalues of F from G G^T / N.

Conventions (batch, params, SDPA math kernel): curvature_model_problem.py.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.func as tfunc
from torch import nn

from .curvature_kernels import block_dots, block_gram
from .curvature_model_problem import (BlockSpec, ModelProblem, ParamSelection, _describe,
                                      check_chunk_size, default_chunk, math_sdpa,
                                      per_sample_gradient_chunks)

__all__ = ["per_sample_gradients", "ntk_gram", "gradient_gram", "gram_eigenvalues",
           "gram_logdet", "fisher_trace", "fisher_eigs", "FisherTrace"]


def _problem(model, loss_fn, batch, params, blocks="module") -> ModelProblem:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch: expected a pair (inputs, targets), got {_describe(batch)}")
    return ModelProblem(model, loss_fn, batch, params, blocks, inputs=batch[0], per_sample=True)


def per_sample_gradients(model: nn.Module, loss_fn: Callable, batch,
                         params: ParamSelection = None,
                         chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample loss gradients: a list (one per selected parameter, named_parameters order)
    of [N, *shape] tensors, row i = d loss_fn(model(x_i[None]), y_i[None]) / d theta.

    ``torch.func.vmap(torch.func.grad(...))`` over the samples, `chunk_size` samples per call
    (default: one chunk's gradients under 256 MiB); SDPA runs on its math kernel. Arguments
    as ``curvature_operators.hessian``."""
    check_chunk_size(chunk_size)
    p = _problem(model, loss_fn, batch, params)
    out = [torch.empty(p.num_samples, *s, dtype=p.dtype, device=p.device) for s in p.shapes]
    for start, stop, g in per_sample_gradient_chunks(p, chunk_size):
        for dst, src in zip(out, g):
            dst[start:stop] = src
    return out


def _chunked_gram(rows: Callable[[int, int], list[torch.Tensor]], n: int, chunk: int,
                  keep: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """K = R R^T [n, n] for rows R (list of [m, ...] per tensor) produced chunk by chunk by
    rows(start, stop). keep: hold every chunk (memory n x row size, each row computed once);
    otherwise hold two chunks and recompute chunk j for every i < j (memory 2 chunks)."""
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    cache: dict[int, list[torch.Tensor]] = {}

    def get(k):
        if k in cache:
            return cache[k]
        r = [t.reshape(t.shape[0], -1) for t in rows(*spans[k])]
        if keep:
            cache[k] = r
        return r
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    K = torch.empty(n, n, dtype=acc, device=device)
    for i, (a0, a1) in enumerate(spans):
        Ri = get(i)
        everything = [list(range(len(Ri)))]
        K[a0:a1, a0:a1] = block_gram(Ri, Ri, everything)[0]
        for j in range(i + 1, len(spans)):
            b0, b1 = spans[j]
            Kij = block_gram(Ri, get(j), everything)[0]
            K[a0:a1, b0:b1] = Kij
            K[b0:b1, a0:a1] = Kij.T
    # Exactly symmetric (the diagonal blocks are, up to the matmul's rounding order).
    return ((K + K.T) / 2).to(dtype)


def _keep(n: int, row_numel: int, itemsize: int, budget_bytes: int = 1 << 30) -> bool:
    # Holding every row costs n x row_numel; under 1 GiB computing each row once is cheaper
    # than the quadratic recomputation of the two-chunk scheme.
    return n * row_numel * itemsize <= budget_bytes


def gradient_gram(model: nn.Module, loss_fn: Callable, batch, params: ParamSelection = None,
                  chunk_size: int | None = None) -> torch.Tensor:
    """G G^T [N, N] of the per-sample loss gradients g_i (``per_sample_gradients``), in the
    parameters' dtype (accumulated in float32 at least). Divide by N for the Gram of the
    empirical Fisher F = G^T G / N, whose nonzero eigenvalues it shares."""
    check_chunk_size(chunk_size)
    p = _problem(model, loss_fn, batch, params)
    return _gradient_gram(p, chunk_size)


def _gradient_gram(p: ModelProblem, chunk_size: int | None) -> torch.Tensor:
    n, numel = p.num_samples, sum(s.numel() for s in p.shapes)
    itemsize = torch.empty(0, dtype=p.dtype).element_size()
    chunk = chunk_size or default_chunk(n, numel, itemsize)

    def rows(start, stop):
        return next(per_sample_gradient_chunks(p, stop - start, start, stop))[2]
    return _chunked_gram(rows, n, chunk, _keep(n, numel, itemsize), p.dtype, p.device)


def ntk_gram(model: nn.Module, inputs, params: ParamSelection = None,
             chunk_size: int | None = None, output_index: int | None = None) -> torch.Tensor:
    """The empirical NTK Gram K [N, N], K_ij = sum_c <d f_c(x_i)/d theta, d f_c(x_j)/d theta>
    over the C components of the flattened per-sample output f(x_i) (the trace NTK), or only
    the component c = `output_index` (one backward per sample instead of C).

    Per-sample Jacobians by ``vmap(jacrev)`` in chunks of `chunk_size` samples; K from
    tensor-by-tensor products (the P x P matrix J^T J is never formed). Memory: the Jacobian
    rows, N x C x P, when under 1 GiB (each computed once), else two chunks at a time with
    chunks recomputed. The model output must be a tensor [N, ...]; inputs: a tensor or a
    tuple of tensors, sliced along dim 0.
    """
    check_chunk_size(chunk_size)
    if output_index is not None and (isinstance(output_index, bool)
                                     or not isinstance(output_index, int)):
        raise TypeError(f"output_index: expected None or an int, got {_describe(output_index)}")
    p = ModelProblem(model, None, None, params, "all", inputs=inputs, per_sample=True)
    n = p.num_samples
    with math_sdpa(), torch.no_grad():
        out0 = p.call(p.primals, tuple(x[:1] for x in p.inputs))
    if not torch.is_tensor(out0) or out0.dim() == 0 or out0.shape[0] != 1:
        raise ValueError(f"model: ntk_gram needs an output tensor [N, ...], got "
                         f"{_describe(out0)} for one sample")
    C = out0[0].numel()
    if output_index is not None and not -C <= output_index < C:
        raise ValueError(f"output_index: {output_index} is out of range for a per-sample output "
                         f"of {C} components")
    comps = 1 if output_index is not None else C

    def f(params, xs):
        out = p.call(params, tuple(x.unsqueeze(0) for x in xs)).reshape(-1)
        return out if output_index is None else out[output_index]
    jac = tfunc.vmap(tfunc.jacrev(f), in_dims=(None, 0))
    numel = sum(s.numel() for s in p.shapes)
    itemsize = torch.empty(0, dtype=p.dtype).element_size()
    chunk = chunk_size or default_chunk(n, comps * numel, itemsize)

    def rows(start, stop):
        with math_sdpa():
            J = jac(p.primals, tuple(x[start:stop] for x in p.inputs))
        return [J[k].detach() for k in p.names]
    return _chunked_gram(rows, n, chunk, _keep(n, comps * numel, itemsize), p.dtype, p.device)


def _check_gram(gram) -> torch.Tensor:
    if not torch.is_tensor(gram):
        raise TypeError(f"gram: expected a tensor, got {_describe(gram)}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram: expected a non-empty square matrix, got shape "
                         f"{list(gram.shape)}")
    if not gram.is_floating_point():
        raise TypeError(f"gram: expected a float dtype, got {gram.dtype}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram: has non-finite entries")
    g = gram.detach().to(torch.float64)
    return (g + g.T) / 2


def gram_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric Gram, descending, float64 (``torch.linalg.eigvalsh`` of the
    float64 symmetrized matrix)."""
    return torch.linalg.eigvalsh(_check_gram(gram)).flip(0)


def gram_logdet(gram: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
    """log det(K + jitter I), float64 0-d tensor, from the eigenvalues of the float64
    symmetrized K.

    Raises ValueError when the smallest eigenvalue of K + jitter I is <= n eps ||K||_2 (eps
    of the Gram's dtype): below that an eigenvalue cannot be told from 0 (Weyl's bound on the
    rounding of the Gram's entries), and the log-determinant would be noise or -inf. Pass a
    jitter > 0 (absolute, added to the diagonal) for a numerically singular Gram, e.g. N >
    rank when N exceeds the parameter count."""
    if isinstance(jitter, torch.Tensor) and jitter.numel() == 1 and \
            not jitter.dtype.is_complex and jitter.dtype != torch.bool:
        jitter = jitter.item()
    if isinstance(jitter, (bool, np.bool_)) or not isinstance(jitter, numbers.Real):
        raise TypeError(f"jitter: expected a finite float >= 0, got {_describe(jitter)}")
    jitter = float(jitter)
    if not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"jitter: expected a finite float >= 0, got {jitter!r}")
    lam = gram_eigenvalues(gram) + jitter
    n = lam.shape[0]
    tol = n * torch.finfo(gram.dtype).eps * float(lam.abs().max())
    if float(lam[-1]) < -tol:
        raise ValueError(f"gram: not positive semi-definite (smallest eigenvalue "
                         f"{float(lam[-1]):.3e} < -n eps ||K|| = {-tol:.3e} with jitter "
                         f"{jitter}): not a Gram matrix J J^T")
    if float(lam[-1]) <= tol:
        raise ValueError(f"gram: singular to working precision (smallest eigenvalue "
                         f"{float(lam[-1]):.3e} <= n eps ||K|| = {tol:.3e} with jitter "
                         f"{jitter}); pass a larger jitter")
    return torch.log(lam).sum()


@dataclass
class FisherTrace:
    """tr(F) of the empirical Fisher, exact: (1/N) sum_i ||g_i||^2, and per block."""

    trace: torch.Tensor
    block_traces: dict[str, torch.Tensor]
    num_samples: int

    def __float__(self) -> float:
        return float(self.trace)


def fisher_trace(model: nn.Module, loss_fn: Callable, batch, params: ParamSelection = None,
                 blocks: BlockSpec = "module", chunk_size: int | None = None) -> FisherTrace:
    """tr(F) = (1/N) sum_i ||g_i||^2 (the diagonal of G G^T / N) and the per-block traces
    (blocks as ``curvature_operators.hessian``), in one pass over per-sample gradient chunks
    (memory: one chunk). Accumulated in float64 (the values returned in that dtype)."""
    check_chunk_size(chunk_size)
    p = _problem(model, loss_fn, batch, params, blocks)
    members = [list(b.tensors) for b in p.blocks]
    total = torch.zeros(len(members), dtype=torch.float64, device=p.device)
    for _, _, g in per_sample_gradient_chunks(p, chunk_size):
        total += block_dots(g, g, members).to(torch.float64).sum(1)
    total /= p.num_samples
    return FisherTrace(trace=total.sum(), num_samples=p.num_samples,
                       block_traces={b.name: total[i] for i, b in enumerate(p.blocks)})


def fisher_eigs(model: nn.Module, loss_fn: Callable, batch, k: int = 5,
                params: ParamSelection = None, chunk_size: int | None = None) -> torch.Tensor:
    """The top-k eigenvalues of the empirical Fisher F = G^T G / N, descending, float64: the
    nonzero eigenvalues of G^T G / N [P x P] are those of G G^T / N [N x N] (the SVD of G),
    so F's top k <= N eigenvalues come from the N x N Gram exactly."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected a positive int, got {_describe(k)}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k: expected a positive int, got {k}")
    check_chunk_size(chunk_size)
    p = _problem(model, loss_fn, batch, params)
    numel = sum(s.numel() for s in p.shapes)
    if k > min(p.num_samples, numel):
        raise ValueError(f"k: {k} exceeds min(N, P) = min({p.num_samples}, {numel}), the rank "
                         "bound of the empirical Fisher")
    return gram_eigenvalues(_gradient_gram(p, chunk_size) / p.num_samples)[:k]

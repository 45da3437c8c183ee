"""Curvature operators of a model, a loss and a batch: Hessian, generalized Gauss-Newton and
empirical Fisher, over all or a chosen subset of the parameters, grouped in blocks.

The conventions (batch, parameter selection, functional evaluation, snapshots, SDPA on its math
kernel) are in curvature_model_problem, the Hessian operator in curvature_hessian; this module
holds the GGN and Fisher operators and the constructors, and gathers the public names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.func as tfunc
from torch import nn

from .curvature_hessian import HESSIAN_METHODS, HessianOperator, _check_method
from .curvature_kernels import block_gram
from .curvature_model_problem import (BlockSpec, ModelOperator, ModelProblem, ParamSelection,
                                      _describe, check_chunk_size, per_sample_gradient_chunks,
                                      scalar_loss)

__all__ = ["hessian", "ggn", "empirical_fisher", "HessianOperator", "GGNOperator",
           "FisherOperator", "ModelOperator", "HESSIAN_METHODS"]


class GGNOperator(ModelOperator):
    """Generalized Gauss-Newton G = J^T H_L J (Schraudolph 2002, "Fast curvature
    matrix-vector products for second-order gradient descent"; Martens 2020, "New insights
    and perspectives on the natural gradient method"): J = d output / d theta, H_L = the
    Hessian of the loss wrt the output. PSD when the loss is convex in the output (mean
    squared error, cross-entropy).

    G v: J v by forward mode (``torch.func.jvp`` of the model output; a batch through
    ``vmap``, the primal forward shared by its vectors; with ``linearize=True`` traced once by
    ``torch.func.linearize`` so that no product reruns the primal forward, unless the traced
    products do not reproduce the plain ones on random probes: ``linearize_skipped`` says
    why, as for the Hessian), H_L u by
    forward-over-reverse on the loss of the output kept from the first product (a loss whose
    gradient has no forward-mode derivative, e.g. nn.HuberLoss: by double backward, the vjp
    of the loss's gradient in the output, H_L being symmetric; ``loss_hessian_method`` says
    which), J^T w by the ``torch.func.vjp`` closure (autograd graph) kept from the first
    product.
    """

    psd = True

    def __init__(self, problem: ModelProblem, linearize: bool = False):
        super().__init__(problem)
        self.linearize = linearize
        self.linearized: bool | None = None
        self.linearize_skipped: str | None = None  # why linearize=True did not trace
        # How H_L u runs: "forward_over_reverse", or "double_backward" for a loss whose gradient
        # has no forward-mode derivative (see _build); None before the first product.
        self.loss_hessian_method: str | None = None

    @property
    def loss_hessian_explicit(self) -> bool | None:
        """Deprecated (H_L is no longer an explicit matrix): True when H_L u runs by double
        backward, i.e. ``loss_hessian_method == "double_backward"``."""
        m = self.loss_hessian_method
        return None if m is None else m == "double_backward"

    def _build(self):
        p = self.problem
        try:
            out, vjp_fn = tfunc.vjp(p.call, p.primals)
        except RuntimeError as err:
            if "must be floating-point" not in str(err):
                raise
            raise TypeError(
                "ggn: the model's output holds a tensor that is not floating point (e.g. "
                "argmax indices next to the logits), and the GGN needs J = d output / d theta "
                "of all of it; return the floating outputs only (compute the rest in the "
                "loss), or use hessian(), which differentiates the loss only") from err
        out = torch.utils._pytree.tree_map(
            lambda t: t.detach() if torch.is_tensor(t) else t, out)
        y_primal, y_tangent = p.forward_ad_targets()

        def loss_of_output(o, *y):
            return scalar_loss(p.loss_fn(o, y[0] if y else p.targets))
        loss_grad = tfunc.grad(loss_of_output)

        def hl(u):
            return tfunc.jvp(loss_grad, (out, *y_primal), (u, *y_tangent))[1]
        self.loss_hessian_method = "forward_over_reverse"
        try:  # on a zero tangent: cheap (output-sized), and names the loss's missing formula
            hl(torch.utils._pytree.tree_map(torch.zeros_like, out))
        except NotImplementedError as err:
            hl = _double_backward_loss_hessian(loss_grad, out, y_primal, err)
            self.loss_hessian_method = "double_backward"

        def make(jv):
            def ggn1(v):
                return vjp_fn(hl(jv(v)))[0]
            return ggn1, tfunc.vmap(ggn1)

        def jv_plain(v):
            return tfunc.jvp(p.call, (p.primals,), (v,))[1]
        self._one, self._many = make(jv_plain)
        traced = self._traced_products(p.call, make, self._one) if self.linearize else None
        if traced is not None:
            self._one, self._many = traced
        self.linearized = traced is not None

    def _single(self, v):
        p = self.problem
        return p.as_list(self._one(p.as_dict(v)))

    def _batched(self, V):
        p = self.problem
        return p.as_list(self._many(p.as_dict(V)))


def _double_backward_loss_hessian(loss_grad, out, y_primal, err: Exception):
    """H_L u for a loss whose gradient has no forward-mode derivative (nn.HuberLoss,
    SoftMarginLoss in torch 2.13: forward-over-reverse raises
    NotImplementedError): the vjp of the loss's gradient in the output, u -> u^T H_L = H_L u
    (H_L is symmetric), by double backward through the graph of the gradient built here once
    (output-sized, so no limit on the output's size; vmap batches it). A loss whose gradient
    has no derivative at all (nn.MultiMarginLoss: no double backward either) is refused with
    both errors, checked on a zero cotangent."""
    try:
        _, hvp = tfunc.vjp(lambda o: loss_grad(o, *y_primal), out)
        hvp(torch.utils._pytree.tree_map(torch.zeros_like, out))
    except RuntimeError as err2:
        raise NotImplementedError(
            f"ggn: H_L u (the Hessian of the loss in the model's output) needs a derivative of "
            f"the loss's gradient, and torch {torch.__version__.split('+')[0]} has neither its "
            f"forward-mode one ({err}) nor its double backward ({err2}); write the loss with "
            f"ops that have one (e.g. a margin loss with torch.clamp), or use "
            f"empirical_fisher(), which is first order") from err2

    def double_backward_hl(u):
        return hvp(u)[0]
    return double_backward_hl


class FisherOperator(ModelOperator):
    """Empirical Fisher F = (1/N) sum_i g_i g_i^T, g_i the gradient of the loss of sample i
    alone, loss_fn(model(x_i[None]), y_i[None]) (Kunstner, Hennig & Balles 2019, "Limitations
    of the empirical Fisher approximation"). PSD, rank <= N. Per-sample losses are what the
    loss function gives one sample, so options that act across the batch do not carry over:
    cross-entropy's class ``weight`` cancels in a mean over one sample (the Hessian of the
    weighted batch loss keeps it), and samples with ``ignore_index`` targets have g_i = 0 but
    still count in N (the batch loss averages over the others).

    The per-sample gradients are computed once (``torch.func.vmap(torch.func.grad)``, in
    chunks of `chunk_size` samples) and kept as ``per_sample`` (list of [N, *shape]);
    F V = G^T (G V) / N tensor by tensor: S = sum_t G_t V_t^T [N, b] (block_gram), then
    (F V)_t = S^T G_t / N. Memory N x P.
    """

    psd = True
    _per_sample = True

    def __init__(self, problem: ModelProblem, chunk_size: int | None = None):
        super().__init__(problem)
        self.chunk_size = chunk_size
        self.per_sample: list[torch.Tensor] | None = None

    def _build(self):
        p = self.problem
        n = p.num_samples
        G = [torch.empty(n, *s, dtype=self.dtype, device=self.device) for s in self.shapes]
        for start, stop, g in per_sample_gradient_chunks(p, self.chunk_size):
            for dst, src in zip(G, g):
                dst[start:stop] = src
        self.per_sample = G
        self._flat = [g.reshape(n, -1) for g in G]
        self._all = [list(range(len(G)))]

    def _batched(self, V):
        n = self.problem.num_samples
        b = V[0].shape[0]
        S = block_gram(self._flat, [v.reshape(b, -1) for v in V], self._all)[0]  # [N, b]
        S = (S / n).to(self.dtype).T.contiguous()
        return [(S @ g).reshape(v.shape) for g, v in zip(self._flat, V)]


# ------------------------------------------------------------------------------- constructors
def hessian(model: nn.Module, loss_fn: Callable, batch, params: ParamSelection = None,
            blocks: BlockSpec = "module", method: str = "auto",
            linearize: bool = False) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` wrt the selected parameters as a
    ``HessianOperator`` (see there for the two products and ``method``).

    Args:
        model: the network; never modified (evaluated functionally on its own parameters).
        loss_fn: ``loss_fn(output, targets) -> scalar`` (mean over the batch).
        batch: ``(inputs, targets)``; inputs a tensor or a tuple of tensors (``model(*inputs)``).
        params: None (every parameter with requires_grad), a list of parameter names, or a
            callable ``(name, parameter) -> bool`` (asked for every name of a tied parameter,
            which must all get the same answer). The others are held fixed.
        blocks: "module" (one block per owning module: '0.weight', '0.bias' -> '0'; a
            parametrized '0.parametrizations.weight.original' -> '0' too),
            "tensor", "all", or a dict block name -> list of parameter names.
        method: "auto", "double_backward" or "forward_over_reverse".
        linearize: trace the forward-over-reverse product once (``torch.func.linearize``).
    """
    _check_method(method)  # before the problem is built
    _check_flag("linearize", linearize)
    problem = _problem(model, loss_fn, batch, params, blocks)
    return HessianOperator(problem, method, linearize)


def ggn(model: nn.Module, loss_fn: Callable, batch, params: ParamSelection = None,
        blocks: BlockSpec = "module", linearize: bool = False) -> GGNOperator:
    """The generalized Gauss-Newton J^T H_L J as a ``GGNOperator`` (arguments as ``hessian``;
    `linearize` traces the model's forward-mode product once)."""
    _check_flag("linearize", linearize)
    return GGNOperator(_problem(model, loss_fn, batch, params, blocks), linearize)


def empirical_fisher(model: nn.Module, loss_fn: Callable, batch, params: ParamSelection = None,
                     blocks: BlockSpec = "module",
                     chunk_size: int | None = None) -> FisherOperator:
    """The empirical Fisher (1/N) sum_i g_i g_i^T as a ``FisherOperator`` (arguments as
    ``hessian``; `chunk_size` samples per vmapped per-sample-gradient call, default: as many
    as keep one chunk's gradients under 256 MiB)."""
    check_chunk_size(chunk_size)
    return FisherOperator(_problem(model, loss_fn, batch, params, blocks, per_sample=True),
                          chunk_size)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_describe(value)}")


def _problem(model, loss_fn, batch, params, blocks, per_sample=False) -> ModelProblem:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch: expected a pair (inputs, targets), got {_describe(batch)}")
    return ModelProblem(model, loss_fn, batch, params, blocks, inputs=batch[0],
                        per_sample=per_sample)

"""Curvature operators of a model, a loss and a batch: Hessian, generalized Gauss-Newton and
empirical Fisher, over all or a chosen subset of the parameters, grouped in blocks.

Conventions (shared with curvature_samples.py and the references in python_tests/reference.py):
- ``batch = (inputs, targets)``; ``inputs`` is a tensor or a tuple of tensors, the model is
  called as ``model(inputs)`` or ``model(*inputs)``; ``targets`` is a tensor (or None) passed
  as the second argument of ``loss_fn(output, targets)``, a scalar mean over the batch.
  Per-sample quantities (Fisher, Grams) slice every input tensor and the targets along dim 0
  and evaluate ``loss_fn(model(x_i[None]), y_i[None])``.
- The operator's space: the selected parameters, in ``model.named_parameters()`` order; vectors
  are lists of tensors shaped like them (curvature_operators.py). Unselected parameters are
  held fixed.
- The model is evaluated with ``torch.func.functional_call`` on the parameters' own storage
  (``p.detach()``: no copy). Buffers pass through as they are; when a module is in training
  mode each forward gets fresh private clones of them, so a layer that updates its buffers
  (BatchNorm's running statistics) never changes the user's model. Layers that couple
  samples or draw random numbers (BatchNorm in train mode, dropout) make per-sample
  gradients ill-defined and products non-reproducible: call ``model.eval()`` first.
- An operator is a snapshot of the parameters, buffers and batch at its construction: it
  holds their storage (no copy) and the version counters they had, and every product (and
  ``prepare``) first checks them, so an in-place change between products (an optimizer step,
  ``nn.init``, ``load_state_dict``, a data loader refilling the batch's tensors) is refused
  with a RuntimeError naming the tensor. The graphs and per-sample gradients built at the
  first product would otherwise mix old and new values silently (a GGN's cached J^T with a
  fresh J v). Build a new operator after an optimizer step. Writes made during the operator's
  own products are told apart (versions are read before and after each): a forward that
  writes a parameter is refused; one that writes its inputs (``nn.ReLU(inplace=True)`` first),
  the targets (in the loss) or a buffer (a lazily filled cache) is trusted to be idempotent.
  Buffers of modules in training mode are not watched (each forward works on clones, and
  the user's own forwards update their running statistics); those of modules in eval mode
  are, also when other modules are in training mode. Not seen: writes through ``p.data``
  (they bypass version counters by design) and tensors made under ``inference_mode``,
  which have no version counter.
- SDPA: every forward runs inside ``sdpa_kernel([SDPBackend.MATH])``: the fused CPU/CUDA
  attention kernels implement neither double backward nor forward-mode AD, the math kernel
  is plain differentiable torch ops.

This module holds what every model operator (curvature_model_operators, curvature_hessian) and
the sample-space kernels (curvature_samples) share: the problem (model, loss, batch, parameter
selection and blocks), per-sample gradients in chunks, and the base operator class.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.func as tfunc
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .curvature_operators import Block, CurvatureOperator

ParamSelection = Sequence[str] | Callable[[str, torch.Tensor], bool] | None
BlockSpec = str | dict

@contextlib.contextmanager
def _no_mha_fastpath():
    # nn.MultiheadAttention and nn.TransformerEncoderLayer in eval mode take fused kernels
    # (aten::_native_multi_head_attention, aten::_transformer_encoder_layer_fwd) whenever no
    # input requires grad, as in a jvp, and forward AD has no formula for them: the GGN of an
    # eval-mode MultiheadAttention model failed with NotImplementedError. The unfused path
    # computes the same function.
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def math_sdpa() -> contextlib.AbstractContextManager:
    """The context every curvature computation runs in: SDPA on its math kernel (the fused
    kernels have no double backward and no forward AD), the unfused MultiheadAttention /
    TransformerEncoderLayer path (same reason), gradients enabled (the operators are also used
    under an outer ``torch.no_grad()`` or ``torch.inference_mode()``, where enable_grad alone
    left the double-backward Hessian without a graph)."""
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    stack.enter_context(_no_mha_fastpath())
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"Tensor(shape={list(x.shape)}, dtype={x.dtype}, device={x.device})"
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------- problem
class ModelProblem:
    """A validated (model, loss_fn, batch, parameter selection, blocks) and the functional
    forms the operators differentiate. All argument checks happen here, before any work."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None, batch=None, params:
                 ParamSelection = None, blocks: BlockSpec = "module", *, inputs=None,
                 per_sample: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {_describe(model)}")
        if isinstance(model, nn.modules.loss._Loss):
            raise TypeError(f"model: got the loss {model!r}; the arguments are (model, loss_fn, "
                            f"batch): are model and loss_fn swapped?")
        self.model = model
        # Errors about the inputs name the caller's argument: batch=(inputs, targets), or
        # inputs alone (ntk_gram).
        arg = "batch: " if batch is not None else ""
        if batch is not None:
            if loss_fn is None or not callable(loss_fn):
                raise TypeError(f"loss_fn: expected a callable loss_fn(output, targets), got "
                                f"{_describe(loss_fn)}")
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"batch: expected a pair (inputs, targets), got "
                                 f"{_describe(batch)}")
            inputs, targets = batch
            if targets is not None and not torch.is_tensor(targets):
                raise TypeError(f"batch: targets must be a tensor or None, got "
                                f"{_describe(targets)}")
        else:
            targets = None
        self.loss_fn = loss_fn
        self.inputs_is_tuple = isinstance(inputs, (tuple, list))
        xs = tuple(inputs) if self.inputs_is_tuple else (inputs,)
        if not xs:
            raise ValueError(f"{arg}inputs is an empty tuple")
        for i, x in enumerate(xs):
            if not torch.is_tensor(x):
                raise TypeError(f"{arg}inputs[{i}] must be a tensor, got {_describe(x)}")
        # A tensor made under inference_mode cannot be saved for backward (the double-backward
        # Hessian failed on one): such inputs and targets are cloned once into normal tensors.
        with torch.inference_mode(False):
            xs = tuple(x.clone() if x.is_inference() else x for x in xs)
            if targets is not None and targets.is_inference():
                targets = targets.clone()
        self.inputs = xs
        self.targets = targets

        named = list(model.named_parameters())
        first = {id(p): n for n, p in named}
        # second names of tied parameters -> their first (the name the operators use)
        self.aliases = {a: first[id(p)] for a, p in model.named_parameters(remove_duplicate=False)
                        if id(p) in first and first[id(p)] != a}
        self.names = self._select(named, params, self.aliases)
        by_name = dict(named)
        selected = [by_name[n] for n in self.names]
        if sum(p.numel() for p in selected) == 0:
            raise ValueError(f"params: the selection {self.names} holds only zero-size "
                             f"parameters (numel 0): there is no curvature to estimate")
        self.dtype = selected[0].dtype
        self.device = selected[0].device
        for n, p in zip(self.names, selected):
            if not p.is_floating_point():
                raise TypeError(f"params: parameter {n!r} has dtype {p.dtype}; curvature needs "
                                "floating-point parameters")
            if p.dtype != self.dtype:
                raise TypeError(f"params: parameter {n!r} has dtype {p.dtype}, "
                                f"{self.names[0]!r} has {self.dtype}: select parameters of "
                                "one dtype")
            if p.device != self.device:
                raise ValueError(f"params: parameter {n!r} is on {p.device}, {self.names[0]!r} "
                                 f"on {self.device}: select parameters on one device")
        tensors = list(xs) + ([targets] if targets is not None else [])
        for i, t in enumerate(tensors):
            what = f"inputs[{i}]" if i < len(xs) else "targets"
            if t.device != self.device:
                raise ValueError(f"{arg}{what} is on {t.device}, the parameters on "
                                 f"{self.device}")
            # Floating targets too: mixed dtypes work in some products (double backward
            # promotes) and fail in others (forward-mode jvp of a float32 loss against float64
            # targets), so every operator and method rejects them alike.
            if t.is_floating_point() and t.dtype != self.dtype:
                raise TypeError(f"{arg}{what} has dtype {t.dtype}, the parameters "
                                f"{self.dtype}: cast the {what.split('[')[0]} (or the model)")
        renorm = [name or type(m).__name__ for name, m in model.named_modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                  and m.max_norm is not None]
        if renorm:
            raise ValueError(f"model: {renorm[:3]} {'are' if len(renorm) > 1 else 'is'} "
                             f"nn.Embedding with max_norm, which renormalizes the looked-up "
                             f"rows of its weight in place at every forward: an operator would "
                             f"change the model, and the curvature of a function that rewrites "
                             f"its parameters is not defined; build it on a copy with "
                             f"max_norm=None (renormalize the weight once first)")
        if per_sample:
            n = xs[0].shape[0] if xs[0].dim() else 0
            for i, t in enumerate(tensors):
                what = f"inputs[{i}]" if i < len(xs) else "targets"
                if t.dim() == 0 or t.shape[0] != n:
                    raise ValueError(f"{arg}per-sample gradients slice dim 0 of every input"
                                     f"{' and the targets' if batch is not None else ''}; "
                                     f"{what} has shape {list(t.shape)}, "
                                     f"inputs[0] {list(xs[0].shape)}")
            if n == 0:
                raise ValueError(f"{arg or 'inputs: '}has no samples (inputs[0] has 0 rows)")
            # Batch statistics couple the samples: a per-sample gradient is not defined (and
            # vmap fails deep inside with "running_mean ... not batched").
            # BatchNorm without running statistics uses the batch's in eval mode too.
            coupled = [(name or type(m).__name__, m.training)
                       for name, m in model.named_modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       and (m.training or m.running_mean is None)]
            if coupled:
                names = [c[0] for c in coupled[:3]]
                fix = ("call model.eval() first" if all(t for _, t in coupled) else
                       "BatchNorm with track_running_stats=False normalizes by the batch even "
                       "in eval mode: use one with running statistics (in eval mode) or a "
                       "per-sample normalization (LayerNorm, GroupNorm)")
                raise ValueError(f"model: per-sample gradients need normalization that does "
                                 f"not couple the samples: {names} "
                                 f"{'are' if len(coupled) > 1 else 'is'} BatchNorm using batch "
                                 f"statistics (in training mode, or without running "
                                 f"statistics); {fix}")
        self.num_samples = xs[0].shape[0] if xs[0].dim() else None

        self.blocks = self._blocks(blocks)
        self.shapes = [p.shape for p in selected]
        # The parameters' own storage (detach shares it): no copy, nothing written back.
        self.primals = {n: p.detach() for n, p in zip(self.names, selected)}
        self._selected = selected  # the Parameters themselves: for check_loss_reads_output_only
        self._loss_checked = False
        chosen = set(self.names)
        self.fixed = {n: p.detach() for n, p in named if n not in chosen}
        # A module in training mode may update its buffers in the forward (BatchNorm's
        # running statistics): each forward then gets fresh private clones, created inside
        # the transformed function (torch.func forbids mutating captured tensors), so the
        # user's buffers never change. In eval mode buffers are passed through as they are.
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.clone_buffers = bool(self.buffers) and any(m.training for m in model.modules())
        modules = dict(model.named_modules())
        watched = ([(f"parameter {n!r}", t, True)
                    for n, t in {**self.primals, **self.fixed}.items()]
                   + [(f"{arg}inputs[{i}]", x, False) for i, x in enumerate(xs)]
                   + ([("batch: targets", targets, False)] if targets is not None else [])
                   + [(f"buffer {n!r}", b, False) for n, b in self.buffers.items()
                      if not modules[n.rpartition(".")[0]].training])
        # (what, tensor, is a parameter) and the version it must have at the next product;
        # inference-mode tensors have no version counter.
        self._watched = [w for w in watched if not w[1].is_inference()]
        self._versions = [t._version for _, t, _ in self._watched]

    def check_loss_reads_output_only(self, per_sample: bool = False) -> None:
        """ValueError when loss_fn's value depends on a selected parameter directly, not only
        through the model's output (a weight-decay penalty over model.parameters() in the loss
        closure): every operator differentiates loss_fn(output, targets) in the output, with
        the model evaluated on its own functional copy of the parameters, so such a term was
        silently dropped (measured: a trace of 4.03 for 6.63). One extra forward on cloned
        buffers (until a check passes; on the first sample for the per-sample operators), then
        autograd's graph of the loss of its detached output is walked, not run, for the
        selected parameters: reading a parameter's metadata, or a model output that is a view
        of a parameter, is not a dependence; unselected parameters are constants, so a term in
        them is right as it is; a penalty on a frozen (requires_grad=False) selected parameter
        leaves no graph and is not seen."""
        if self._loss_checked or self.loss_fn is None:
            return
        xs, y = self.inputs, self.targets
        if per_sample:
            xs = tuple(x[:1] for x in xs)
            y = None if y is None else y[:1]
        # Buffers cloned: this extra forward must not write the user's. Gradients stay on
        # (math_sdpa): a model may call autograd in its own forward (a force field's -dE/dx).
        with math_sdpa():
            out = self.call(self.primals, xs, clone_buffers=True)
            out = torch.utils._pytree.tree_map(
                lambda t: t.detach() if torch.is_tensor(t) else t, out)
            y = y.detach() if torch.is_tensor(y) else y
            value = self.loss_fn(out, y)
        # The loss's autograd graph, walked without running it (no hooks fire, a graph whose
        # buffers a backward already freed is still walkable): a selected parameter's
        # AccumulateGrad node in it is a direct dependence.
        hit = _graph_leaves(value.grad_fn if torch.is_tensor(value) else None,
                            {id(p) for p in self._selected})
        reached = [n for n, p in zip(self.names, self._selected) if id(p) in hit]
        self._loss_checked = not reached  # a refusal is repeated at the next product
        if reached:
            raise ValueError(
                f"loss_fn: its value depends on the selected parameter(s) {reached[:3]} "
                f"directly, not only through the model's output (e.g. a weight-decay penalty "
                f"over model.parameters() in the loss): the operators differentiate "
                f"loss_fn(output, targets) in the output, so that term would be silently "
                f"dropped; leave it out of loss_fn and add its curvature to the result (a "
                f"penalty wd * ||theta||^2 adds 2 wd I to the Hessian: 2 wd P to its trace)")

    def check_unchanged(self, who: str) -> None:
        """Before a product: RuntimeError when a watched tensor (parameters, inputs, targets,
        buffers of eval-mode modules) was changed in place since the operator was built or
        its last product (its version counter moved)."""
        for (what, t, _), version in zip(self._watched, self._versions):
            if t._version != version:
                raise RuntimeError(
                    f"{who}: {what} was modified in place since the operator was built (an "
                    f"optimizer step, nn.init, load_state_dict, a refilled batch tensor): an "
                    f"operator is a snapshot of the model and the batch at construction, and "
                    f"its cached graphs would mix old and new values; build a new operator")

    def absorb_own_writes(self, who: str) -> None:
        """After one of the operator's own products (or its build): writes made during it are
        the model's or the loss's. To a parameter: RuntimeError (the curvature of a function
        that rewrites its parameters is not defined); to inputs, targets or buffers: taken as
        idempotent (an in-place ReLU on the input, a lazily filled cache), the new versions
        becoming the ones the next product must find."""
        for i, (what, t, is_param) in enumerate(self._watched):
            if t._version != self._versions[i]:
                self._versions[i] = t._version  # the next product then names the forward again
                if is_param:
                    raise RuntimeError(
                        f"{who}: the model's own forward modified {what} in place: the "
                        f"curvature of a function that rewrites its own parameters is not "
                        f"defined, and the model has been changed; keep such state out of "
                        f"the parameters")

    @staticmethod
    def _select(named, params, aliases: dict[str, str]) -> list[str]:
        if params is None:
            names = [n for n, p in named if p.requires_grad]
        elif callable(params):
            # Every name of a tied parameter is offered (named_parameters lists it once, under
            # its first name: a callable matching only the second had dropped it silently).
            by_name = dict(named)
            answers = {n: {n: bool(params(n, p))} for n, p in named}
            for a, n in aliases.items():
                answers[n][a] = bool(params(a, by_name[n]))
            split = {n: a for n, a in answers.items() if len(set(a.values())) > 1}
            if split:
                n, a = next(iter(split.items()))
                yes = [k for k, v in a.items() if v]
                no = [k for k, v in a.items() if not v]
                raise ValueError(f"params: the callable selects {yes} but not {no}, names of one "
                                 f"tied tensor ({n!r}); make it answer the same for every name, "
                                 f"or pass a list of names")
            names = [n for n, _ in named if any(answers[n].values())]
        elif isinstance(params, str) or not isinstance(params, Sequence):
            raise TypeError(f"params: expected None, a list of parameter names or a callable "
                            f"(name, param) -> bool, got {_describe(params)}")
        else:
            wanted = list(params)
            have = {n for n, _ in named}
            bad = [w for w in wanted if not isinstance(w, str)]
            if bad:
                raise TypeError(f"params: names must be strings, got {_describe(bad[0])}")
            unknown = [w for w in wanted if w not in have]
            if unknown:
                # A tied parameter (one tensor under two names) is listed once, under its
                # first name: say which name to use.
                hints = "".join(f"; {w!r} is tied to {aliases[w]!r} (the same tensor): select "
                                f"it by that name" for w in unknown if w in aliases)
                raise ValueError(f"params: unknown parameter name(s) {unknown}; the model has "
                                 f"{[n for n, _ in named]}{hints}")
            dup = sorted({w for w in wanted if wanted.count(w) > 1})
            if dup:
                raise ValueError(f"params: duplicate name(s) {dup}")
            names = [n for n, _ in named if n in set(wanted)]
        if not names:
            raise ValueError(f"params: the selection {_describe(params)} selects no parameter "
                             "of the model")
        return names

    def _blocks(self, spec) -> list[Block]:
        index = {n: i for i, n in enumerate(self.names)}
        if isinstance(spec, str):
            if spec == "tensor":
                return [Block(n, (i,)) for i, n in enumerate(self.names)]
            if spec == "all":
                return [Block("all", tuple(range(len(self.names))))]
            if spec == "module":
                groups: dict[str, list[int]] = {}
                for i, n in enumerate(self.names):
                    groups.setdefault(_owning_module(n) or "<root>", []).append(i)
                return [Block(k, tuple(v)) for k, v in groups.items()]
        elif isinstance(spec, dict):
            out, seen, names_seen = [], {}, {}
            for bname, members in spec.items():
                if isinstance(members, str) or not isinstance(members, Sequence) or not members:
                    raise ValueError(f"blocks: block {bname!r} must be a non-empty list of "
                                     f"parameter names, got {_describe(members)}")
                if str(bname) in names_seen:
                    raise ValueError(f"blocks: two blocks are named {str(bname)!r} (keys "
                                     f"{names_seen[str(bname)]!r} and {bname!r}): the per-block "
                                     f"results are keyed by name")
                names_seen[str(bname)] = bname
                for m in members:
                    if m not in index:
                        tied = self.aliases.get(m)
                        hint = (f"; {m!r} is tied to {tied!r} (the same tensor): name it by that "
                                f"name" if tied in index else "")
                        raise ValueError(f"blocks: block {bname!r} names {m!r}, which is not a "
                                         f"selected parameter (selected: {self.names}){hint}")
                    if m in seen:
                        raise ValueError(f"blocks: parameter {m!r} is in blocks {seen[m]!r} "
                                         f"and {bname!r}")
                    seen[m] = bname
                out.append(Block(str(bname), tuple(sorted(index[m] for m in members))))
            missing = [n for n in self.names if n not in seen]
            if missing:
                raise ValueError(f"blocks: selected parameter(s) {missing} are in no block")
            return out
        raise ValueError(f"blocks: expected 'module', 'tensor', 'all' or a dict block name -> "
                         f"parameter names, got {_describe(spec)}")

    # -- functional forms (params: dict name -> tensor of the selected parameters) ---------
    def call(self, params: dict, inputs: tuple | None = None,
             clone_buffers: bool | None = None):
        """The model on params (and the fixed parameters), on private clones of the buffers
        when a module trains (or clone_buffers=True: a forward that must leave them as they
        are)."""
        xs = self.inputs if inputs is None else inputs
        if self.clone_buffers if clone_buffers is None else clone_buffers:
            buffers = {n: b.clone() for n, b in self.buffers.items()}
        else:
            buffers = self.buffers
        return tfunc.functional_call(self.model, {**self.fixed, **buffers, **params}, xs)

    def loss(self, params: dict):
        return self.loss_fn(self.call(params), self.targets)

    def forward_ad_targets(self) -> tuple[tuple, tuple]:
        """(primals, tangents) that make the targets an explicit input of a jvp with a
        materialized zero tangent. Works around PyTorch issue #123996: forward-over-reverse
        through F.mse_loss with a tangent-free target hits "ZeroTensors are immutable" (the
        in-place division of mse_loss_double_backward). Empty for non-float targets."""
        y = self.targets
        if torch.is_tensor(y) and y.is_floating_point():
            return (y,), (torch.zeros_like(y),)
        return (), ()

    def sample_loss(self, params: dict, xs: tuple, y):
        """The loss of one sample (slices without their batch dim, as vmap passes them)."""
        out = self.call(params, tuple(x.unsqueeze(0) for x in xs))
        return scalar_loss(self.loss_fn(out, None if y is None else y.unsqueeze(0)))

    def as_dict(self, tensors: Sequence[torch.Tensor]) -> dict:
        return dict(zip(self.names, tensors))

    def as_list(self, d: dict) -> list[torch.Tensor]:
        return [d[n] for n in self.names]


def _owning_module(name: str) -> str:
    """The module a parameter belongs to: the prefix of its name, or for a parametrized tensor
    ('0.parametrizations.weight.original') the module that holds the parametrization ('0'),
    so that blocks="module" keeps a parametrized layer in one block with its bias."""
    dotted = "." + name
    if ".parametrizations." in dotted:
        return dotted.split(".parametrizations.")[0][1:]
    return name.rpartition(".")[0]


def _graph_leaves(node, wanted: set[int]) -> set[int]:
    """ids of the tensors in `wanted` whose AccumulateGrad nodes the autograd graph from `node`
    reaches (an iterative walk over next_functions)."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        var = getattr(n, "variable", None)
        if var is not None and id(var) in wanted:
            found.add(id(var))
        stack.extend(f for f, _ in n.next_functions if f is not None)
    return found


def _captured_write_error(who: str, err: RuntimeError) -> RuntimeError:
    """err itself, or for torch.func's refusal of an in-place write to a tensor it captured a
    message that says what was written and the ways out."""
    if "mutate a captured Tensor" not in str(err):
        return err
    return RuntimeError(
        f"{who}: the model's forward writes in place to a tensor that torch.func captured (an "
        f"input, e.g. a first nn.ReLU(inplace=True), or a buffer of a module in eval mode, "
        f"e.g. a call counter or a cache), and the transforms cannot differentiate that; make "
        f"the op out of place, put that module in training mode (each forward then works on "
        f"clones of the buffers), or for the Hessian use method='double_backward' "
        f"(torch.func error: {str(err)[:160]})")


class LossError(ValueError):
    """loss_fn returned something other than a scalar tensor: the caller's error (the Hessian's
    'auto' raises it as it is, not taking it for a method that fails)."""


def scalar_loss(value):
    """loss_fn's value, checked to be a scalar tensor; every operator's loss goes through it (a
    reduction='none' loss otherwise failed inside torch.func with "Expected f(*args) to return
    a scalar Tensor")."""
    if not (torch.is_tensor(value) and value.dim() == 0):
        raise LossError(f"loss_fn: must return a scalar tensor, got {_describe(value)}")
    return value


def default_chunk(num_samples: int, per_sample_numel: int, itemsize: int,
                  budget_bytes: int = 1 << 28) -> int:
    """Samples per vmap chunk so that one chunk's per-sample results stay under
    `budget_bytes` (256 MiB): the per-sample gradients/Jacobians dominate the memory."""
    return max(1, min(num_samples, budget_bytes // max(1, per_sample_numel * itemsize)))


def per_sample_gradient_chunks(problem: ModelProblem, chunk_size: int | None, start: int = 0,
                               stop: int | None = None):
    """Yields (begin, end, list of [end-begin, *shape] per-sample loss gradients) over the
    samples start .. stop-1 in chunks of `chunk_size` (default ``default_chunk``)."""
    n = problem.num_samples if stop is None else stop
    chunk = chunk_size or default_chunk(n - start, sum(s.numel() for s in problem.shapes),
                                        torch.empty(0, dtype=problem.dtype).element_size())
    has_y = problem.targets is not None
    problem.check_loss_reads_output_only(per_sample=True)

    def one(params, xs, y):
        return tfunc.grad(problem.sample_loss)(params, xs, y)
    batched = tfunc.vmap(one, in_dims=(None, 0, 0 if has_y else None))
    for begin in range(start, n, chunk):
        end = min(n, begin + chunk)
        xs = tuple(x[begin:end] for x in problem.inputs)
        y = problem.targets[begin:end] if has_y else None
        with math_sdpa():  # per chunk: no global SDPA state is held across a yield
            try:
                g = batched(problem.primals, xs, y)
            except RuntimeError as err:
                # vmap's own message names an op deep inside (nn.RNN / GRU / LSTM: "output
                # with shape [1, 3] doesn't match the broadcast shape [5, 1, 3]";
                # gaussian_nll_loss: "data-dependent control flow")
                raise RuntimeError(
                    f"per-sample gradients (torch.func.vmap of grad over the samples) failed "
                    f"on this model and loss: {err}. A layer or loss without a vmap rule "
                    f"cannot serve the per-sample operators (empirical Fisher, gradient Gram, "
                    f"NTK, fisher_trace / fisher_eigs); the Hessian and the GGN need no "
                    f"per-sample gradients") from err
        yield begin, end, [g[k].detach() for k in problem.names]


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int, got "
                         f"{_describe(chunk_size)}")


# ------------------------------------------------------------------------------- operators
class ModelOperator(CurvatureOperator):
    """Base of the model operators: lazy build (``prepare``) at the first product, dtype
    check of vectors, matvec counting, SDPA math kernel around every product. A single
    vector (``matvec``) takes an un-vmapped path; a batch (``matmat``) one vmapped call."""

    def __init__(self, problem: ModelProblem):
        super().__init__(problem.shapes, problem.dtype, problem.device, problem.blocks,
                         problem.names)
        self.problem = problem
        self._ready = False
    # Per-sample operators check loss_fn on one sample (their loss is per sample).
    _per_sample = False

    def prepare(self) -> "ModelOperator":
        """Builds the cached state (graphs, per-sample gradients, closures) now rather than
        at the first product; timing code calls it before the clock starts."""
        who = type(self).__name__
        self.problem.check_unchanged(who)
        if not self._ready:
            try:  # its forward is the operator's own too (an in-place ReLU on the input)
                self.problem.check_loss_reads_output_only(per_sample=self._per_sample)
            finally:
                self.problem.absorb_own_writes(who)
            try:
                with math_sdpa():
                    self._build()
            except RuntimeError as err:
                raise _captured_write_error(who, err) from err
            finally:
                self.problem.absorb_own_writes(who)
            self._ready = True
        return self

    def _build(self) -> None:
        raise NotImplementedError

    def _check(self, v, batched):
        super()._check(v, batched)
        for i, t in enumerate(v):
            if t.dtype != self.dtype:
                raise TypeError(f"vector[{i}] ({self.names[i]}): expected dtype {self.dtype} "
                                f"(the parameters'), got {t.dtype}")

    def _matmat(self, V):
        self.prepare()
        b = V[0].shape[0]
        if b == 0:
            return [torch.empty_like(t) for t in V]
        try:
            with math_sdpa():
                if b == 1:
                    out = [t.unsqueeze(0) for t in self._single([t[0] for t in V])]
                else:
                    out = self._batched(V)
        except RuntimeError as err:
            raise _captured_write_error(type(self).__name__, err) from err
        self.problem.absorb_own_writes(type(self).__name__)
        return out

    def _single(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t[0] for t in self._batched([t.unsqueeze(0) for t in v])]

    def _traced_products(self, fn, make, plain):
        """make(jv) = (single, batched) products with jv = the forward-mode linearization of fn
        at the parameters, traced once; None when tracing or vmap over the traced graph fails,
        or when the traced products do not reproduce ``plain`` (the untraced single product)
        (tracing is an optimization: the caller keeps its plain jvp). The reason is kept in
        ``linearize_skipped``."""
        p = self.problem
        try:
            _, jv = _linearize(fn, p.primals)
            one, many = make(jv)
            why = _trace_disagrees(p, one, many, plain, self.shapes, self.dtype, self.device)
        except Exception as err:  # noqa: BLE001
            why = f"tracing failed: {type(err).__name__}: {str(err)[:200]}"
        if why is not None:
            self.linearize_skipped = why
            return None
        return one, many

    def _batched(self, V: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


def _trace_disagrees(p: ModelProblem, one, many, plain, shapes, dtype, device) -> str | None:
    """Why the traced products cannot serve, or None. torch.func.linearize's graph of a model
    with in-place ops (out += x in a residual block, tanh_, nn.RNN / GRU / LSTM) or of some
    losses' gradients (BCE with logits) writes into its own constants: its first call is
    right and later ones are wrong (measured 5% to 100x off, nan for a zero tangent), so the
    check compares calls after the first, single and batched, with the untraced product on
    two random probes."""
    g = torch.Generator().manual_seed(0x5EED)
    U = [torch.randn(2, *s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
         for s in shapes]
    zero = [torch.zeros_like(t) for t in U]

    def single(fn_, j):
        return p.as_list(fn_(p.as_dict([t[j] for t in U])))
    want = [single(plain, 0), single(plain, 1)]
    got = [single(one, 0)]
    z = p.as_list(many(p.as_dict(zero)))   # vmap over the traced graph must work too
    batch = p.as_list(many(p.as_dict(U)))
    got += [single(one, 1), single(one, 0)]
    checks = [(got[0], want[0]), (got[1], want[1]), (got[2], want[0]),
              ([t[0] for t in batch], want[0]), ([t[1] for t in batch], want[1])]
    # the two paths differ only by rounding (5.6e-7 of the norm measured in float32)
    tol = min(1e3 * torch.finfo(dtype).eps, 1e-2)
    errors = []
    for a, b in checks:
        diff = math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))
        norm = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
        errors.append(diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
    if not all(bool(torch.isfinite(t).all()) and not bool(t.any()) for t in z):
        return ("torch.func.linearize's traced graph gives a nonzero or non-finite product "
                "for a zero vector; the plain jvp serves")
    if not all(e <= tol for e in errors):  # a nan error fails too
        worst = max(errors, key=lambda e: (math.isnan(e), e))
        return (f"torch.func.linearize's traced graph reproduced the plain jvp's products only "
                f"to {worst:.2g} of their norm (tolerance {tol:.1g}; in-place ops in the model "
                f"or loss make the traced graph overwrite its own constants); the plain jvp "
                f"serves")
    return None


def _linearize(fn, primals):
    with warnings.catch_warnings():
        # const_fold's "get_attr Node with no underlying reference" is internal to
        # torch.func.linearize's tracing and harmless: not the user's concern.
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        return tfunc.linearize(fn, primals)

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
- An operator is a snapshot of the parameters and the batch at its first product: the graphs
  and the per-sample gradients it caches are not recomputed. Build a new one after an
  optimizer step.
- SDPA: every forward runs inside ``sdpa_kernel([SDPBackend.MATH])``: the fused CPU/CUDA
  attention kernels implement neither double backward nor forward-mode AD, the math kernel
  is plain differentiable torch ops.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.func as tfunc
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .curvature_kernels import block_gram
from .curvature_method_choice import OnlineChoice
from .curvature_operators import Block, CurvatureOperator

__all__ = ["hessian", "ggn", "empirical_fisher", "HessianOperator", "GGNOperator",
           "FisherOperator", "ModelOperator", "HESSIAN_METHODS"]

HESSIAN_METHODS = ("auto", "double_backward", "forward_over_reverse")

ParamSelection = Sequence[str] | Callable[[str, torch.Tensor], bool] | None
BlockSpec = str | dict


def math_sdpa() -> contextlib.AbstractContextManager:
    """The context every curvature computation runs in: SDPA on its math kernel (the fused
    kernels have no double backward and no forward AD), gradients enabled (the operators are
    also used under an outer ``torch.no_grad()``)."""
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
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
        self.model = model
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
            raise ValueError("batch: inputs is an empty tuple")
        for i, x in enumerate(xs):
            if not torch.is_tensor(x):
                raise TypeError(f"batch: inputs[{i}] must be a tensor, got {_describe(x)}")
        self.inputs = xs
        self.targets = targets

        named = list(model.named_parameters())
        self.names = self._select(named, params)
        by_name = dict(named)
        selected = [by_name[n] for n in self.names]
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
                raise ValueError(f"batch: {what} is on {t.device}, the parameters on "
                                 f"{self.device}")
            if i < len(xs) and t.is_floating_point() and t.dtype != self.dtype:
                raise TypeError(f"batch: {what} has dtype {t.dtype}, the parameters "
                                f"{self.dtype}: cast the inputs (or the model)")
        if per_sample:
            n = xs[0].shape[0] if xs[0].dim() else 0
            for i, t in enumerate(tensors):
                what = f"inputs[{i}]" if i < len(xs) else "targets"
                if t.dim() == 0 or t.shape[0] != n:
                    raise ValueError(f"batch: per-sample gradients slice dim 0 of every input "
                                     f"and the targets; {what} has shape {list(t.shape)}, "
                                     f"inputs[0] {list(xs[0].shape)}")
            if n == 0:
                raise ValueError("batch: has no samples (inputs[0] has 0 rows)")
        self.num_samples = xs[0].shape[0] if xs[0].dim() else None

        self.blocks = self._blocks(blocks)
        self.shapes = [p.shape for p in selected]
        # The parameters' own storage (detach shares it): no copy, nothing written back.
        self.primals = {n: p.detach() for n, p in zip(self.names, selected)}
        chosen = set(self.names)
        self.fixed = {n: p.detach() for n, p in named if n not in chosen}
        # A module in training mode may update its buffers in the forward (BatchNorm's
        # running statistics): each forward then gets fresh private clones, created inside
        # the transformed function (torch.func forbids mutating captured tensors), so the
        # user's buffers never change. In eval mode buffers are passed through as they are.
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.clone_buffers = bool(self.buffers) and any(m.training for m in model.modules())

    @staticmethod
    def _select(named, params) -> list[str]:
        if params is None:
            names = [n for n, p in named if p.requires_grad]
        elif callable(params):
            names = [n for n, p in named if params(n, p)]
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
                raise ValueError(f"params: unknown parameter name(s) {unknown}; the model has "
                                 f"{[n for n, _ in named]}")
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
                    groups.setdefault(n.rpartition(".")[0] or "<root>", []).append(i)
                return [Block(k, tuple(v)) for k, v in groups.items()]
        elif isinstance(spec, dict):
            out, seen = [], {}
            for bname, members in spec.items():
                if isinstance(members, str) or not isinstance(members, Sequence) or not members:
                    raise ValueError(f"blocks: block {bname!r} must be a non-empty list of "
                                     f"parameter names, got {_describe(members)}")
                for m in members:
                    if m not in index:
                        raise ValueError(f"blocks: block {bname!r} names {m!r}, which is not a "
                                         f"selected parameter (selected: {self.names})")
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
    def call(self, params: dict, inputs: tuple | None = None):
        xs = self.inputs if inputs is None else inputs
        if self.clone_buffers:
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
        return self.loss_fn(out, None if y is None else y.unsqueeze(0))

    def as_dict(self, tensors: Sequence[torch.Tensor]) -> dict:
        return dict(zip(self.names, tensors))

    def as_list(self, d: dict) -> list[torch.Tensor]:
        return [d[n] for n in self.names]


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

    def one(params, xs, y):
        return tfunc.grad(problem.sample_loss)(params, xs, y)
    batched = tfunc.vmap(one, in_dims=(None, 0, 0 if has_y else None))
    for begin in range(start, n, chunk):
        end = min(n, begin + chunk)
        xs = tuple(x[begin:end] for x in problem.inputs)
        y = problem.targets[begin:end] if has_y else None
        with math_sdpa():  # per chunk: no global SDPA state is held across a yield
            g = batched(problem.primals, xs, y)
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

    def prepare(self) -> "ModelOperator":
        """Builds the cached state (graphs, per-sample gradients, closures) now rather than
        at the first product; timing code calls it before the clock starts."""
        if not self._ready:
            with math_sdpa():
                self._build()
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
        with math_sdpa():
            if b == 1:
                out = [t.unsqueeze(0) for t in self._single([t[0] for t in V])]
            else:
                out = self._batched(V)
        self.matvecs += b
        return out

    def _single(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t[0] for t in self._batched([t.unsqueeze(0) for t in v])]

    def _traced_products(self, fn, make):
        """make(jv) = (single, batched) products with jv = the forward-mode linearization of fn
        at the parameters, traced once; None when tracing or vmap over the traced graph fails
        (tracing is an optimization: the caller keeps its plain jvp)."""
        p = self.problem
        try:
            _, jv = _linearize(fn, p.primals)
            one, many = make(jv)
            probe = [torch.zeros(2, *s, dtype=self.dtype, device=self.device)
                     for s in self.shapes]
            many(p.as_dict(probe))  # vmap over the traced graph must work too
            return one, many
        except Exception:  # noqa: BLE001
            return None

    def _batched(self, V: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


def _linearize(fn, primals):
    with warnings.catch_warnings():
        # const_fold's "get_attr Node with no underlying reference" is internal to
        # torch.func.linearize's tracing and harmless: not the user's concern.
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        return tfunc.linearize(fn, primals)


def _import_func_transforms(device) -> None:
    """A vmapped jvp of a grad on a 2-vector: the first such call in a process imports what
    torch.func's transforms need (1.8 s measured), which would otherwise land in the first
    product (an untimed trial of 'auto', but wall time of the caller's first estimator).
    float32 whatever the model's dtype: the imports do not depend on it, and every device
    computes in float32."""
    x = torch.zeros(2, 2, device=device)
    tfunc.vmap(lambda v: tfunc.jvp(tfunc.grad(lambda p: (p * p).sum()), (x[0],), (v,))[1])(x)


def _out_of_memory(err: Exception) -> bool:
    """An allocation failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError): the
    size of the product's fault, not the method's, so 'auto' does not drop the method."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or \
        "not enough memory" in text


def _zeros_for_none(grads, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


class HessianOperator(ModelOperator):
    """H = d^2 L / d theta^2 of the batch loss over the selected parameters (Pearlmutter 1994,
    "Fast exact multiplication by the Hessian").

    Two Hessian-vector products:
    - ``double_backward``: g = dL/dtheta is computed once with create_graph=True and kept;
      H v = d<g, v>/dtheta is a backward through that graph (retain_graph). A batch goes
      through ``torch.autograd.grad(is_grads_batched=True)`` (vmap over the backward), or a
      loop of single products if some op has no batching rule.
    - ``forward_over_reverse``: H v = jvp(grad L)(theta; v) (``torch.func``), a batch through
      ``torch.func.vmap`` over the tangents: the primal forward and backward run once per
      call, shared by its b vectors. With ``linearize=True`` the jvp is traced once
      (``torch.func.linearize``: the primal parts folded into constants), so a product runs
      only the tangent computation; the trace costs seconds for a transformer (about 2,000
      traced ops), worth it for many products (falls back to plain jvp if tracing fails).
      Measured on the bench models (bench/curvature_matvec_rows.py, 2 CPU cores): batches
      1.4-2.0x faster per vector than 'auto' without it, a trace of 0.6-3.5 s, paid back
      after 170-380 vectors. With 'auto' the traced product is the forward-over-reverse
      candidate.

    ``method="auto"`` builds both at the first product and picks, for each batch size b, the
    fastest way to compute it from the timings of the products the caller asks for
    (``curvature_method_choice.OnlineChoice``): for one vector double backward or
    forward-over-reverse; for a batch either vmapped product or a loop of the chosen single
    product (whose cost per vector is the single product's, so it needs no trial of its own,
    and batches run as that loop until the single product is chosen: on 1-2 CPU cores an HVP
    is compute-bound and the loop often wins, batched element-wise ops falling out of cache).
    The first calls at each b go round the candidates (2 timed calls each, interleaved; a
    path's first call at each b is not timed: it pays lazy initialization and the allocator's
    growth to the new sizes, measured 1.2-1.4x a later call at b = 16; a candidate 1.5x
    slower than the best after one call gets no second), later calls use the fastest. Every
    trial is one of the caller's products: no probe products are spent on the choice (timing
    on probes at build cost 60 counted products per operator). ``choices`` maps b to the path
    chosen ("double_backward", "forward_over_reverse" or "loop") and ``timings`` to the
    seconds per vector measured per path. The double-backward graph is freed once no choice
    uses it (and rebuilt if a later batch size's trials want it).
    A method that fails to build or run (an op without forward-mode AD or double backward,
    or without a batching rule) is left out, for single and batched products or for batched
    ones only, its exception kept in ``method_errors`` (keys "<method>" and
    "<method> (batched)"), and the product is redone another way; an allocation failure is
    raised, not taken for the method's. A forced method serves every product, untimed.
    """

    _TRIALS = 2
    _PRUNE = 1.5
    _METHODS = ("double_backward", "forward_over_reverse")

    def __init__(self, problem: ModelProblem, method: str = "auto", linearize: bool = False):
        _check_method(method)
        super().__init__(problem)
        self.method = method
        self.linearize = linearize
        self.choice = OnlineChoice(self._TRIALS, self._PRUNE)
        self.method_errors: dict[str, Exception] = {}
        self.linearized: bool | None = None
        self._db_batched_ok = True
        self._warm: set[tuple[str, int]] = set()  # (path, b) that have run once

    @property
    def choices(self) -> dict[int, str]:
        """Batch size -> the path chosen for it ('auto' only; empty while on trial)."""
        return dict(self.choice.choices)

    @property
    def timings(self) -> dict[int, dict[str, float]]:
        """Batch size -> path -> the fastest measured seconds per vector ('auto' only)."""
        return {b: {c: min(t) for c, t in ts.items() if t}
                for b, ts in self.choice.timings.items()}

    @property
    def single_method(self) -> str | None:
        """The method of single products: the forced one, or auto's choice (None before)."""
        return self.method if self.method != "auto" else self.choice.choices.get(1)

    # -- double backward ---------------------------------------------------------------
    def _build_double_backward(self):
        p = self.problem
        self._leaves = [t.detach().requires_grad_() for t in p.as_list(p.primals)]
        loss = p.loss(p.as_dict(self._leaves))
        if not (torch.is_tensor(loss) and loss.dim() == 0):
            raise ValueError(f"loss_fn: must return a scalar tensor, got {_describe(loss)}")
        grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        # Gradient entries that do not depend on the parameters (None, or constant) have zero
        # second derivative: they are left out of the backward.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads: list[torch.Tensor] | None = [grads[i] for i in self._live]

    def _db(self, V: list[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        if self._grads is None:  # released by 'auto' (_release_unused), wanted again
            self._build_double_backward()
        if not self._live:
            return [torch.zeros_like(v) for v in V]
        outs = [V[i] for i in self._live]
        if batched and not self._db_batched_ok:
            cols = [self._db([v[j] for v in V], False) for j in range(V[0].shape[0])]
            return [torch.stack(c) for c in zip(*cols)]
        try:
            res = torch.autograd.grad(self._grads, self._leaves, outs, retain_graph=True,
                                      allow_unused=True, is_grads_batched=batched)
        except RuntimeError:
            if not batched:
                raise
            # vmap over the backward hit an op without a batching rule: loop from now on.
            self._db_batched_ok = False
            return self._db(V, True)
        return _zeros_for_none(res, V)

    # -- forward over reverse ----------------------------------------------------------
    def _build_forward_over_reverse(self):
        p = self.problem
        y_primal, y_tangent = p.forward_ad_targets()

        def loss(params, *y):
            return p.loss_fn(p.call(params), y[0] if y else p.targets)
        grad_fn = tfunc.grad(loss)

        def hvp(v):
            return tfunc.jvp(grad_fn, (p.primals, *y_primal), (v, *y_tangent))[1]
        self._for_single, self._for_batched = hvp, tfunc.vmap(hvp)
        _import_func_transforms(self.device)
        traced = (self._traced_products(lambda params: grad_fn(params, *y_primal),
                                        lambda lin: (lin, tfunc.vmap(lin)))
                  if self.linearize else None)
        if traced is not None:
            self._for_single, self._for_batched = traced
        self.linearized = traced is not None

    def _for(self, V, batched):
        p = self.problem
        fn = self._for_batched if batched else self._for_single
        return p.as_list(fn(p.as_dict(V)))

    # -- dispatch ----------------------------------------------------------------------
    def _build(self):
        builders = {"double_backward": self._build_double_backward,
                    "forward_over_reverse": self._build_forward_over_reverse}
        if self.method != "auto":  # forced: its errors are the user's to see
            builders[self.method]()
            return
        for name, build in builders.items():
            try:
                build()
            except Exception as err:  # noqa: BLE001  auto: a method that fails is skipped
                self.method_errors[name] = err
        if len(self.method_errors) == len(builders):
            raise self.method_errors["double_backward"]

    def _product(self, path: str, V, batched: bool):
        if path == "loop":
            cols = [self._single([t[j] for t in V]) for j in range(V[0].shape[0])]
            return [torch.stack(c) for c in zip(*cols)]
        if path == "double_backward":
            return self._db(V, batched)
        return self._for(V, batched)

    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels are asynchronous: time their completion
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _usable(self, batched: bool) -> list[str]:
        """The methods that have not failed: at build, or at run time for this kind of
        product (a failure of a vmapped product leaves the method's single products)."""
        return [m for m in self._METHODS if m not in self.method_errors
                and not (batched and f"{m} (batched)" in self.method_errors)]

    def _chosen(self, V, batched: bool):
        b = V[0].shape[0] if batched else 1
        while True:
            candidates, fixed = self._usable(batched), None
            if batched:
                if 1 not in self.choice.choices or not candidates:
                    # The loop costs what single products do: learn that first (its single
                    # products are trials at b = 1). Or no vmapped product is left.
                    return self._product("loop", V, True)
                single = self.choice.best_time(1)
                if single is None:  # one single method, chosen untimed: time the loop too
                    candidates = candidates + ["loop"]
                else:
                    fixed = {"loop": single}
            was_decided = b in self.choice.choices
            path = self.choice.next(b, candidates, fixed)
            warm = path == "loop" or (path, b) in self._warm
            timed = b not in self.choice.choices and warm
            try:
                t0 = self._clock() if timed else 0.0
                out = self._product(path, V, batched)
                if timed:
                    self.choice.record(b, path, (self._clock() - t0) / b)
            except Exception as err:  # noqa: BLE001  a method that fails on some input
                if path == "loop" or _out_of_memory(err) or not batched and len(candidates) == 1:
                    raise  # nothing else to try, or a failure of resources, not of the method
                if batched:
                    self.method_errors[f"{path} (batched)"] = err
                    self.choice.drop(path, min_size=2)
                else:
                    self.method_errors[path] = err
                    self.choice.drop(path)
                    self.choice.reopen("loop")  # its cost was the failed method's, maybe
                continue
            self._warm.add((path, b))
            if not was_decided and b in self.choice.choices:  # this call made the choice
                self._release_unused()
            return out

    def _release_unused(self) -> None:
        """Frees the double-backward graph (the gradient graph of the whole batch, kept for
        its products) once the single product is chosen and no choice uses double backward:
        forward-over-reverse keeps no state between products. A later batch size whose trials
        want double backward rebuilds it (one forward and backward), its first call untimed."""
        single = self.choice.choices.get(1)
        if single is None or getattr(self, "_grads", None) is None:
            return
        uses = {single if c == "loop" else c for c in self.choice.choices.values()}
        if "double_backward" not in uses:
            self._grads = self._leaves = None
            self._warm = {(path, b) for path, b in self._warm if path != "double_backward"}

    def _single(self, v):
        if self.method != "auto":
            return self._product(self.method, v, False)
        return self._chosen(v, False)

    def _batched(self, V):
        if self.method != "auto":
            return self._product(self.method, V, True)
        return self._chosen(V, True)


class GGNOperator(ModelOperator):
    """Generalized Gauss-Newton G = J^T H_L J (Schraudolph 2002, "Fast curvature
    matrix-vector products for second-order gradient descent"; Martens 2020, "New insights
    and perspectives on the natural gradient method"): J = d output / d theta, H_L = the
    Hessian of the loss wrt the output. PSD when the loss is convex in the output (mean
    squared error, cross-entropy).

    G v: J v by forward mode (``torch.func.jvp`` of the model output; a batch through
    ``vmap``, the primal forward shared by its vectors; with ``linearize=True`` traced once by
    ``torch.func.linearize`` so that no product reruns the primal forward), H_L u by
    forward-over-reverse on the loss of the output kept from the first product, J^T w by the
    ``torch.func.vjp`` closure (autograd graph) kept from the first product.
    """

    psd = True

    def __init__(self, problem: ModelProblem, linearize: bool = False):
        super().__init__(problem)
        self.linearize = linearize
        self.linearized: bool | None = None

    def _build(self):
        p = self.problem
        out, vjp_fn = tfunc.vjp(p.call, p.primals)
        out = torch.utils._pytree.tree_map(
            lambda t: t.detach() if torch.is_tensor(t) else t, out)
        y_primal, y_tangent = p.forward_ad_targets()

        def loss_of_output(o, *y):
            return p.loss_fn(o, y[0] if y else p.targets)
        loss_grad = tfunc.grad(loss_of_output)

        def hl(u):
            return tfunc.jvp(loss_grad, (out, *y_primal), (u, *y_tangent))[1]

        def make(jv):
            def ggn1(v):
                return vjp_fn(hl(jv(v)))[0]
            return ggn1, tfunc.vmap(ggn1)

        def jv_plain(v):
            return tfunc.jvp(p.call, (p.primals,), (v,))[1]
        self._one, self._many = make(jv_plain)
        traced = self._traced_products(p.call, make) if self.linearize else None
        if traced is not None:
            self._one, self._many = traced
        self.linearized = traced is not None

    def _single(self, v):
        p = self.problem
        return p.as_list(self._one(p.as_dict(v)))

    def _batched(self, V):
        p = self.problem
        return p.as_list(self._many(p.as_dict(V)))


class FisherOperator(ModelOperator):
    """Empirical Fisher F = (1/N) sum_i g_i g_i^T, g_i the gradient of the loss of sample i
    alone, loss_fn(model(x_i[None]), y_i[None]) (Kunstner, Hennig & Balles 2019, "Limitations
    of the empirical Fisher approximation"). PSD, rank <= N.

    The per-sample gradients are computed once (``torch.func.vmap(torch.func.grad)``, in
    chunks of `chunk_size` samples) and kept as ``per_sample`` (list of [N, *shape]);
    F V = G^T (G V) / N tensor by tensor: S = sum_t G_t V_t^T [N, b] (block_gram), then
    (F V)_t = S^T G_t / N. Memory N x P.
    """

    psd = True

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
            callable ``(name, parameter) -> bool``. The others are held fixed.
        blocks: "module" (one block per owning module: '0.weight', '0.bias' -> '0'),
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


def _check_method(method) -> None:
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method: expected one of {HESSIAN_METHODS}, got {_describe(method)}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_describe(value)}")


def _problem(model, loss_fn, batch, params, blocks, per_sample=False) -> ModelProblem:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch: expected a pair (inputs, targets), got {_describe(batch)}")
    return ModelProblem(model, loss_fn, batch, params, blocks, inputs=batch[0],
                        per_sample=per_sample)

"""The Hessian operator of a model: Hessian-vector products by double backward and by
forward-over-reverse, and the online choice between them (method="auto"). Conventions (batch,
parameters, SDPA math kernel): curvature_model_problem."""

from __future__ import annotations

import time
import warnings

import torch
import torch.func as tfunc
from torch.utils._python_dispatch import TorchDispatchMode

from .curvature_method_choice import OnlineChoice
from .curvature_model_problem import LossError as _LossError
from .curvature_model_problem import ModelOperator, ModelProblem, _describe
from .curvature_model_problem import scalar_loss as _scalar_loss

__all__ = ["HessianOperator", "HESSIAN_METHODS"]

HESSIAN_METHODS = ("auto", "double_backward", "forward_over_reverse")


def _check_method(method) -> None:
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method: expected one of {HESSIAN_METHODS}, got {_describe(method)}")


def _import_func_transforms(device) -> None:
    """A vmapped jvp of a grad on a 2-vector: the first such call in a process imports what
    torch.func's transforms need (1.8 s measured), which would otherwise land in the first
    product (an untimed trial of 'auto', but wall time of the caller's first estimator).
    float32 whatever the model's dtype: the imports do not depend on it, and every device
    computes in float32."""
    x = torch.zeros(2, 2, device=device)
    with warnings.catch_warnings():
        # The imports script torch-internal helpers: 18 "torch.jit.script is deprecated"
        # warnings about torch's own code, nothing the caller can act on.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=DeprecationWarning)
        tfunc.vmap(lambda v: tfunc.jvp(tfunc.grad(lambda p: (p * p).sum()), (x[0],), (v,))[1])(x)


# torch.func.linearize of a gradient through these ops kills the process (a segmentation fault
# in torch 2.13, reproduced with a bare nn.Linear and F.mse_loss, reduction mean or sum): there
# is no exception for the fallback to plain jvp to catch, so a loss that calls one is not traced.
_UNTRACEABLE_GRAD_OPS = frozenset({"aten::mse_loss"})
# Ops whose double backward is wrong in torch 2.13: a double-backward Hessian through them would
# be silently wrong, so it is refused. aten::_weight_norm_interface (the fused kernel of
# nn.utils.parametrizations.weight_norm / torch._weight_norm, dim 0 or last): its first
# derivative is right, but gradgradcheck fails and a weight-normed Linear's (v, v) block was off
# by 78% on CPU in float64 (measured against g v / ||v|| written out). Forward-mode AD is not
# implemented for it (torch raises), so no Hessian method serves such a model.
_WRONG_DOUBLE_BACKWARD_OPS = frozenset({"aten::_weight_norm_interface"})


class _OpNames(TorchDispatchMode):
    """Records the names of the ATen ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _ops_called(fn) -> set[str]:
    """The ATen ops of one evaluation of fn, without autograd (one forward pass)."""
    with torch.no_grad(), _OpNames() as rec:
        fn()
    return rec.names



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
      Measured on the bench models (bench/curvature_matvec_rows.py, 2 CPU cores, at
      360f191): batches 1.34-1.88x faster per vector than 'auto' without it, a build of
      0.8-5.0 s (the trace and its check against the plain jvp), paid back after 230-430
      vectors. With 'auto' the traced product is the forward-over-reverse
      candidate. ``linearized`` says whether the trace is in use; a loss that calls
      ``F.mse_loss`` is not traced (torch.func.linearize of its gradient crashes the process
      in torch 2.13), and a trace whose products do not reproduce the plain jvp's on random
      probes, calls after the first included, is dropped (in-place ops make the traced graph
      overwrite its own constants: a residual block's ``out += x``, ``nn.RNN``/``GRU``/``LSTM``,
      BCE with logits' gradient gave products 5% to 100x off); ``linearize_skipped`` says why,
      and the plain jvp serves.

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

    Reproducibility: a forced method gives bitwise the same products for the same input and
    thread count (the project's determinism rule); 'auto' does not across runs, because the
    path that serves depends on wall-clock timings and the two methods round differently
    (a trace of the demo model differed in the 8th digit, 5.8721642471 vs 5.8721642842):
    force the method where bitwise replay matters.
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
        self.linearize_skipped: str | None = None  # why linearize=True did not trace
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
        with _OpNames() as rec:  # below autograd: the graph is built as usual
            loss = _scalar_loss(p.loss(p.as_dict(self._leaves)))
        wrong = rec.names & _WRONG_DOUBLE_BACKWARD_OPS
        if wrong:
            raise NotImplementedError(
                f"hessian: the model calls {', '.join(sorted(wrong))}, whose double backward "
                f"is wrong in torch {torch.__version__.split('+')[0]} (gradgradcheck fails), so "
                f"a double-backward Hessian would be silently wrong; for weight_norm, remove "
                f"the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or "
                f"write the weight as g * v / v.norm(dim=1, keepdim=True)")
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
        except RuntimeError as err:
            if not batched or _out_of_memory(err):
                raise  # an allocation failure is the batch's size, not a missing batching rule
            # vmap over the backward hit an op without a batching rule: loop from now on.
            self._db_batched_ok = False
            return self._db(V, True)
        return _zeros_for_none(res, V)

    # -- forward over reverse ----------------------------------------------------------
    def _build_forward_over_reverse(self):
        p = self.problem
        y_primal, y_tangent = p.forward_ad_targets()

        def loss(params, *y):
            return _scalar_loss(p.loss_fn(p.call(params), y[0] if y else p.targets))
        grad_fn = tfunc.grad(loss)

        def hvp(v):
            return tfunc.jvp(grad_fn, (p.primals, *y_primal), (v, *y_tangent))[1]
        self._for_single, self._for_batched = hvp, tfunc.vmap(hvp)
        _import_func_transforms(self.device)
        traced = None
        if self.linearize:
            untraceable = _ops_called(lambda: loss(p.primals, *y_primal)) & _UNTRACEABLE_GRAD_OPS
            if untraceable:
                self.linearize_skipped = (f"the loss calls {', '.join(sorted(untraceable))}, "
                                          "whose gradient torch.func.linearize cannot trace")
            else:
                traced = self._traced_products(lambda params: grad_fn(params, *y_primal),
                                               lambda lin: (lin, tfunc.vmap(lin)), hvp)
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
            except _LossError:
                raise  # the caller's loss, not the method: every method would fail on it
            except Exception as err:  # noqa: BLE001  auto: a method that fails is skipped
                self.method_errors[name] = err
        if len(self.method_errors) == len(builders):
            err = self.method_errors["forward_over_reverse"]
            raise self._every_method_failed("forward_over_reverse", err) from err

    def _every_method_failed(self, path: str, err: Exception) -> Exception:
        """The error of 'auto' when its last method fails: every method's own reason (the
        library's message for a method refused earlier, e.g. weight norm's double backward,
        had been hidden behind torch's error for the last one), NotImplementedError when
        each one was."""
        errors = {k: v for k, v in self.method_errors.items() if k != path}
        if not errors:
            return err
        errors[path] = err
        cls = (NotImplementedError if all(isinstance(e, NotImplementedError)
                                          for e in errors.values()) else RuntimeError)
        return cls("hessian (method='auto'): no method can serve this model and loss: "
                   + "; ".join(f"{k}: {type(e).__name__}: {e}" for k, e in errors.items()))

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
                if path == "loop" or isinstance(err, _LossError) or _out_of_memory(err):
                    raise  # a failure of the loop's single products, or not of the method
                if not batched and len(candidates) == 1:
                    raise self._every_method_failed(path, err) from err  # nothing else to try
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

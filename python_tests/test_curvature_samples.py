"""Sample-space curvature (per-sample gradients, NTK and gradient Grams, Fisher trace and
eigenvalues, Gram log-determinants) against explicit float64 references: Python loops of
torch.autograd.grad and explicit Jacobians (python_tests/reference.py), numpy.linalg.

Tolerances: a Gram entry is a dot product over the P parameters of per-sample rows that were
themselves computed with rounding of order gamma_n = n eps (n = N x fan-in x depth, as in
test_curvature_operators.py), so entries agree within 2 gamma_n max|K| plus P eps max|K| for
the length-P accumulation. Eigenvalues of a symmetric matrix move by at most the 2-norm of
the perturbation (Weyl), bounded by N times that entrywise bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import reference as R
from curvature_problems import CONFIGS, problem  # noqa: F401
from gradience_kernels import curvature_samples as cs

pytestmark = pytest.mark.usefixtures("one_thread")



def entry_tolerance(model, batch, ref: torch.Tensor, dtype, depth: int = 4) -> float:
    fan_in = max(p[0].numel() if p.dim() > 1 else 1 for p in model.parameters())
    P = sum(p.numel() for p in model.parameters())
    n = batch[0].shape[0] * fan_in * depth + P
    eps = torch.finfo(dtype).eps
    return 2 * n * eps / (1 - n * eps) * float(ref.abs().max())


def assert_close(got, ref, tol):
    err = float((torch.as_tensor(got).double() - torch.as_tensor(ref).double()).abs().max())
    assert err <= tol, f"max |error| {err:.3e} > tolerance {tol:.3e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_sample_gradients_match_a_loop(name):
    model, loss_fn, batch = problem(name)
    ref = R.explicit_per_sample_gradients(model, loss_fn, batch)
    tol = entry_tolerance(model, batch, ref, torch.float64)
    whole = cs.per_sample_gradients(model, loss_fn, batch)
    assert [t.shape for t in whole] == [torch.Size([batch[0].shape[0], *p.shape])
                                        for p in model.parameters()]
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in whole], 1)
    assert_close(flat, ref, tol)
    chunked = cs.per_sample_gradients(model, loss_fn, batch, chunk_size=3)
    for a, b in zip(whole, chunked):
        assert_close(a, b, tol)
    # the mean of the per-sample gradients is the batch gradient (mean loss)
    params = list(model.parameters())
    full = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)
    for g, t in zip(full, whole):
        assert_close(t.mean(0), g, tol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ntk_gram_matches_explicit_jacobians(name):
    model, _, (x, _) = problem(name)
    ref = R.explicit_ntk_gram(model, x)
    K = cs.ntk_gram(model, x, chunk_size=4)  # chunks split the batch
    assert K.shape == (x.shape[0], x.shape[0]) and K.dtype == torch.float64
    assert torch.equal(K, K.T)
    assert_close(K, ref, entry_tolerance(model, (x,), ref, torch.float64))
    ref1 = R.explicit_ntk_gram(model, x, output_index=1)
    K1 = cs.ntk_gram(model, x, output_index=1)
    assert_close(K1, ref1, entry_tolerance(model, (x,), ref1, torch.float64))


def test_ntk_gram_two_chunk_recompute_path(monkeypatch):
    # Above the memory budget the Gram holds two chunks at a time and recomputes chunks;
    # force that path on a tiny model: same matrix.
    model, _, (x, _) = problem("mlp")
    keep = cs.ntk_gram(model, x, chunk_size=3)
    monkeypatch.setattr(cs, "_keep", lambda *a, **k: False)
    calls = []
    original = cs._chunked_gram

    def spy(rows, n, chunk, keep_all, dtype, device):
        calls.append(keep_all)
        return original(rows, n, chunk, keep_all, dtype, device)
    monkeypatch.setattr(cs, "_chunked_gram", spy)
    again = cs.ntk_gram(model, x, chunk_size=3)
    assert calls == [False]
    assert_close(again, keep, entry_tolerance(model, (x,), keep, torch.float64))
    ref = R.explicit_gradient_gram(*problem("mlp"))
    assert_close(cs.gradient_gram(*problem("mlp"), chunk_size=4), ref,
                 entry_tolerance(model, (x,), ref, torch.float64))


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_gradient_gram_and_subset(name):
    model, loss_fn, batch = problem(name)
    ref = R.explicit_gradient_gram(model, loss_fn, batch)
    assert_close(cs.gradient_gram(model, loss_fn, batch), ref,
                 entry_tolerance(model, batch, ref, torch.float64))
    names = [n for n, _ in model.named_parameters()][-2:]
    sub = R.explicit_gradient_gram(model, loss_fn, batch, names)
    assert_close(cs.gradient_gram(model, loss_fn, batch, params=names), sub,
                 entry_tolerance(model, batch, sub, torch.float64))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fisher_trace_and_block_traces(name):
    model, loss_fn, batch = problem(name)
    F = R.explicit_fisher(model, loss_fn, batch)
    res = cs.fisher_trace(model, loss_fn, batch, chunk_size=4)
    tol = entry_tolerance(model, batch, torch.diagonal(F), torch.float64) * F.shape[0]
    assert_close(res.trace, torch.trace(F), tol)
    assert float(res) == float(res.trace)
    assert res.num_samples == batch[0].shape[0]
    # per-block traces: the traces of the diagonal blocks (one per module)
    start, blocks = 0, {}
    for n, p in model.named_parameters():
        blocks.setdefault(n.rpartition(".")[0] or "<root>", []).extend(
            range(start, start + p.numel()))
        start += p.numel()
    assert list(res.block_traces) == list(blocks)
    for b, idx in blocks.items():
        assert_close(res.block_traces[b], torch.diagonal(F)[idx].sum(), tol)
    assert_close(sum(res.block_traces.values()), res.trace, tol)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fisher_eigs_match_numpy(name):
    model, loss_fn, batch = problem(name)
    F = R.explicit_fisher(model, loss_fn, batch).numpy()
    ref = np.linalg.eigvalsh(F)[::-1][:5]
    got = cs.fisher_eigs(model, loss_fn, batch, k=5)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert bool((got[:-1] >= got[1:]).all())
    # Weyl: |lambda_i(F + E) - lambda_i(F)| <= ||E||_2 <= P max|E_ij|
    tol = entry_tolerance(model, batch, torch.as_tensor(F), torch.float64) * F.shape[0]
    assert_close(got, ref.copy(), tol)


def test_gram_eigenvalues_and_logdet_match_numpy():
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(9, 30, generator=gen, dtype=torch.float64)
    K = A @ A.T
    lam = cs.gram_eigenvalues(K)
    ref = np.linalg.eigvalsh(K.numpy())[::-1]
    scale = float(lam[0])
    assert_close(lam, ref.copy(), 9 * 9 * np.finfo(np.float64).eps * scale)
    sign, logabs = np.linalg.slogdet(K.numpy())
    assert sign == 1
    # log det error <= sum_i |d lambda_i| / lambda_i <= n * (n eps ||K||) / lambda_min
    tol = 9 * 9 * np.finfo(np.float64).eps * scale / float(lam[-1])
    assert abs(float(cs.gram_logdet(K)) - logabs) <= tol
    jit = float(cs.gram_logdet(K, jitter=0.5))
    assert abs(jit - np.linalg.slogdet(K.numpy() + 0.5 * np.eye(9))[1]) <= tol
    # float32 Grams are accepted (computed in float64): the rounding of K to float32 is the
    # perturbation, eps32 instead of eps64 in the same bound
    tol32 = 9 * 9 * np.finfo(np.float32).eps * scale / float(lam[-1])
    assert abs(float(cs.gram_logdet(K.float())) - logabs) <= tol32


def test_singular_gram_needs_jitter():
    # N = 6 samples, P = 3 parameters: the NTK Gram J J^T has rank <= 3 < 6.
    model = nn.Linear(2, 1).double()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K = cs.ntk_gram(model, x)
    with pytest.raises(ValueError, match="gram: singular to working precision"):
        cs.gram_logdet(K)
    got = float(cs.gram_logdet(K, jitter=1e-3))
    ref = np.linalg.slogdet(R.explicit_ntk_gram(model, x).numpy() + 1e-3 * np.eye(6))
    assert ref[0] == 1
    # Each eigenvalue of the two computations differs by <= 2 n eps ||K|| (Weyl); the log
    # moves by that over the smallest shifted eigenvalue, >= the jitter.
    lam_max = float(cs.gram_eigenvalues(K)[0])
    assert abs(got - ref[1]) <= 6 * 2 * 6 * np.finfo(np.float64).eps * lam_max / 1e-3


def test_float32_samples():
    model, loss_fn, batch = problem("mlp", torch.float32)
    ref = R.explicit_gradient_gram(model, loss_fn, batch)
    G = cs.gradient_gram(model, loss_fn, batch)
    assert G.dtype == torch.float32
    assert_close(G, ref, entry_tolerance(model, batch, ref, torch.float32))
    K = cs.ntk_gram(model, batch[0])
    refK = R.explicit_ntk_gram(model, batch[0])
    assert K.dtype == torch.float32
    assert_close(K, refK, entry_tolerance(model, batch, refK, torch.float32))


def test_inputs_not_mutated_and_sdpa_model_under_default_backend():
    model, loss_fn, batch = problem("transformer")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0 = batch[0].clone(), batch[1].clone()
    cs.per_sample_gradients(model, loss_fn, batch)
    cs.ntk_gram(model, batch[0])
    cs.fisher_trace(model, loss_fn, batch)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(batch[0], x0) and torch.equal(batch[1], y0)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs():
    model, loss_fn, batch = problem("mlp")
    x, y = batch
    with pytest.raises(ValueError, match="k: expected a positive int"):
        cs.fisher_eigs(model, loss_fn, batch, k=0)
    with pytest.raises(ValueError, match="k: 11 exceeds min"):
        cs.fisher_eigs(model, loss_fn, batch, k=11)
    with pytest.raises(ValueError, match="chunk_size: expected None or a positive int"):
        cs.ntk_gram(model, x, chunk_size=-1)
    with pytest.raises(ValueError, match="output_index: 4 is out of range"):
        cs.ntk_gram(model, x, output_index=4)
    with pytest.raises(TypeError, match="output_index: expected None or an int"):
        cs.ntk_gram(model, x, output_index=1.0)
    with pytest.raises(ValueError, match="params: unknown parameter name"):
        cs.gradient_gram(model, loss_fn, batch, params=["head.w"])
    with pytest.raises(ValueError, match="per-sample gradients slice dim 0"):
        cs.per_sample_gradients(model, loss_fn, (x, y[:-1]))
    with pytest.raises(ValueError, match="batch: expected a pair"):
        cs.fisher_trace(model, loss_fn, [x])
    with pytest.raises(ValueError, match="gram: expected a non-empty square matrix"):
        cs.gram_logdet(torch.ones(2, 3))
    with pytest.raises(TypeError, match="gram: expected a float dtype"):
        cs.gram_eigenvalues(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="gram: has non-finite entries"):
        cs.gram_logdet(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="jitter: expected a finite float >= 0"):
        cs.gram_logdet(torch.eye(2), jitter=-1.0)
    with pytest.raises(TypeError, match="jitter: expected a finite float >= 0"):
        cs.gram_logdet(torch.eye(2), jitter="0.1")
    with pytest.raises(TypeError, match="k: expected a positive int"):
        cs.fisher_eigs(model, loss_fn, batch, k=2.0)
    with pytest.raises(ValueError, match="gram: not positive semi-definite"):
        cs.gram_logdet(-torch.eye(3, dtype=torch.float64))
    # NumPy and 0-d tensor scalars are numbers like any other
    want = math.log(1.1) * 2
    for jitter in (np.float32(0.1), np.float64(0.1), torch.tensor(0.1, dtype=torch.float64)):
        assert abs(float(cs.gram_logdet(torch.eye(2, dtype=torch.float64), jitter=jitter))
                   - want) <= 1e-7
    assert torch.equal(cs.fisher_eigs(model, loss_fn, batch, k=np.int64(2)),
                       cs.fisher_eigs(model, loss_fn, batch, k=2))

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, t):
            return (t @ self.w).sum()
    with pytest.raises(ValueError, match="model: ntk_gram needs an output tensor"):
        cs.ntk_gram(Scalar(), torch.ones(3, 2, dtype=torch.float64))

"""randomized_svd: HMT accuracy bounds on known spectra, the a-posteriori error bound, agreement
with torch.svd_lowrank on the same Gaussian draws, hypothesis-generated shapes/dtypes/scales
against the NumPy reference, argument errors, determinism, no mutation, CPU/CUDA agreement.

Floating-point allowances are c eps sqrt(max(m, n)) s_1 with c = 8: the size of the rounding of
length-max(m, n) inner products (probabilistic sqrt(n) growth) in the few products and
orthogonalizations between A and the factors; exact-arithmetic bounds (HMT) get this added.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from gradience_kernels.spectral import hmt_expected_error_bound, randomized_svd


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch/BLAS thread


def fp_allowance(dtype: torch.dtype, shape, s1: float, c: float = 8.0) -> float:
    return c * torch.finfo(dtype).eps * math.sqrt(max(shape)) * s1


def known_matrix(m: int, n: int, p: float, seed: int, batch: tuple[int, ...] = ()):
    """U diag(sigma) V^T with sigma_i = i^-p and Haar-like orthogonal U, V (QR of Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** (-p)
    return (U * sigma) @ V.mT, sigma


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def true_error(A: torch.Tensor, r) -> torch.Tensor:
    approx = (r.U.double() * r.S.double().unsqueeze(-2)) @ r.V.double().mT
    return torch.linalg.matrix_norm(A.double().cpu() - approx.cpu(), ord=2)


# --------------------------------------------------------------------------- HMT bounds
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n_iter", [0, 1, 2])
def test_singular_values_within_hmt_expected_bound(p, n_iter):
    """sigma_i - S_i <= ||(I - QQ^T)A|| (Weyl; S are the singular values of QQ^T A) whose
    expectation is bounded by HMT Cor. 10.10: per seed, and the mean over seeds."""
    rank, oversample = 20, 10
    per_seed = []
    for seed in range(10):
        A, sigma = known_matrix(300, 200, p, seed)
        bound = hmt_expected_error_bound(sigma, rank, oversample, n_iter)
        r = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter, generator=gen(100 + seed))
        err = (r.S - sigma[:rank]).abs().max().item()
        assert err <= bound + fp_allowance(torch.float64, A.shape, 1.0), (seed, err, bound)
        assert bool((r.S <= sigma[:rank] + fp_allowance(torch.float64, A.shape, 1.0)).all())
        per_seed.append(err)
    assert float(np.mean(per_seed)) <= bound


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_hmt_bound_batched_and_float32(p):
    rank, oversample, n_iter = 16, 10, 1
    A, sigma = known_matrix(150, 100, p, 7, batch=(3,))
    bound = hmt_expected_error_bound(sigma, rank, oversample, n_iter)
    errs = []
    for seed in range(3):
        r = randomized_svd(A.float(), rank, oversample=oversample, n_iter=n_iter,
                           generator=gen(seed))
        assert r.S.dtype == torch.float32 and r.S.shape == (3, rank)
        # A.float() differs from A by at most eps32 ||A|| in spectral norm per entry rounding:
        # sqrt(mn) eps32/2 bounds it (Frobenius), Weyl moves sigma by no more.
        rounding = math.sqrt(150 * 100) * torch.finfo(torch.float32).eps / 2
        err = (r.S.double() - sigma[:rank]).abs().amax(dim=-1)
        fp = fp_allowance(torch.float32, A.shape[-2:], 1.0)
        assert bool((err <= bound + rounding + fp).all())
        errs.append(err)
    assert float(torch.stack(errs).mean()) <= bound + rounding


def test_hmt_bound_formula():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    k, p, q = 1, 3, 0
    tail = sigma[k:]
    expected = (1 + math.sqrt(k / (p - 1))) * 2.0 + math.e * math.sqrt(k + p) / p * float(
        torch.sqrt((tail ** 2).sum()))
    assert hmt_expected_error_bound(sigma, k, p, q) == pytest.approx(expected, rel=1e-12)
    q = 2
    e = 2 * q + 1
    expected = ((1 + math.sqrt(k / (p - 1))) * 2.0 ** e + math.e * math.sqrt(k + p) / p * float(
        torch.sqrt((tail ** (2 * e)).sum()))) ** (1 / e)
    assert hmt_expected_error_bound(sigma, k, p, q) == pytest.approx(expected, rel=1e-12)
    assert hmt_expected_error_bound(sigma, 3, 3, 1) == 0.0  # k + p covers the whole range
    with pytest.raises(ValueError, match="oversample"):
        hmt_expected_error_bound(sigma, 1, 1, 0)


# --------------------------------------------------------------------------- error estimate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_estimate_brackets_true_error(dtype):
    cases = []
    for p in (0.5, 1.0, 2.0):
        cases.append(known_matrix(120, 80, p, 3)[0])
    g = gen(5)
    cases.append(torch.randn(90, 60, generator=g, dtype=torch.float64))                 # flat
    cases.append(torch.randn(70, 4, generator=g, dtype=torch.float64)
                 @ torch.randn(4, 100, generator=g, dtype=torch.float64))             # rank 4, wide
    for A in cases:
        A = A.to(dtype)
        for seed in range(25):
            for rank, oversample, n_iter in ((4, 0, 0), (10, 5, 1), (10, 10, 2), (40, 2, 0)):
                r = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter,
                                   generator=gen(1000 + seed))
                true = true_error(A, r).item()
                assert true <= r.error_estimate.item(), (seed, rank, true, r.error_estimate.item())


def test_error_estimate_batched_shapes():
    A, _ = known_matrix(60, 50, 1.0, 0, batch=(2, 3))
    r = randomized_svd(A, 5, generator=gen(0))
    assert r.U.shape == (2, 3, 60, 5) and r.S.shape == (2, 3, 5) and r.V.shape == (2, 3, 50, 5)
    assert r.error_estimate.shape == (2, 3)
    assert bool((true_error(A, r) <= r.error_estimate).all())


# --------------------------------------------------------------------------- vs torch.svd_lowrank
@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_as_accurate_as_svd_lowrank_on_the_same_draws(shape, dtype, n_iter):
    """Same Omega (torch.svd_lowrank draws randn(min(m,n), q) from the default generator; ours the
    same numbers from a generator with the same seed): the same subspace, so the same singular
    values up to rounding, and ours at least as close to the exact ones up to rounding."""
    rank, oversample = 16, 10
    for seed in range(4):
        A, sigma = known_matrix(*shape, 1.0, seed)
        A = A.to(dtype)
        exact = torch.from_numpy(ref.svd_values(A))[:rank]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _, s_lr, _ = torch.svd_lowrank(A, q=rank + oversample, niter=n_iter)
        r = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter, generator=gen(seed))
        tol = fp_allowance(dtype, shape, 1.0)
        assert torch.allclose(r.S.double(), s_lr[:rank].double(), rtol=0, atol=tol)
        ours = (r.S.double() - exact).abs().max().item()
        theirs = (s_lr[:rank].double() - exact).abs().max().item()
        assert ours <= theirs + tol, (seed, ours, theirs)


# --------------------------------------------------------------------------- hypothesis
SCALES64 = [1e-30, 1e-8, 1.0, 1e8, 1e30]
SCALES32 = [1e-30, 1e-4, 1.0, 1e4, 1e30]  # float32 / bfloat16 inputs: the scale-safe paths


@st.composite
def matrices(draw, max_dim: int = 24):
    """(tensor, rank): shapes 1xn, nx1, square, wide, tall, optionally batched; float32/64 or
    bfloat16 input; Gaussian, exactly rank-deficient or all-zero; scales 1e-30..1e30."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    form = draw(st.sampled_from(["row", "col", "square", "wide", "tall", "any"]))
    a = draw(st.integers(1, max_dim))
    b = draw(st.integers(1, max_dim))
    m, n = {"row": (1, b), "col": (a, 1), "square": (a, a), "wide": (min(a, b), max(a, b)),
            "tall": (max(a, b), min(a, b)), "any": (a, b)}[form]
    batch = draw(st.sampled_from([(), (), (2,), (3, 1)]))
    kind = draw(st.sampled_from(["gauss", "gauss", "lowrank", "zero"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        x = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    elif kind == "lowrank":
        k = draw(st.integers(1, min(m, n)))
        x = torch.randn(*batch, m, k, generator=g, dtype=torch.float64) @ torch.randn(
            *batch, k, n, generator=g, dtype=torch.float64)
    else:
        x = torch.zeros(*batch, m, n, dtype=torch.float64)
    scale = draw(st.sampled_from(SCALES64 if dtype == torch.float64 else SCALES32))
    x = (x * scale).to(dtype)
    rank = draw(st.integers(1, min(m, n)))
    return x, rank


def compute_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def check_against_reference(A: torch.Tensor, rank: int, r) -> None:
    m, n = A.shape[-2:]
    sigma = torch.from_numpy(ref.svd_values(A.cpu()))                 # (..., min(m, n))
    s1 = float(sigma.max()) if sigma.numel() else 0.0
    eps = compute_eps(A.dtype)
    tol = 8 * eps * math.sqrt(max(m, n)) * s1
    S = r.S.double().cpu()
    err = r.error_estimate.double().cpu()
    assert bool(torch.isfinite(S).all()) and bool(torch.isfinite(err).all())
    assert bool((S[..., :-1] >= S[..., 1:]).all())
    # Weyl: 0 <= sigma_i - S_i <= ||A - U S V^T|| <= error_estimate
    assert bool((S <= sigma[..., :rank] + tol).all())
    assert bool((sigma[..., :rank] - S <= err.unsqueeze(-1) + tol).all())
    assert bool((true_error(A, r) <= err + tol).all())
    if rank == min(m, n):  # the whole range: exact up to rounding
        assert bool(((S - sigma) .abs() <= tol + 0 * S).all())
    for F in (r.U, r.V):
        F = F.double().cpu()
        eye = torch.eye(rank, dtype=torch.float64)
        assert bool(((F.mT @ F - eye).abs() <= 8 * eps * math.sqrt(max(m, n)) + 0 * eye).all())


@given(matrices(), st.sampled_from([(0, 0), (2, 1), (10, 2)]))
def test_hypothesis_against_numpy(case, params):
    A, rank = case
    oversample, n_iter = params
    before = A.clone()
    r = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter, generator=gen(0))
    assert torch.equal(A, before)
    check_against_reference(A, rank, r)


@given(st.lists(matrices(max_dim=12), min_size=1, max_size=5))
def test_hypothesis_lists_of_mixed_shapes(cases):
    # one compute dtype per list: float64 entries cast to float32 unless all are float64
    tensors = [a for a, _ in cases]
    if not all(t.dtype == torch.float64 for t in tensors):
        tensors = [t.float() if t.dtype == torch.float64 else t for t in tensors]
    rank = min(min(t.shape[-2:]) for t in tensors)
    rank = min(rank, min(k for _, k in cases))
    befores = [t.clone() for t in tensors]
    res = randomized_svd(tensors, rank, generator=gen(1))
    assert isinstance(res, list) and len(res) == len(tensors)
    for t, b, r in zip(tensors, befores, res):
        assert torch.equal(t, b)
        assert r.U.shape == (*t.shape[:-1], rank)
        assert r.V.shape == (*t.shape[:-2], t.shape[-1], rank)
        check_against_reference(t, rank, r)


def test_list_groups_match_the_batched_computation():
    g = gen(3)
    X, Y, Z = (torch.randn(20, 12, generator=g) for _ in range(3))
    W = torch.randn(7, 30, generator=g)
    res = randomized_svd([X, W, Y, Z], 5, generator=gen(9))
    batch = randomized_svd(torch.stack([X, Y, Z]), 5, generator=gen(9))
    for i, r in zip((0, 1, 2), (res[0], res[2], res[3])):
        assert torch.equal(r.S, batch.S[i]) and torch.equal(r.U, batch.U[i])
        assert torch.equal(r.error_estimate, batch.error_estimate[i])
    assert res[1].U.shape == (7, 5) and res[1].V.shape == (30, 5)


def test_deterministic_given_generator_and_householder_agrees():
    A, _ = known_matrix(80, 60, 1.0, 1)
    r1 = randomized_svd(A, 10, generator=gen(4))
    r2 = randomized_svd(A, 10, generator=gen(4))
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    r3 = randomized_svd(A, 10, generator=gen(4), orthogonalization="householder", small_svd="svd")
    assert torch.allclose(r1.S, r3.S, rtol=0, atol=fp_allowance(torch.float64, A.shape, 1.0))


def test_cholesky_failure_falls_back_to_householder():
    """Exactly rank-2 matrix with l = 12: the Gram matrices are singular, Cholesky fails, the
    Householder fallback gives an orthonormal basis and the exact top values."""
    g = gen(0)
    A = torch.randn(50, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 40, generator=g,
                                                                        dtype=torch.float64)
    r = randomized_svd(A, 5, oversample=7, generator=gen(1))
    sigma = torch.from_numpy(ref.svd_values(A))
    tol = fp_allowance(torch.float64, A.shape, float(sigma[0]))
    assert torch.allclose(r.S, sigma[:5], rtol=0, atol=tol)
    assert torch.allclose(r.U.mT @ r.U, torch.eye(5, dtype=torch.float64), atol=1e-12)


# --------------------------------------------------------------------------- errors
def test_argument_errors():
    A = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 4\].*rank=5"):
        randomized_svd(A, 5)
    with pytest.raises(ValueError, match="rank must be >= 1, got rank=0"):
        randomized_svd(A, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        randomized_svd(A, True)
    with pytest.raises(TypeError, match="rank must be an int"):
        randomized_svd(A, 2.0)
    with pytest.raises(ValueError, match="oversample must be >= 0, got oversample=-1"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter must be >= 0, got n_iter=-2"):
        randomized_svd(A, 2, n_iter=-2)
    with pytest.raises(ValueError, match="n_error_vectors must be >= 1"):
        randomized_svd(A, 2, n_error_vectors=0)
    with pytest.raises(TypeError, match="A: expected a float dtype, got dtype=torch.int64"):
        randomized_svd(torch.ones(3, 3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="A: expected a float dtype"):
        randomized_svd(torch.ones(3, 3, dtype=torch.complex64), 1)
    with pytest.raises(ValueError, match=r"A: expected a matrix \(\.\.\., m, n\), got shape="):
        randomized_svd(torch.ones(5), 1)
    with pytest.raises(ValueError, match=r"A: empty matrix, got shape=\(0, 3\)"):
        randomized_svd(torch.ones(0, 3), 1)
    with pytest.raises(ValueError, match=r"A: empty matrix, got shape=\(0, 3, 3\)"):
        randomized_svd(torch.ones(0, 3, 3), 1)
    with pytest.raises(ValueError, match="non-empty list"):
        randomized_svd([], 1)
    with pytest.raises(TypeError, match=r"A\[1\]: expected a tensor, got list"):
        randomized_svd([A, [1.0]], 1)
    with pytest.raises(ValueError, match=r"for A\[1\] of shape \(2, 9\), got rank=3"):
        randomized_svd([A, torch.randn(2, 9)], 3)
    with pytest.raises(ValueError, match="one compute dtype"):
        randomized_svd([A, A.double()], 1)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        randomized_svd(A, 1, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="orthogonalization must be one of"):
        randomized_svd(A, 1, orthogonalization="gram_schmidt")
    with pytest.raises(ValueError, match="small_svd must be"):
        randomized_svd(A, 1, small_svd="eigh")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        randomized_svd(A, 1, generator=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_rejected(bad, dtype):
    A = torch.randn(5, 4).to(dtype)
    A[2, 1] = bad
    before = A.clone()
    kind = "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"
    with pytest.raises(ValueError, match=f"A: non-finite entries are not allowed, found {kind}"):
        randomized_svd(A, 2)
    with pytest.raises(ValueError, match=r"A\[1\]: non-finite"):
        randomized_svd([torch.randn(3, 3).to(dtype), A], 2)
    assert torch.equal(A.isnan(), before.isnan())
    assert torch.equal(A.nan_to_num(), before.nan_to_num())


# --------------------------------------------------------------------------- devices
def test_device_agrees_with_cpu(device):
    """A CPU generator gives every device the same draws: results agree within rounding."""
    A, sigma = known_matrix(90, 70, 1.0, 2, batch=(2,))
    A32 = A.float()
    cpu = randomized_svd(A32, 8, generator=gen(6))
    dev = randomized_svd(A32.to(device), 8, generator=gen(6))
    assert dev.S.device.type == device.type
    tol = fp_allowance(torch.float32, A.shape[-2:], 1.0)
    assert torch.allclose(dev.S.cpu(), cpu.S, rtol=0, atol=tol)
    assert torch.allclose(dev.error_estimate.cpu(), cpu.error_estimate, rtol=1e-3, atol=tol)
    assert bool((true_error(A32, dev) <= dev.error_estimate.cpu()).all())
    if device.type == "cuda":  # the device's own generator also works
        g = torch.Generator(device=device).manual_seed(0)
        r = randomized_svd(A32.to(device), 8, generator=g)
        assert bool((true_error(A32, r) <= r.error_estimate.cpu()).all())


def test_cuda_mixed_devices_rejected(device):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="one device"):
        randomized_svd([torch.randn(3, 3), torch.randn(3, 3, device=device)], 1)

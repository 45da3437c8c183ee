"""Tests of gradience_kernels.curvature_eigen: Lanczos, power iteration, stability margin, SLQ.

References: numpy.linalg.eigvalsh / scipy.sparse.linalg.eigsh of the explicit float64 matrix
(MatrixOperator with a known spectrum A = Q diag(lambda) Q^T, Q a random orthogonal matrix),
explicit float64 Hessians of a tiny model (reference.explicit_hessian), dense float64
re-implementations of PyHessian's power iteration and of the SLQ quadrature
(reference.power_iteration_deflated, reference.slq_nodes_weights), and dense quadratic forms
r^T A^p r of the same Rademacher probes.

Tolerances. ``||A||`` is the spectral norm. A Ritz pair (theta, x), ||x|| = 1, has an
eigenvalue of A within ||A x - theta x|| (Weyl / Bauer-Fike for symmetric A; Parlett 1998,
Thm 4.5.1): every eigenvalue test checks |theta_i - lambda_i| against the true residual
computed in float64, which is the bound, not a tuned number. Lanczos stops when the recurrence
residual is <= tol * ||A|| (tol = eps^(2/3): 3.7e-11 float64, 2.4e-5 float32), and the true
residual exceeds the recurrence one by the rounding of the matvecs and of the Gram-Schmidt
passes, at most sqrt(P) eps ||A|| per step (a dot product of P terms; 1e-14 ||A|| in float64 at
P = 2000): hence the issue's acceptance, 1e-8 (float64) and 1e-4 (float32) relative to ||A||,
holds with margin, and is asserted as well.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from gradience_kernels.curvature_eigen import (EigenResult, SpectralDensity, StabilityMargin,
                                               lanczos, power_iteration, slq_density,
                                               stability_margin)
from gradience_kernels.curvature_kernels import gaussian, rademacher
from gradience_kernels.curvature_operators import MatrixOperator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch/BLAS thread

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------- fixtures
@functools.lru_cache(maxsize=None)
def _orthogonal(P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    Q, R = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed


def _uneven_shapes(P: int) -> list[tuple[int, ...]]:
    """Three or four tensors of uneven shapes holding P entries."""
    a = max(1, P // 10)
    b = max(1, P // 7)
    rest = P - 3 * a - b
    assert rest >= 1
    if rest % 2 == 0 and rest >= 4:
        return [(3, a), (b,), (2, rest // 2, 1)] if P > 20 else [(3, a), (b,), (rest,)]
    return [(3, a), (b,), (rest,)]


def _spectral_matrix(lams, seed: int = 0) -> torch.Tensor:
    lams = torch.as_tensor(np.asarray(lams, dtype=np.float64))
    Q = _orthogonal(lams.numel(), seed)
    A = (Q * lams) @ Q.T
    return (A + A.T) / 2


def _op(A: torch.Tensor, dtype=torch.float64, shapes=None) -> MatrixOperator:
    P = A.shape[0]
    return MatrixOperator(A.to(dtype), shapes=shapes or _uneven_shapes(P))


def _spectrum(kind: str, P: int, seed: int = 0) -> np.ndarray:
    """Known spectra of P values: outliers at both ends, clustered, PSD with a bulk near 0."""
    rng = np.random.default_rng(seed)
    if kind == "outliers":
        ends = [50.0, 30, 20, 12, 9, 7, -40, -25, -15, -10, -8, -6]
        bulk = np.clip(rng.normal(0, 1, P), -3, 3)
    elif kind == "clustered":
        # Pairs 1e-3 ||A|| apart: resolvable (the residual tolerance is ~1e-10 ||A||), and
        # slow for Lanczos (the gap ratio enters its convergence rate).
        ends = [10.0, 10 - 1e-2, 9, 9 - 1e-2, 8, 7.99, -10, -10 + 1e-2, -9, -9 + 1e-2, -8, -7.99]
        bulk = rng.uniform(-2, 2, P)
    elif kind == "psd_bulk":
        ends = [30.0, 22, 17, 13, 11, 9]
        bulk = rng.gamma(0.5, 0.5, P)
    else:
        raise ValueError(kind)
    ends = np.asarray(ends[:P], dtype=np.float64)
    return np.concatenate([ends, bulk[:P - ends.size]])


@functools.lru_cache(maxsize=None)
def _case(kind: str, P: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(A, numpy.linalg.eigvalsh(A)) for a known spectrum, built once per module."""
    A = _spectral_matrix(_spectrum(kind, P, seed))
    return A, np.linalg.eigvalsh(A.numpy())


def _near_some_eigenvalue(theta, res, ev, slack) -> bool:
    """Each theta_i within res_i (+ slack) of an eigenvalue (Bauer-Fike, symmetric A)."""
    gaps = np.abs(np.asarray(theta)[:, None] - ev[None, :]).min(1)
    return bool(np.all(gaps <= np.asarray(res) + slack))


def _true_residuals(A: torch.Tensor, result: EigenResult, op) -> np.ndarray:
    """||A x - theta x|| / ||x|| in float64 for the returned vectors."""
    X = op.flatten(result.eigenvectors).to(torch.float64)
    theta = result.eigenvalues.to(torch.float64)
    R = X @ A - theta[:, None] * X
    return (R.norm(dim=1) / X.norm(dim=1)).numpy()


def _expected(ev: np.ndarray, k: int, which: str) -> np.ndarray:
    return ev[::-1][:k] if which == "largest" else ev[:k]


# --------------------------------------------------------------------------- Lanczos
_CASES = [(P, kind) for P in (10, 60, 400) for kind in ("outliers", "clustered", "psd_bulk")]
_CASES.append((2000, "outliers"))


@pytest.mark.parametrize("P,kind", _CASES)
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_lanczos_matches_eigvalsh(P, kind, which, dtype, reorth):
    """Both reorthogonalization schemes. reorth='partial' (Simon's omega recurrence,
    curvature_orthogonality) keeps the basis semi-orthogonal, |q_i^T q_j| <= min(sqrt(eps),
    tol), which keeps T's eigenvalues those of the projection to O(eps ||A||) (Simon 1984), and
    its reported residuals include what its full passes remove outside T: the same checks hold
    (the true residual within the reported one plus the rounding floor), with the Ritz vectors
    orthonormal to sqrt(eps) instead of working precision, on the same matvecs as full
    (measured)."""
    if kind == "psd_bulk" and which == "smallest" and P > 60:
        pytest.skip("bottom of a dense bulk near 0: Lanczos needs ~P steps (covered at P <= 60)")
    A, ev = _case(kind, P)
    norm = np.abs(ev).max()
    op = _op(A, dtype)
    k = 5
    r = lanczos(op, k=k, which=which, return_vectors=True, reorth=reorth)
    assert r.all_converged and r.method == "lanczos"
    assert r.matvecs == op.matvecs <= min(P, 200)
    if reorth == "full":
        assert r.full_reorthogonalizations == r.iterations
    else:
        assert r.matvecs <= lanczos(_op(A, dtype), k=k, which=which).matvecs + 2
        assert r.full_reorthogonalizations < r.iterations or r.iterations <= 2
    theta = r.eigenvalues.numpy()
    want = _expected(ev, k, which)
    err = np.abs(theta - want)
    res = _true_residuals(A, r, op)
    # Bauer-Fike: each value within its true residual (+ the float64 rounding of computing it)
    # of an eigenvalue. Not necessarily of lambda_i: residuals cannot tell that an eigenvalue
    # inside a cluster narrower than the tolerance has not been reached yet (the float32 runs at
    # the bottom of the PSD bulk, where 50 eigenvalues lie within 1e-4 ||A|| of 0).
    assert _near_some_eigenvalue(theta, res, ev, 1e-13 * norm), (err, res)
    unresolved = kind == "psd_bulk" and which == "smallest" and dtype == torch.float32
    if not unresolved:
        assert np.all(err <= res + 1e-13 * norm), (err, res)
    # The reported residual is the recurrence's: the true one exceeds it by the rounding floor
    # (sqrt(P) eps ||A|| per step, see the module docstring), with fl(A) - A for float32
    # (bounded by its Frobenius norm).
    eps = EPS64 if dtype == torch.float64 else EPS32
    floor = 10 * math.sqrt(P) * eps * norm
    if dtype == torch.float32:
        floor += float(torch.linalg.matrix_norm(A.float().double() - A, "fro"))
    assert np.all(res <= r.residuals.numpy() + floor)
    assert np.all(r.residuals.numpy() <= r.tol * norm)
    if reorth == "partial" and dtype == torch.float64:
        # The components its full passes removed are combined per Ritz vector, not added in
        # quadrature: the reported residual is the true one to rounding (quadrature was 1-3%
        # short on the smallest end of the 60-entry outliers, measured).
        assert np.all(np.abs(res - r.residuals.numpy()) <= 1e-3 * res + floor), (res, r.residuals)
    # Cauchy interlacing: Ritz values of an orthonormal basis never pass lambda_i.
    sign = 1 if which == "largest" else -1
    assert np.all(sign * (theta - want) <= floor)
    # The acceptance: relative to ||A|| (for the outlier ends, |lambda_i| >= ||A|| / 8).
    if not unresolved:
        assert err.max() <= (1e-8 if dtype == torch.float64 else 1e-4) * norm
    # Ritz vectors: orthonormal to working precision (full) or to sqrt(eps) (partial).
    X = op.flatten(r.eigenvectors).double()
    gram_err = (X @ X.T - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert gram_err <= (1e3 * eps if reorth == "full" else math.sqrt(eps))


def test_lanczos_matches_eigsh():
    """scipy.sparse.linalg.eigsh (ARPACK, tol=0: machine precision) on the same matrix."""
    P = 400
    A = _spectral_matrix(_spectrum("outliers", P, seed=3), seed=1)
    norm = float(torch.linalg.matrix_norm(A, 2))
    lin = scipy.sparse.linalg.LinearOperator((P, P), matvec=lambda x: A.numpy() @ x,
                                             dtype=np.float64)
    for which, arpack in [("largest", "LA"), ("smallest", "SA")]:
        ref = np.sort(scipy.sparse.linalg.eigsh(lin, k=5, which=arpack, tol=0,
                                                return_eigenvectors=False))
        ref = ref[::-1] if which == "largest" else ref
        r = lanczos(_op(A), k=5, which=which)
        assert np.abs(r.eigenvalues.numpy() - ref).max() <= 1e-8 * norm


def test_lanczos_exhausts_small_space():
    """P <= max_iter: after P steps T is A in an orthonormal basis: every eigenvalue, exact."""
    P = 10
    A = _spectral_matrix(_spectrum("outliers", P, seed=5), seed=2)
    ev = np.linalg.eigvalsh(A.numpy())
    op = _op(A)
    r = lanczos(op, k=P, which="smallest")
    assert r.all_converged and r.matvecs <= P
    assert np.abs(r.eigenvalues.numpy() - ev).max() <= 100 * EPS64 * np.abs(ev).max()


def test_lanczos_repeated_eigenvalues_block():
    """A triple eigenvalue at the top: one start vector sees one direction of the eigenspace
    (exact arithmetic); a block of >= 3 vectors sees all three (Golub and Underwood 1977)."""
    P = 300
    lams = np.concatenate([[10.0, 10, 10, 8, 7, 6], np.random.default_rng(2).uniform(-1, 1, P - 6)])
    A = _spectral_matrix(lams)
    ev = np.linalg.eigvalsh(A.numpy())
    for dtype, rtol in [(torch.float64, 1e-8), (torch.float32, 1e-4)]:
        op = _op(A, dtype)
        r = lanczos(op, k=5, block_size=3, return_vectors=True)
        assert r.all_converged and r.matvecs % 3 == 0
        err = np.abs(r.eigenvalues.numpy() - ev[::-1][:5])
        assert np.all(err <= _true_residuals(A, r, op) + 1e-13 * 10)
        assert err.max() <= rtol * 10


def test_lanczos_invariant_subspaces_restart():
    """Three distinct eigenvalues of multiplicity 10, 20, 10: the Krylov space of any vector is
    invariant after 3 steps. Each restart (a new probe orthogonal to the basis) finds one more
    copy; the run stops once a closed segment's top value is no better than the k-th wanted."""
    lams = np.array([3.0] * 10 + [1.0] * 20 + [-2.0] * 10)
    A = _spectral_matrix(lams, seed=4)
    cases = [("largest", 5, [3.0] * 5), ("smallest", 12, [-2.0] * 10 + [1.0] * 2)]
    for (which, k, want), reorth in [(c, s) for c in cases for s in ("full", "partial")]:
        op = _op(A)
        r = lanczos(op, k=k, which=which, reorth=reorth)
        assert r.all_converged and r.restarts >= 1
        assert np.abs(r.eigenvalues.numpy() - want).max() <= 1e-12
        assert r.matvecs < 40   # short of exhausting the space


def test_lanczos_start_and_restarts_reach_every_eigenvector():
    """Structured operators on which +-1 start and restart probes (the probes before Gaussian
    ones) miss an eigenvector exactly: [[2, 1], [1, 2]] (a start (1, -1) is orthogonal to the
    top eigenvector (1, 1)), the Hadamard-rotated diag(4, 3, 2, 1), an axis-aligned repeated
    top eigenvalue ([3, 3, 2, 1]: a restart probe in the span of the basis; [5] * 4 + [1] * 30:
    a restart probe without a component on the last copy of 5). Every seed must find the true
    top values, and the converged flags must not claim otherwise."""
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    cases = [(np.array([[2.0, 1], [1, 2]]), 1),
             (hadamard @ np.diag([4.0, 3, 2, 1]) @ hadamard.T, 2),
             (np.diag([3.0, 3, 2, 1]), 2),
             (np.diag([5.0] * 4 + [1.0] * 30 + [0.0] * 6), 5)]
    for A, k in cases:
        want = np.sort(np.linalg.eigvalsh(A))[::-1][:k]
        for seed in range(8):
            for reorth in ("full", "partial"):
                r = lanczos(MatrixOperator(torch.from_numpy(A)), k=k, seed=seed, reorth=reorth)
                assert r.all_converged
                assert np.abs(r.eigenvalues.numpy() - want).max() <= 1e-12, (A.shape, seed)


def test_power_iteration_structured_starts_and_stalls():
    """The all-ones matrix: a zero-sum +-1 start gives A v = 0 (the probes before Gaussian ones
    returned eigenvalue 0, converged). diag(3, -3, 1, 0.5): the quotient of a +-3 pair stalls
    at ~0 with residual ||A v||; PyHessian's change rule passes it, ``converged`` must not."""
    ones = MatrixOperator(torch.ones(4, 4, dtype=torch.float64))
    for seed in range(8):
        r = power_iteration(ones, k=1, seed=seed)
        assert r.all_converged and abs(float(r.eigenvalues[0]) - 4.0) <= 1e-12
    pair = MatrixOperator(torch.diag(torch.tensor([3.0, -3.0, 1.0, 0.5], dtype=torch.float64)))
    with pytest.warns(RuntimeWarning, match="stalled"):
        r = power_iteration(pair, k=1)
    assert not r.converged[0] and float(r.residuals[0]) > 1.0


def test_operator_returning_its_input():
    """An identity operator that hands back its input batch: the estimators orthogonalize the
    products in place, so they must copy them rather than edit their own basis. Every
    eigenvalue is 1 (multiplicity P): each step closes an invariant segment."""
    from gradience_kernels.curvature_operators import CurvatureOperator

    class Identity(CurvatureOperator):
        def _matmat(self, V):  # counted by the base class
            return list(V)

    op = Identity([torch.Size([3, 4]), torch.Size([5])], torch.float64, "cpu")
    r = lanczos(op, k=3, return_vectors=True)
    assert torch.equal(r.eigenvalues, torch.ones(3, dtype=torch.float64)) and r.matvecs == 3
    X = op.flatten(r.eigenvectors)
    assert (X @ X.T - torch.eye(3, dtype=torch.float64)).abs().max() <= 1e-15
    assert torch.allclose(power_iteration(op, k=2).eigenvalues, torch.ones(2, dtype=torch.float64))
    d = slq_density(op, n_probes=3, steps=5)
    assert (d.lengths == 1).all() and d.moment(3) == (1.0, 0.0)


def test_lanczos_not_converged_warns():
    A, _ = _case("clustered", 400)
    op = _op(A)
    with pytest.warns(RuntimeWarning, match="not converged"):
        r = lanczos(op, k=5, max_iter=8)
    assert r.matvecs == 8 and not r.all_converged
    assert r.converged.dtype == torch.bool and r.converged.shape == (5,)


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_lanczos_low_precision_basis(basis_dtype, reorth):
    """A float64 operator with the basis stored in a lower precision.

    Measured (P = 400, outliers spectrum; see also curvature_eigen.lanczos' docstring):
    max |theta - lambda| / ||A|| ~ 1e-9 (float32 basis), ~5e-6 (float16), ~1e-4 (bfloat16),
    against ~1e-15 with a float64 basis; true residuals ~0.1 eps_basis ||A||, matched by the
    reported residuals, which include the stored rows' rounding (rows q + delta enter
    A Q = Q T + r e^T - F with F e_j = beta_j delta_{j+1})."""
    P = 400
    A, ev = _case("outliers", P)
    norm = np.abs(ev).max()
    op = _op(A)
    r = lanczos(op, k=5, basis_dtype=basis_dtype, return_vectors=True, reorth=reorth)
    eps_b = torch.finfo(basis_dtype).eps
    assert r.tol == max(EPS64 ** (2 / 3), eps_b) and r.all_converged
    err = np.abs(r.eigenvalues.numpy() - ev[::-1][:5])
    res = _true_residuals(A, r, op)
    assert np.all(err <= res + 1e-13 * norm)               # Bauer-Fike
    # The reported residuals track the true ones: the delta terms are summed in quadrature
    # (independent roundings), a factor sqrt(#terms) from a strict bound; 3 covers it here.
    assert np.all(res <= 3 * r.residuals.numpy() + 1e-12 * norm)
    assert np.all(r.residuals.numpy() <= r.tol * norm)
    # Hence |theta - lambda| <= eps_basis ||A||, the default tolerance.
    assert err.max() <= eps_b * norm


@settings(max_examples=25, deadline=None)
@given(P=st.integers(1, 40), k=st.integers(1, 6), which=st.sampled_from(["largest", "smallest"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1),
       n_tensors=st.integers(1, 4), reorth=st.sampled_from(["full", "partial"]))
def test_lanczos_random_symmetric(P, k, which, dtype, seed, n_tensors, reorth):
    """GOE matrices (distinct eigenvalues almost surely) over random tensor splits."""
    k = min(k, P)
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = (G + G.T) / 2
    cuts = sorted(torch.randperm(max(P - 1, 1), generator=g)[:n_tensors - 1].add(1).tolist())
    sizes = np.diff([0] + [c for c in cuts if c < P] + [P]).tolist()
    op = MatrixOperator(A.to(dtype), shapes=[(s,) for s in sizes if s > 0])
    r = lanczos(op, k=k, which=which, seed=seed % 1000, reorth=reorth)
    ev = np.linalg.eigvalsh(A.numpy())
    norm = max(np.abs(ev).max(), 1e-300)
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    assert r.all_converged
    assert np.abs(r.eigenvalues.numpy() - _expected(ev, k, which)).max() <= rtol * norm


# --------------------------------------------------------------------------- power iteration
def test_power_iteration_matches_pyhessian_reference():
    """The same iterates as a dense float64 PyHessian loop from the same start vectors."""
    P = 300
    A = _spectral_matrix(_spectrum("outliers", P, seed=7), seed=3)
    op = _op(A)
    r = power_iteration(op, k=4, tol=1e-8, max_iter=2000)
    starts = op.flatten(gaussian(op.shapes, 4, 0, dtype=torch.float64)).numpy()
    vals, vecs, iters = reference.power_iteration_deflated(A.numpy(), starts, 1e-8, 2000)
    assert r.iterations == int(iters.sum()) == r.matvecs == op.matvecs
    assert np.abs(r.eigenvalues.numpy() - vals).max() <= 1e-10 * np.abs(vals).max()
    X = op.flatten(r.eigenvectors).numpy()
    assert np.abs(np.abs(np.sum(X * vecs, 1)) - 1).max() <= 1e-8


def test_power_iteration_deflation_largest_magnitude():
    """Found in order of |lambda|: 50, -40, 30, -25, 20 (Lanczos 'largest' gives 50, 30, 20,
    12, 9). Each value is within its residual of an eigenvalue (Bauer-Fike)."""
    P = 400
    A, ev = _case("outliers", P)
    norm = np.abs(ev).max()
    op = _op(A)
    r = power_iteration(op, k=5, tol=1e-10, max_iter=5000)
    want = np.array([50.0, -40, 30, -25, 20])
    assert r.all_converged
    err = np.abs(r.eigenvalues.numpy() - want)
    assert np.all(err <= r.residuals.numpy() + 1e-12 * norm)
    assert err.max() <= 1e-6 * norm
    lz = lanczos(op, k=5)
    assert np.abs(lz.eigenvalues.numpy() - [50, 30, 20, 12, 9]).max() <= 1e-8 * norm
    # Lanczos needs far fewer products for the same values (the bench criterion).
    assert 5 * lz.matvecs <= r.matvecs


def test_power_iteration_budget_warns():
    A = _spectral_matrix(_spectrum("clustered", 200))
    op = _op(A)
    with pytest.warns(RuntimeWarning, match="not converged"):
        r = power_iteration(op, k=2, tol=1e-14, max_iter=7)
    assert r.matvecs == 14 and not r.converged.any()


# --------------------------------------------------------------------------- stability margin
def test_stability_margin_float_and_operator():
    m = stability_margin(30.0, lr=0.05)
    assert isinstance(m, StabilityMargin)
    assert m.threshold == 2 / 0.05 and m.margin == 2 / 0.05 - 30.0 and m.matvecs == 0
    m = stability_margin(torch.tensor(45.0, dtype=torch.float64), lr=0.05, momentum=0.9)
    assert m.threshold == pytest.approx((2 + 2 * 0.9) / 0.05, rel=1e-15)
    assert m.margin == pytest.approx(m.threshold - 45.0, rel=1e-15)
    A = _spectral_matrix(_spectrum("outliers", 300))
    op = _op(A)
    m = stability_margin(op, lr=0.1)
    assert m.lambda_max == pytest.approx(50.0, rel=1e-10)
    assert m.margin == pytest.approx(20.0 - m.lambda_max, rel=1e-12)
    assert m.matvecs == op.matvecs > 0 and m.converged
    m2 = stability_margin(op, lr=0.1, tol=1e-4, seed=3)       # options reach lanczos
    assert m2.eigen.tol == 1e-4


# --------------------------------------------------------------------------- SLQ
def _probe_rows(op, n, seed):
    return op.flatten(rademacher(op.shapes, n, seed, dtype=torch.float64))


def test_slq_integrates_to_one_and_nodes_in_spectrum():
    P = 500
    A, ev = _case("outliers", P)
    norm = np.abs(ev).max()
    d = slq_density(_op(A), n_probes=6, steps=30)
    assert isinstance(d, SpectralDensity) and d.matvecs == 6 * 30
    # Trapezoid rule on Gaussians with spacing <= sigma / 4: error exp(-2 pi^2 16) (nil); the
    # grid spans the nodes +- 8 sigma (mass outside 1.2e-15); the rest is rounding of ~1e3
    # float64 terms.
    assert abs(d.integral() - 1) <= 1e-12
    assert torch.allclose(d.weights.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-13)
    # Ritz values lie in [lambda_min, lambda_max] (Cauchy interlacing), to rounding.
    assert d.nodes.min() >= ev[0] - 1e-12 * norm and d.nodes.max() <= ev[-1] + 1e-12 * norm
    # The outliers are resolved: the density has bumps near them.
    near = d.density[(d.grid - 50.0).abs().argmin()]
    assert near > 0.5 * (1 / P) / (d.sigma * math.sqrt(2 * math.pi)) / 6
    # A user grid wider than the nodes +- 8 sigma integrates to 1 as well.
    grid = torch.linspace(ev[0] - 10 * d.sigma, ev[-1] + 10 * d.sigma, 20_000,
                          dtype=torch.float64)
    d2 = slq_density(_op(A), n_probes=6, steps=30, grid=grid, sigma=d.sigma)
    assert abs(d2.integral() - 1) <= 1e-12 and torch.equal(d2.grid, grid)


@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_slq_matches_dense_reference_and_quadratic_forms(reorth):
    """Nodes and weights as a dense float64 Lanczos from the same probes; and moment(p) is the
    mean of r^T A^p r / P over the same probes for every p <= 2m - 1 (Gauss quadrature)."""
    P, m, n = 200, 8, 5
    A = _spectral_matrix(_spectrum("outliers", P, seed=1), seed=5)
    norm = float(torch.linalg.matrix_norm(A, 2))
    op = _op(A)
    d = slq_density(op, n_probes=n, steps=m, seed=11, reorth=reorth)
    R = _probe_rows(op, n, 11)
    for l in range(n):
        th, w = reference.slq_nodes_weights(A.numpy(), R[l].numpy(), m)
        assert np.abs(d.nodes[l].numpy() - th).max() <= 1e-11 * norm
        assert np.abs(d.weights[l].numpy() - w).max() <= 1e-9
    assert d.exact_degree == 2 * m - 1
    Ap = torch.eye(P, dtype=torch.float64)
    for p in range(2 * m):
        dense = ((R @ Ap) * R).sum(1) / P
        # Quadrature with T's rounding (c eps ||A|| per node, p-th powers): p eps-multiples of
        # ||A||^p, c <= 10 sqrt(P) (the matvecs' dot products).
        atol = 10 * math.sqrt(P) * EPS64 * max(p, 1) * norm ** p
        assert torch.allclose(d.probe_moments(p), dense, rtol=0, atol=atol), p
        est, se = d.moment(p)
        assert est == pytest.approx(float(dense.mean()), abs=atol)
        assert se == pytest.approx(float(dense.std() / math.sqrt(n)), abs=atol, rel=1e-9)
        Ap = Ap @ A
    with pytest.raises(ValueError, match=r"p=16"):
        d.moment(2 * m)


def test_slq_batched_one_matmat_per_step():
    class Counting(MatrixOperator):
        calls = 0

        def matmat(self, V):
            Counting.calls += 1
            return super().matmat(V)

    P = 120
    op = Counting(_spectral_matrix(_spectrum("outliers", P)), shapes=_uneven_shapes(P))
    d = slq_density(op, n_probes=7, steps=12)
    assert Counting.calls == 12 and d.matvecs == 84 == op.matvecs


def test_slq_exact_when_space_exhausted_or_invariant():
    """P <= steps, or a Krylov space made invariant by few distinct eigenvalues: the
    quadrature is exact for every polynomial (exact_degree None), lengths stop early."""
    P = 6
    A = _spectral_matrix([4.0, 2, 1, -1, 0.5, 3], seed=6)
    op = _op(A, shapes=[(2, 2), (2,)])
    d = slq_density(op, n_probes=3, steps=20)
    assert d.exact_degree is None and (d.lengths <= P).all() and d.matvecs <= 3 * P
    R = _probe_rows(op, 3, 0)
    dense = ((R @ torch.linalg.matrix_power(A, 11)) * R).sum(1) / P
    assert torch.allclose(d.probe_moments(11), dense, rtol=1e-10, atol=0)
    lams = np.array([3.0] * 10 + [1.0] * 20 + [-2.0] * 10)
    A = _spectral_matrix(lams, seed=4)
    d = slq_density(_op(A), n_probes=4, steps=15)
    assert d.exact_degree is None and (d.lengths == 3).all() and d.matvecs == 12
    assert d.moment(8)[0] == pytest.approx(float(np.mean(lams ** 8)), rel=0.5)   # unbiased
    R = _probe_rows(_op(A), 4, 0)
    dense = ((R @ torch.linalg.matrix_power(A, 8)) * R).sum(1) / 40
    assert torch.allclose(d.probe_moments(8), dense, rtol=1e-10, atol=0)


def test_estimators_on_an_operator_whose_products_require_grad():
    """A matrix that requires grad (products carry an autograd graph): SLQ failed in .numpy()
    on its coefficients; every estimator now works on detached products, and the graph of the
    matrix is not touched."""
    A = _spectral_matrix(_spectrum("outliers", 30, seed=1), seed=2).requires_grad_()
    op = MatrixOperator(A)
    d = slq_density(op, n_probes=2, steps=8)
    assert abs(d.integral() - 1) <= 1e-6
    ev = np.linalg.eigvalsh(A.detach().numpy())
    assert abs(float(lanczos(op, k=1).eigenvalues[0]) - ev[-1]) <= 1e-8 * np.abs(ev).max()
    assert A.grad is None and A.requires_grad


def test_slq_default_grid_is_capped():
    """A sigma tiny against the spread of the nodes asked the default grid for billions of
    points (sigma=1e-9 over a spectrum of width 60: 3e10, 242 GB); it is capped at 2^20 with a
    warning that says why and what to pass."""
    op = _op(_spectral_matrix(_spectrum("outliers", 40, seed=3), seed=1))
    with pytest.warns(RuntimeWarning, match="default grid is capped at 1048576"):
        d = slq_density(op, n_probes=2, steps=6, sigma=1e-9)
    assert d.grid.numel() == 1 << 20 and torch.isfinite(d.density).all()


def test_slq_moments_cover_truth():
    """moment(p) estimates tr(A^p) / P with the standard error over probes: over 100 seeds,
    |estimate - truth| <= 3 SE in all but a few. With 16 probes the t statistic has 15 degrees
    of freedom: P(|t| > 3) = 0.009, so >= 7 misses of 100 has probability 2e-5 (binomial)."""
    P = 300
    lams = _spectrum("outliers", P, seed=9)
    A = _spectral_matrix(lams, seed=7)
    op = _op(A)
    truth = {p: float(np.mean(lams ** p)) for p in (1, 2)}
    misses = {1: 0, 2: 0}
    for seed in range(100):
        d = slq_density(op, n_probes=16, steps=2, seed=seed, n_grid=2)
        for p in (1, 2):
            est, se = d.moment(p)
            misses[p] += abs(est - truth[p]) > 3 * se
    assert misses[1] <= 6 and misses[2] <= 6, misses


# --------------------------------------------------------------------------- model Hessians
@pytest.fixture(scope="module")
def tiny_hessian():
    """An MLP of 244 parameters (float64) and its explicit Hessian (reference)."""
    toy_models = pytest.importorskip("gradience_kernels.toy_models")
    from gradience_kernels.curvature_operators import hessian  # noqa: F401
    model, loss_fn, batch = toy_models.make_problem("mlp", dtype=torch.float64, hidden=10)
    H = reference.explicit_hessian(model, loss_fn, batch)
    return model, loss_fn, batch, H


def test_lanczos_on_model_hessian(tiny_hessian):
    """The issue's acceptance: top-5 within 1e-8 (float64 model) and 1e-4 (float32 copy)
    relative of numpy.linalg.eigvalsh of the explicit float64 Hessian."""
    from gradience_kernels.curvature_operators import hessian
    model, loss_fn, batch, H = tiny_hessian
    ev = np.linalg.eigvalsh(H.numpy())
    norm = np.abs(ev).max()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = hessian(model, loss_fn, batch)
    for which, reorth in [(w, s) for w in ("largest", "smallest") for s in ("full", "partial")]:
        r = lanczos(op, k=5, which=which, reorth=reorth)
        want = _expected(ev, 5, which)
        assert r.all_converged
        assert np.abs(r.eigenvalues.numpy() - want).max() <= 1e-8 * norm
        assert np.all(np.abs(r.eigenvalues.numpy() - want) <= 1e-8 * np.abs(want))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model32 = copy.deepcopy(model).float()
    op32 = hessian(model32, loss_fn, (batch[0].float(), batch[1]))
    for which, reorth in [(w, s) for w in ("largest", "smallest") for s in ("full", "partial")]:
        r = lanczos(op32, k=5, which=which, reorth=reorth)
        # The float32 model's Hessian differs from the float64 one by the float32 rounding of
        # the parameters, inputs and products (~1e-6 relative); the residual tolerance is
        # 2.4e-5 ||H||.
        assert r.all_converged
        assert np.abs(r.eigenvalues.numpy() - _expected(ev, 5, which)).max() <= 1e-4 * norm
    m = stability_margin(op, lr=0.5)
    assert m.lambda_max == pytest.approx(ev[-1], rel=1e-8)


def test_slq_on_model_hessian(tiny_hessian):
    """SLQ density of the Hessian integrates to 1; its first two moments are within 3 standard
    errors of tr(H) / P and tr(H^2) / P (fixed seed), and equal the probes' quadratic forms."""
    from gradience_kernels.curvature_operators import hessian
    model, loss_fn, batch, H = tiny_hessian
    op = hessian(model, loss_fn, batch)
    for reorth in ("full", "partial"):
        _check_slq_model(slq_density(op, n_probes=8, steps=24, reorth=reorth), op, H)
    d = slq_density(op, n_probes=8, steps=24, reorth="partial")
    assert d.full_reorthogonalizations < 8 * 24


def _check_slq_model(d, op, H):
    P = op.numel
    assert abs(d.integral() - 1) <= 1e-12
    ev = np.linalg.eigvalsh(H.numpy())
    norm = np.abs(ev).max()
    assert d.nodes.min() >= ev[0] - 1e-12 * norm and d.nodes.max() <= ev[-1] + 1e-12 * norm
    R = _probe_rows(op, 8, 0)
    for p, truth in ((1, np.trace(H.numpy()) / P), (2, float((H * H).sum()) / P)):
        est, se = d.moment(p)
        assert abs(est - truth) <= 3 * se, (p, est, se, truth)
        dense = ((R @ torch.linalg.matrix_power(H, p)) * R).sum(1) / P
        assert est == pytest.approx(float(dense.mean()), abs=1e-10 * norm ** p)


# --------------------------------------------------------------------------- Triton / CUDA
GPU = torch.cuda.is_available()
TDEV = torch.device("cuda" if GPU else "cpu")   # Triton: compiled on a GPU, else interpreted


@pytest.mark.parametrize("basis_dtype", [None, torch.bfloat16])
def test_triton_kernels_match_torch_path(basis_dtype):
    """Lanczos, power iteration and SLQ through the Triton kernels of curvature_kernels
    (compiled on CUDA, under TRITON_INTERPRET=1 on CPU) against the torch path: the same
    iterates to float64 rounding (both reduce in float64; the orders of summation differ),
    and the same matvec counts."""
    pytest.importorskip("triton")
    import gradience_kernels.curvature_kernels as ck
    A, _ = _case("outliers", 60)
    out = {}
    for backend, dev in (("torch", torch.device("cpu")), ("triton", TDEV)):
        op = MatrixOperator(A.to(dev), shapes=_uneven_shapes(60))
        with ck.use_backend(backend):
            r = lanczos(op, k=3, basis_dtype=basis_dtype, return_vectors=True)
            p = power_iteration(op, k=1, tol=1e-6)
            d = slq_density(op, n_probes=2, steps=6)
            # Partial reorthogonalization: local passes on basis views, full ones on some steps.
            rp = lanczos(op, k=3, basis_dtype=basis_dtype, reorth="partial")
            dp = slq_density(op, n_probes=2, steps=6, reorth="partial")
        out[backend] = (r, p, d, rp, dp)
    (r0, p0, d0, rp0, dp0), (r1, p1, d1, rp1, dp1) = out["torch"], out["triton"]
    assert rp0.matvecs == rp1.matvecs
    assert rp0.full_reorthogonalizations == rp1.full_reorthogonalizations
    assert np.abs(rp0.eigenvalues.numpy() - rp1.eigenvalues.numpy()).max() <= 1e-12 * 50
    assert (dp0.nodes - dp1.nodes).abs().max() <= 1e-12 * 50
    assert r0.matvecs == r1.matvecs and p0.matvecs == p1.matvecs and d0.matvecs == d1.matvecs
    assert np.abs(r0.eigenvalues.numpy() - r1.eigenvalues.numpy()).max() <= 1e-12 * 50
    assert np.abs(p0.eigenvalues.numpy() - p1.eigenvalues.numpy()).max() <= 1e-12 * 50
    assert (d0.nodes - d1.nodes).abs().max() <= 1e-12 * 50
    assert (d0.weights - d1.weights).abs().max() <= 1e-12
    X0 = op.flatten([t.cpu() for t in r0.eigenvectors])
    X1 = op.flatten([t.cpu() for t in r1.eigenvectors])
    assert (X0.abs() - X1.abs()).abs().max() <= 1e-9


@pytest.mark.skipif(not GPU, reason="needs a CUDA device (none in this session)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimators_on_cuda(dtype):
    """Everything on the GPU (the Triton kernels by default): the acceptance tolerances."""
    A, ev = _case("outliers", 400)
    norm = np.abs(ev).max()
    op = MatrixOperator(A.to("cuda", dtype), shapes=_uneven_shapes(400))
    r = lanczos(op, k=5, return_vectors=True)
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    assert r.all_converged and r.eigenvectors[0].device.type == "cuda"
    assert np.abs(r.eigenvalues.numpy() - ev[::-1][:5]).max() <= rtol * norm
    d = slq_density(op, n_probes=4, steps=12)
    assert abs(d.integral() - 1) <= 1e-12


# --------------------------------------------------------------------------- bad input
def _bad_cases(op):
    return [
        (lambda: lanczos(op, k=0), ValueError, "k=0"),
        (lambda: lanczos(op, k=op.numel + 1), ValueError, f"k={op.numel + 1}"),
        (lambda: lanczos(op, k=2.0), TypeError, "k=2.0"),
        (lambda: lanczos(op, k=True), TypeError, "k=True"),
        (lambda: lanczos(op, which="top"), ValueError, "which='top'"),
        (lambda: lanczos(op, reorth="selective"), ValueError, "reorth='selective'"),
        (lambda: lanczos(op, block_size=2, reorth="partial"), ValueError, "block_size=2"),
        (lambda: slq_density(op, reorth=None), ValueError, "reorth=None"),
        (lambda: lanczos(op, tol=0.0), ValueError, "tol=0.0"),
        (lambda: lanczos(op, tol=-1e-3), ValueError, "tol=-0.001"),
        (lambda: lanczos(op, tol=float("nan")), ValueError, "tol=nan"),
        (lambda: lanczos(op, max_iter=3, k=5), ValueError, "max_iter=3"),
        (lambda: lanczos(op, seed=-1), ValueError, "seed=-1"),
        (lambda: lanczos(op, basis_dtype=torch.int32), TypeError, "basis_dtype=torch.int32"),
        (lambda: lanczos(op, return_vectors=1), TypeError, "return_vectors=1"),
        (lambda: lanczos(op, block_size=0), ValueError, "block_size=0"),
        (lambda: lanczos(op.matrix), TypeError, "op must be a CurvatureOperator"),
        (lambda: power_iteration(op, k=0), ValueError, "k=0"),
        (lambda: power_iteration(op, k=op.numel + 1), ValueError, f"k={op.numel + 1}"),
        (lambda: power_iteration(op, tol=0), ValueError, "tol=0"),
        (lambda: power_iteration(op, max_iter=0), ValueError, "max_iter=0"),
        (lambda: stability_margin(op, lr=0), ValueError, "lr=0"),
        (lambda: stability_margin(op, lr=-0.1), ValueError, "lr=-0.1"),
        (lambda: stability_margin(op, lr=float("inf")), ValueError, "lr=inf"),
        (lambda: stability_margin(op, lr="0.1"), TypeError, "lr='0.1'"),
        (lambda: stability_margin(op, lr=0.1, momentum=1.0), ValueError, "momentum=1.0"),
        (lambda: stability_margin(op, lr=0.1, k=2), TypeError, "k=2"),
        (lambda: stability_margin(op, lr=0.1, tol=0), ValueError, "tol=0"),
        (lambda: stability_margin(3.0, lr=0.1, tol=1e-3), TypeError, "tol"),
        (lambda: stability_margin(float("nan"), lr=0.1), ValueError, "lambda_max=nan"),
        (lambda: stability_margin("x", lr=0.1), TypeError, "op_or_lambda_max"),
        (lambda: slq_density(op, n_probes=0), ValueError, "n_probes=0"),
        (lambda: slq_density(op, steps=0), ValueError, "steps=0"),
        (lambda: slq_density(op, sigma=0.0), ValueError, "sigma=0.0"),
        (lambda: slq_density(op, sigma=-1.0), ValueError, "sigma=-1.0"),
        (lambda: slq_density(op, n_grid=1), ValueError, "n_grid=1"),
        (lambda: slq_density(op, grid=torch.tensor([1.0, 0.0])), ValueError, "increasing"),
        (lambda: slq_density(op, grid=torch.ones(2, 2)), ValueError, "grid"),
        (lambda: slq_density(op, grid=torch.tensor([0, 1])), TypeError, "grid"),
        (lambda: slq_density(op, grid=torch.tensor([0.0, float("nan")])), ValueError, "grid"),
        (lambda: slq_density(op, basis_dtype="float32"), TypeError, "basis_dtype"),
        (lambda: slq_density(op, grid=torch.linspace(0, 1, 5, dtype=torch.float64), n_grid=10),
         ValueError, "n_grid=10 and a grid of 5 points"),
        (lambda: op.to_matrix(chunk=0), ValueError, "chunk: expected an int >= 1"),
        (lambda: op.to_matrix(chunk=2.5), ValueError, "chunk: expected an int >= 1"),
    ]


def test_bad_input_named_before_any_matvec():
    op = _op(_spectral_matrix(_spectrum("outliers", 30)))
    for call, exc, text in _bad_cases(op):
        with pytest.raises(exc) as info:
            call()
        assert text in str(info.value), (text, str(info.value))
    assert op.matvecs == 0


def test_moment_bad_p():
    d = slq_density(_op(_spectral_matrix(_spectrum("outliers", 30))), n_probes=2, steps=3)
    with pytest.raises(ValueError, match="p=-1"):
        d.moment(-1)
    with pytest.raises(TypeError, match="p=1.5"):
        d.moment(1.5)
    single = slq_density(_op(_spectral_matrix(_spectrum("outliers", 30))), n_probes=1, steps=3)
    assert math.isnan(single.moment(1)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_operators_do_not_break_down_falsely(dtype):
    """At 16 bits, 64 eps ||A|| is 0.5 ||A|| (bfloat16) or 0.06 ||A|| (float16): breakdown tests
    in the operator's eps restarted Lanczos on real residuals (3 matvecs, 'converged' Ritz values
    28% low on a bfloat16 GGN) and cut SLQ's probes at length 2. With the thresholds in
    float32's eps (curvature_orthogonality.decision_eps) each Ritz value keeps the documented
    bound |theta - lambda| <= tol ||A|| (here against the float64 eigenvalues of the rounded
    matrix) and SLQ runs its steps."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A16 = (X @ X.T / 40).to(dtype)
    lam = np.linalg.eigvalsh(A16.double().numpy())[::-1]
    op = MatrixOperator(A16, psd=True)
    res = lanczos(op, k=3)
    tol = res.tol
    assert res.restarts == 0 and res.matvecs > 3 and bool(res.converged.all())
    err = np.abs(res.eigenvalues.numpy() - lam[:3])
    assert np.all(err <= tol * lam[0]), (err, tol * lam[0])
    dens = slq_density(op, n_probes=3, steps=12, seed=0)
    assert dens.lengths.tolist() == [12, 12, 12]


def test_power_iteration_warns_when_tol_is_below_the_products_resolution():
    # PyHessian's relative-change rule compares quotients of 16-bit products: below their eps
    # two iterates can agree by rounding alone (measured: a bfloat16 GGN stopped at the second
    # eigenvalue after 7 matvecs with tol 1e-3).
    A = torch.diag(torch.linspace(1, 2, 30)).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="below the resolution"), \
            pytest.warns(RuntimeWarning, match="not converged"):  # 5 iterations: a budget stop
        power_iteration(MatrixOperator(A, psd=True), tol=1e-3, max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        power_iteration(MatrixOperator(A.float(), psd=True), tol=1e-3, max_iter=200)

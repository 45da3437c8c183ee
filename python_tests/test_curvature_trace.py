"""Trace estimators (gradience_kernels.curvature_trace) against dense float64 references, their
own standard errors, and explicit Hessians / GGNs of a tiny model.

Reference implementations (python_tests/reference.py): hutchinson_dense, hutchpp_dense (the
paper's Algorithm 1 with NumPy QR), xtrace_dense (XTrace by its definition: one QR of A Omega
without column i per probe) and xtrace_paper (the formulas of the authors' MATLAB code). The
estimators work from per-block Gram matrices instead, so agreement on the same probes checks
the algebra (including the per-block XTrace decomposition) to rounding.

Coverage tests: over N independent seeds, the number of runs with |estimate - tr| > 3 SE is
compared with a binomial bound. For a mean of m iid per-probe values the studentized error is
t-distributed with m - 1 degrees of freedom when the values are normal, so a run misses with
p = P(|t_{m-1}| > 3); misses over N seeds are Binomial(N, p) and the test allows the smallest k
with P(Binomial(N, p) > k) <= 1e-3 (scipy.stats.binom.ppf), per checked quantity. The t law
holds to O(1/m) for non-normal values when the per-probe skewness is small (the two-sided
Edgeworth term of order gamma / sqrt(m) cancels); the tests assert that precondition
(|gamma| / sqrt(m) <= 0.05, gamma computed exactly for Rademacher quadratic forms:
E[(z^T A0 z)^3] = 8 tr(A0^3), Var = 2 tr(A0^2), A0 = A without its diagonal) instead of
assuming it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import reference as ref
from gradience_kernels import curvature_kernels as ck
from gradience_kernels import curvature_trace_basis as ctb
from gradience_kernels import curvature_trace as ct
from gradience_kernels.curvature_operators import Block, CurvatureOperator, MatrixOperator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch/BLAS thread

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
# Uneven parameter shapes (a matrix, vectors, a 3-D tensor, a scalar-like vector) and blocks
# that group several tensors: the per-block bookkeeping must not assume one tensor per block.
SHAPES = [(7, 13), (13,), (40, 5), (3,), (2, 3, 4)]
BLOCKS = [Block("a", (0, 1)), Block("b", (2,)), Block("c", (3, 4)), Block("d", (5,))]


def matrix_op(rest: int = 150, spectrum: str = "decay", seed: int = 0, rank: int | None = None,
              dtype=torch.float64):
    """A symmetric A = V diag(lam) V^T (V Haar-orthogonal: delocalized eigenvectors) seen
    through SHAPES + [rest] and BLOCKS: (operator, A as float64 NumPy)."""
    shapes = [torch.Size(s) for s in SHAPES] + [torch.Size([rest])]
    P = sum(s.numel() for s in shapes)
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((P, P)))
    i = np.arange(1, P + 1)
    lam = {"decay": i ** -2.0, "exp": 0.9 ** i, "flat": 1 + 0.5 * rng.standard_normal(P),
           "indef": rng.standard_normal(P) / i}[spectrum]
    if rank is not None:
        lam[rank:] = 0
    A = (V * lam) @ V.T
    A = (A + A.T) / 2
    return MatrixOperator(torch.tensor(A, dtype=dtype), shapes, BLOCKS), A


def flat_blocks(op) -> list[np.ndarray]:
    return [np.concatenate([np.arange(s.start, s.stop) for s in b]) for b in op.block_slices()]


def block_traces(op, A) -> np.ndarray:
    return np.array([np.trace(A[np.ix_(b, b)]) for b in flat_blocks(op)])


def probes(op, m: int, seed: int, first: int = 0, kind: str = "rademacher") -> np.ndarray:
    """The estimators' probes as rows of a float64 [m, P] array (same hash stream)."""
    if kind == "rademacher":
        V = ck.rademacher(op.shapes, m, seed, first=first, dtype=torch.float64)
    else:
        V = ck.gaussian(op.shapes, m, seed, first=first, dtype=torch.float64)
    out = op.flatten(V).numpy()
    if kind == "sphere":
        out = out / np.linalg.norm(out, axis=1, keepdims=True) * math.sqrt(op.numel)
    return out


def rounding_tol(A) -> float:
    """Bound for float64 rounding in a trace estimate: every quantity is a sum of P products of
    entries of the probes (|z| = O(sqrt P)) and of A z (|A z| <= ||A||_F sqrt P), so its error
    is <= gamma_P P ||A||_F ~ P^2 u ||A||_F (Higham, Accuracy and Stability, 3.1); the small
    float64 algebra after it (m x m, well conditioned bases) adds O(m u) relative."""
    P = A.shape[0]
    return P * P * EPS64 * np.linalg.norm(A)


def skewness(A) -> float:
    """Exact skewness of the Rademacher form z^T A z (module docstring)."""
    A0 = A - np.diag(np.diag(A))
    A2 = A0 @ A0
    return 8 * np.trace(A2 @ A0) / (2 * np.trace(A2)) ** 1.5


def miss_bound(n: int, p: float, alpha: float = 1e-3) -> int:
    """Smallest k with P(Binomial(n, p) > k) <= alpha."""
    return int(stats.binom.ppf(1 - alpha, n, p))


# ------------------------------------------------------------------------ dense references
@pytest.mark.parametrize("batch_size", [1, 7, 16])
def test_hutchinson_matches_dense_reference(batch_size):
    op, A = matrix_op()
    r = ct.hutchinson(op, max_matvecs=50, batch_size=batch_size, seed=3)
    d = ref.hutchinson_dense(A, probes(op, 50, 3), flat_blocks(op))
    tol = rounding_tol(A)
    assert r.matvecs == op.matvecs == r.probes == 50
    assert abs(r.trace - d["trace"]) <= tol and abs(r.stderr - d["stderr"]) <= tol
    np.testing.assert_allclose(r.block_traces, d["block_traces"], rtol=0, atol=tol)
    np.testing.assert_allclose(r.block_stderr, d["block_stderr"], rtol=0, atol=tol)
    assert r.history[-1] == (50, r.trace, r.stderr)


@pytest.mark.parametrize("budget,sketch_size,batch_size", [(99, None, 16), (60, 12, 5),
                                                           (40, 1, 3)])
def test_hutchpp_matches_dense_reference(budget, sketch_size, batch_size):
    op, A = matrix_op(spectrum="exp")
    r = ct.hutchpp(op, max_matvecs=budget, sketch_size=sketch_size, batch_size=batch_size,
                   seed=5)
    k = budget // 3 if sketch_size is None else sketch_size
    assert r.sketch_size == r.rank == k and r.matvecs == op.matvecs == budget
    d = ref.hutchpp_dense(A, probes(op, k, 5), probes(op, budget - 2 * k, 5, first=k),
                          flat_blocks(op))
    tol = rounding_tol(A)
    assert abs(r.trace - d["trace"]) <= tol and abs(r.stderr - d["stderr"]) <= tol
    np.testing.assert_allclose(r.block_traces, d["block_traces"], rtol=0, atol=tol)
    np.testing.assert_allclose(r.block_stderr, d["block_stderr"], rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["sphere", "gaussian", "rademacher"])
@pytest.mark.parametrize("budget,batch_size", [(60, 7), (33, 16)])
def test_xtrace_matches_dense_reference(kind, budget, batch_size):
    op, A = matrix_op(spectrum="decay")
    r = ct.xtrace(op, max_matvecs=budget, batch_size=batch_size, seed=2, probes=kind)
    m = budget // 2
    assert r.probes == r.rank == m and r.matvecs == op.matvecs == 2 * m
    Om = probes(op, m, 2, kind=kind)
    d = ref.xtrace_dense(A, Om, flat_blocks(op), improved=kind == "sphere")
    total, err = ref.xtrace_paper(A, Om, improved=kind == "sphere")
    tol = rounding_tol(A)
    assert abs(d["trace"] - total) <= tol and abs(d["stderr"] - err) <= tol  # two references
    assert abs(r.trace - d["trace"]) <= tol and abs(r.stderr - d["stderr"]) <= tol
    np.testing.assert_allclose(r.block_traces, d["block_traces"], rtol=0, atol=tol)
    np.testing.assert_allclose(r.block_stderr, d["block_stderr"], rtol=0, atol=tol)


def test_results_do_not_depend_on_the_batch_split():
    """Probe j is the same whatever the batches (counter-based hash), so only rounding differs
    (XTrace's basis grows in other chunks; its span is the same)."""
    op, A = matrix_op(spectrum="exp")
    tol = rounding_tol(A)
    for fn, kw in [(ct.hutchinson, {}), (ct.hutchpp, {"sketch_size": 20}), (ct.xtrace, {})]:
        a = fn(op, max_matvecs=80, batch_size=16, seed=9, **kw)
        b = fn(op, max_matvecs=80, batch_size=5, seed=9, **kw)
        assert a.matvecs == b.matvecs and a.probes == b.probes
        assert abs(a.trace - b.trace) <= tol and abs(a.stderr - b.stderr) <= tol


# ------------------------------------------------------------------------ exact identities
@pytest.mark.parametrize("fn,kw", [(ct.hutchinson, {}), (ct.hutchpp, {}), (ct.xtrace, {}),
                                   (ct.hutchpp, {"rtol": 0.01}), (ct.xtrace, {"rtol": 0.01})])
@pytest.mark.parametrize("spectrum", ["decay", "indef"])
def test_block_traces_sum_to_the_trace(fn, kw, spectrum):
    op, _ = matrix_op(spectrum=spectrum)
    r = fn(op, max_matvecs=120, seed=1, **kw)
    assert r.block_names == ["a", "b", "c", "d"]
    # The total is computed as the sum of the block estimates: equal up to the summation's
    # own rounding (4 terms).
    assert abs(sum(r.block_traces) - r.trace) <= 4 * EPS64 * sum(map(abs, r.block_traces))


@pytest.mark.parametrize("rank", [1, 5, 16])
def test_exact_when_rank_is_at_most_the_sketch(rank):
    """rank A <= basis size: range(A) is inside range(Q), the residual vanishes and the
    estimate is tr(A) with zero standard error, up to rounding."""
    op, A = matrix_op(spectrum="indef", rank=rank)
    tol = rounding_tol(A)
    tr, bt = np.trace(A), block_traces(op, A)
    runs = [ct.hutchpp(op, max_matvecs=80, sketch_size=16, seed=4),
            ct.xtrace(op, max_matvecs=80, seed=4),
            ct.hutchpp(op, rtol=1e-6, max_matvecs=2000, seed=4),
            ct.xtrace(op, rtol=1e-6, max_matvecs=2000, seed=4)]
    for r in runs:
        assert abs(r.trace - tr) <= tol and r.stderr <= tol, r
        np.testing.assert_allclose(r.block_traces, bt, rtol=0, atol=tol)
        assert max(r.block_stderr) <= tol
        assert rank <= r.rank <= rank + 2  # numerical noise directions are harmless, few
    # rtol: both stop at the minimum number of probes. Hutch++: two sketch batches of 16 (the
    # second finds nothing left), A Q for rank + noise columns, MIN_PROBES residual probes;
    # XTrace: MIN_PROBES probes and their basis columns.
    assert runs[2].converged and runs[2].matvecs <= 2 * 16 + rank + 2 + ct.MIN_PROBES
    assert runs[3].converged and runs[3].matvecs <= ct.MIN_PROBES + rank + 2


def _flat64(cols) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1).double() for t in cols], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spectrum,passes", [("flat", 1), ("decay", 2), ("lowrank", 2)])
def test_extend_basis_keeps_the_basis_orthonormal(monkeypatch, dtype, spectrum, passes):
    """_extend_basis (BCGS, the second pass skipped when the first provably lost little):
    over 5 batches of 8 columns, Q^T Q = I and the returned C = Q_old^T Y and
    X = (I - Q_old Q_old^T) Y hold to a few ulps, against float64 products of the stored
    columns; A Omega of a flat spectrum takes one pass per batch, a decaying or low-rank one
    (cond(X)^2 up to ~1e3 and more: one pass would leave u cond^2 >> 10 u) two."""
    monkeypatch.setattr(ctb, "_orthonormal_batch", counted := _CountCalls(ctb._orthonormal_batch))
    op, A = matrix_op(spectrum="flat" if spectrum == "flat" else "decay", seed=4,
                      rank=12 if spectrum == "lowrank" else None, dtype=dtype)
    u = torch.finfo(dtype).eps
    everything = [list(range(len(op.shapes)))]
    Q = ctb._Store()
    for i in range(5):
        omega = ck.gaussian(op.shapes, 8, 7, first=8 * i, dtype=dtype)
        Y = op.matmat(omega)
        old = torch.cat([_flat64(ch) for ch in Q.chunks], 0) if Q.count else None
        calls = counted.n
        new, C, X = ctb._extend_basis(Q, Y, everything)
        y = _flat64(Y)
        if old is None:
            assert C.shape == (0, 8)
            torch.testing.assert_close(_flat64(X), y, rtol=0, atol=0)
        else:
            scale = float(y.norm(dim=1).max())
            assert float((C - old @ y.T).abs().max()) <= 16 * u * scale
            resid = y - C.T @ old
            assert float((_flat64(X) - resid).abs().max()) <= 16 * u * scale
        if new is None:
            assert spectrum == "lowrank" and Q.count >= 12
            continue
        assert counted.n - calls == passes, f"batch {i}: {counted.n - calls} passes"
        Q.append(new)
        F = torch.cat([_flat64(ch) for ch in Q.chunks], 0)
        err = float((F @ F.T - torch.eye(Q.count, dtype=torch.float64)).abs().max())
        assert err <= 10 * u, f"batch {i}: ||Q^T Q - I||_max = {err / u:.1f} u"
    if spectrum == "lowrank":
        assert Q.count == 12  # the basis stops at rank A: no noise directions kept


class _CountCalls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kw):
        self.n += 1
        return self.fn(*args, **kw)


class _StridedProducts(MatrixOperator):
    """The same matrix, its products handed back as non-contiguous tensors: matrices with
    their last two dimensions swapped in memory (not viewable as [b, -1]), vectors with the
    batch dimension last, as transposing operators would give them."""

    def _matmat(self, V):
        out = super()._matmat(V)
        return [t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 2 else
                t.movedim(0, -1).contiguous().movedim(-1, 0) for t in out]


@pytest.mark.parametrize("fn", [ct.hutchinson, ct.hutchpp, ct.xtrace])
def test_strided_products_give_the_same_estimates(fn):
    """The estimators orthogonalize and subtract in place on copies of the products; strided
    products take the same arithmetic (up to BLAS's summation order) as contiguous ones."""
    op, A = matrix_op(spectrum="decay", seed=2)
    strided = _StridedProducts(op.matrix, op.shapes, op.blocks)
    products = strided.matmat(ck.rademacher(op.shapes, 3, 0, dtype=torch.float64))
    assert not any(t.is_contiguous() for t in products)
    a, b = fn(op, max_matvecs=60, seed=1), fn(strided, max_matvecs=60, seed=1)
    assert a.matvecs == b.matvecs
    assert abs(a.trace - b.trace) <= rounding_tol(A)
    assert np.allclose(a.block_traces, b.block_traces, rtol=0, atol=rounding_tol(A))


def test_small_space_spanned_stops_at_once():
    """P = 5: once Hutch++'s Q (or XTrace's, with more probes than P) spans the whole space the
    estimate is tr(A) to rounding; both used to spend the rest of the budget on probes that
    cannot change it, and Hutch++ then never reported 'converged' (min_probes unmet)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5, 5))
    A = torch.tensor(X @ X.T + np.eye(5))
    op = MatrixOperator(A, [torch.Size([2]), torch.Size([3])])
    tr = float(A.trace())
    for rtol in (0.1, None):
        hpp = ct.hutchpp(op, rtol=rtol, max_matvecs=30, sketch_size=8)
        assert hpp.rank == 5 and hpp.matvecs == 8 + 5 and hpp.converged == (rtol is not None)
        assert abs(hpp.trace - tr) <= 1e-12 * tr and hpp.stderr == 0
        np.testing.assert_allclose(hpp.block_traces, [float(A[:2, :2].trace()),
                                                      float(A[2:, 2:].trace())], rtol=1e-12)
        xt = ct.xtrace(op, rtol=rtol, max_matvecs=200, batch_size=4)
        assert xt.rank == 5 and xt.matvecs < 30 and xt.converged == (rtol is not None)
        assert abs(xt.trace - tr) <= 1e-12 * tr and xt.stderr <= 1e-12 * tr


def test_zero_operator():
    op = MatrixOperator(torch.zeros(40, 40, dtype=torch.float64), [torch.Size([40])])
    for fn in (ct.hutchinson, ct.hutchpp, ct.xtrace):
        r = fn(op, rtol=0.1, max_matvecs=100)
        assert r.trace == 0 and r.stderr == 0 and r.converged and r.rank == 0


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(4, 90), batch_size=st.integers(1, 40),
       method=st.sampled_from(["hutchinson", "hutch++", "xtrace"]),
       rtol=st.sampled_from([None, 0.3, 1e-3]), rank=st.sampled_from([None, 3]))
def test_matvec_counts(budget, batch_size, method, rtol, rank):
    """Every matvec is counted (result == operator's counter) and the budget is never
    exceeded; a run that did not converge stops only when no further batch fits."""
    op, _ = matrix_op(rest=20, spectrum="exp", rank=rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the count check warns on mismatch
        r = ct.estimate_trace(op, method, rtol=rtol, max_matvecs=budget,
                              batch_size=batch_size, min_probes=4)
    assert r.matvecs == op.matvecs <= budget
    if not r.converged:  # XTrace's probes cost 2 matvecs (A omega, A q): 1 may be left
        assert budget - r.matvecs < (2 if method == "xtrace" else 1)
    if r.converged:
        assert r.stderr <= rtol * abs(r.trace)
    used = [h[0] for h in r.history]
    assert used == sorted(used) and (not used or used[-1] == r.matvecs)


def test_matvec_count_mismatch_warns():
    class Uncounted(MatrixOperator):
        def matmat(self, V):  # overrides the counting entry point and forgets to count
            return self._matmat(list(V))
    _, A = matrix_op(rest=10)
    op = Uncounted(torch.tensor(A), [torch.Size([A.shape[0]])])
    with pytest.warns(RuntimeWarning, match="counted 0 matvecs, the estimator used 20"):
        ct.hutchinson(op, max_matvecs=20)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_rtol_stop(method):
    op, _ = matrix_op(spectrum="exp")
    r = ct.estimate_trace(op, method, rtol=0.01, max_matvecs=5000, seed=7)
    assert r.converged and r.stderr <= 0.01 * abs(r.trace)
    # before the stop, no batch after the minimum number of probes met the rule
    assert r.probes - (r.sketch_size if method == "hutch++" else 0) >= ct.MIN_PROBES
    m_min = {"hutchinson": ct.MIN_PROBES, "hutch++": None, "xtrace": None}[method]
    for used, est, se in r.history[:-1]:
        if m_min is not None and used >= m_min:
            assert se > 0.01 * abs(est)
    tight = ct.estimate_trace(op, method, rtol=1e-9, max_matvecs=200, seed=7)
    assert not tight.converged and tight.matvecs <= 200
    free = ct.estimate_trace(op, method, max_matvecs=200, seed=7)  # rtol=None spends it all
    assert not free.converged and free.matvecs == 200
    assert "converged" in str(r) and "\n  a " in str(r) and method in str(r)


def test_float32_operator_agrees_with_float64():
    """Same probes, float32 matvecs and float32-accumulated Gram matrices: the estimates move
    by O(u32) relative to the scale ||A||_F of the quadratic forms (measured ~1e-7 for P =
    1681); the bound allows 100 u32 = 1.2e-5."""
    op64, A = matrix_op(rest=1500, spectrum="decay")
    op32, _ = matrix_op(rest=1500, spectrum="decay", dtype=torch.float32)
    fro = np.linalg.norm(A)
    for fn, kw in [(ct.hutchinson, {}), (ct.hutchpp, {}), (ct.xtrace, {}),
                   (ct.xtrace, {"probes": "rademacher"})]:
        a, b = fn(op64, max_matvecs=96, seed=1, **kw), fn(op32, max_matvecs=96, seed=1, **kw)
        assert a.rank == b.rank
        assert abs(a.trace - b.trace) <= 100 * EPS32 * fro
        np.testing.assert_allclose(a.block_traces, b.block_traces, rtol=0, atol=100 * EPS32 * fro)


# ------------------------------------------------------------------------------- coverage
def _coverage(op, A, fn, n_seeds, df, **kw):
    tr, bt = np.trace(A), block_traces(op, A)
    miss, bmiss, errs, ses = 0, np.zeros(len(bt), int), [], []
    for s in range(n_seeds):
        r = fn(op, seed=s, **kw)
        miss += abs(r.trace - tr) > 3 * r.stderr
        bmiss += np.abs(np.array(r.block_traces) - bt) > 3 * np.array(r.block_stderr)
        errs.append(r.trace - tr)
        ses.append(r.stderr)
    p = 2 * stats.t.sf(3, df)
    return miss, bmiss, miss_bound(n_seeds, p), np.array(errs), np.array(ses)


def test_hutchinson_coverage_on_flat_spectrum():
    op, A = matrix_op(spectrum="flat")
    m = 64
    assert abs(skewness(A)) / math.sqrt(m) <= 0.05  # t_{m-1} law applies (docstring)
    miss, bmiss, k, _, _ = _coverage(op, A, ct.hutchinson, 200, m - 1, max_matvecs=m)
    assert miss <= k and bmiss.max() <= k, (miss, bmiss, k)


def test_hutchpp_coverage_on_decaying_spectrum():
    """Given the sketch, the residual probes are iid: the residual mean's studentized error is
    t with l - 1 df (l = 32 residual probes at budget 96)."""
    op, A = matrix_op(spectrum="decay")
    miss, bmiss, k, _, _ = _coverage(op, A, ct.hutchpp, 200, 31, max_matvecs=96)
    assert miss <= k and bmiss.max() <= k, (miss, bmiss, k)


def test_xtrace_unbiased_and_error_estimate_calibration():
    """XTrace's error estimate std(T_i) / sqrt(m) (the paper's) treats the exchangeable T_i as
    independent; their positive correlation through the shared basis makes it small on
    decaying spectra (measured on seeds 1000-1399: RMS error / RMS reported SE = 1.4 here,
    1.5-1.7 for a 0.9^i spectrum; 1.0-1.2 on flat spectra), so no t law applies. Tested:
    (1) no bias: the mean error over N = 200 independent seeds is within 3.5 of its standard
    error sd / sqrt(N) (CLT over seeds; 3.5: two-sided 5e-4 per quantity, Bonferroni over the
    total and 4 blocks); (2) the claim that the error estimate is within a factor 2 of the
    true RMS error: the ratio of the RMS of the errors to the RMS reported SE, whose sampling
    relative error over 200 seeds is ~ sqrt(2 / 200) = 0.1, must lie in [1/2, 2]."""
    op, A = matrix_op(spectrum="decay")
    tr, bt = np.trace(A), block_traces(op, A)
    rows = [ct.xtrace(op, seed=s, max_matvecs=64) for s in range(200)]
    err = np.array([[r.trace - tr] + list(np.array(r.block_traces) - bt) for r in rows])
    se = np.array([[r.stderr] + r.block_stderr for r in rows])
    n = len(rows)
    assert np.all(np.abs(err.mean(0)) <= 3.5 * err.std(0, ddof=1) / math.sqrt(n))
    ratio = np.sqrt((err ** 2).mean(0) / (se ** 2).mean(0))
    assert np.all((ratio >= 0.5) & (ratio <= 2)), ratio


def test_fewer_matvecs_than_hutchinson_for_one_percent():
    """rtol = 1% on a 0.9^i spectrum (P = 481): Hutch++ and XTrace stop with at most a third
    of Hutchinson's matvecs (measured: Hutchinson ~1050, Hutch++ 96, XTrace 64, limited by
    min_probes), and their actual errors are within 1% x 4 (1% SE, XTrace's SE up to 1.7x
    small, a 2.5-sigma margin)."""
    op, A = matrix_op(spectrum="exp")
    tr = np.trace(A)
    used = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        runs = [ct.estimate_trace(op, method, rtol=0.01, max_matvecs=20000, seed=s,
                                  batch_size=64 if method == "hutchinson" else 16)
                for s in range(3)]
        assert all(r.converged for r in runs)
        used[method] = np.median([r.matvecs for r in runs])
        if method != "hutchinson":
            assert all(abs(r.trace - tr) <= 0.04 * tr for r in runs)
    assert used["hutch++"] <= used["hutchinson"] / 3 and used["xtrace"] <= used["hutchinson"] / 3


# ------------------------------------------------------------ explicit Hessian / GGN of a model
@pytest.fixture(scope="module")
def mlp_curvature():
    """Tiny float64 models (toy_models TINY): the real operators and MatrixOperators of their
    explicit Hessian / GGN (reference.py, torch.autograd.functional), same shapes and blocks.
    The transformer calls scaled_dot_product_attention (its Hessian takes 11 s explicitly:
    GGN only)."""
    from gradience_kernels import toy_models as tm
    from gradience_kernels.curvature_operators import ggn, hessian
    out = {}
    for model_name, name, make, explicit in [
            ("mlp", "hessian", hessian, ref.explicit_hessian),
            ("mlp", "ggn", ggn, ref.explicit_ggn),
            ("transformer", "transformer-ggn", ggn, ref.explicit_ggn)]:
        model, loss_fn, batch = tm.make_problem(model_name, "tiny", dtype=torch.float64)
        op = make(model, loss_fn, batch)
        M = explicit(model, loss_fn, batch)
        dense = MatrixOperator(M, op.shapes, op.blocks, op.names)
        out[name] = (op, dense, M.numpy())
    return out


@pytest.mark.parametrize("name", ["hessian", "ggn", "transformer-ggn"])
def test_model_operator_gives_the_explicit_matrix_estimates(mlp_curvature, name):
    """The real operator (HVP / GGN-vector products, vmapped; SDPA switched to its math
    kernel by the operator) and the explicit float64 matrix give the same estimates on the
    same probes, up to the products' rounding (P u ||A||_F) propagated through the
    well-conditioned estimators."""
    op, dense, M = mlp_curvature[name]
    tol = rounding_tol(M)
    for fn in (ct.hutchinson, ct.hutchpp, ct.xtrace):
        for seed in (0, 1):
            start = op.matvecs
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # counts must agree
                a = fn(op, max_matvecs=48, seed=seed)
            b = fn(dense, max_matvecs=48, seed=seed)
            assert op.matvecs - start == a.matvecs == b.matvecs
            assert abs(a.trace - b.trace) <= tol and abs(a.stderr - b.stderr) <= tol
            np.testing.assert_allclose(a.block_traces, b.block_traces, rtol=0, atol=tol)
    assert [n for n in a.block_names] == [blk.name for blk in op.blocks]


def test_model_hessian_coverage(mlp_curvature):
    """Hutchinson on the explicit float64 Hessian of the tiny MLP (P = 1476), 200 seeds; the
    per-probe skewness is 0.03, so the t_{m-1} law applies (module docstring)."""
    _, dense, H = mlp_curvature["hessian"]
    m = 48
    assert abs(skewness(H)) / math.sqrt(m) <= 0.05
    miss, bmiss, k, _, _ = _coverage(dense, H, ct.hutchinson, 200, m - 1, max_matvecs=m)
    assert miss <= k and bmiss.max() <= k, (miss, bmiss, k)


def test_model_ggn_coverage(mlp_curvature):
    """Hutch++ on the explicit GGN of the tiny MLP (rank 96 = 32 samples x 3): sketch 16 <
    rank, residual t with 15 df (budget 48); XTrace's bias check as above."""
    _, dense, G = mlp_curvature["ggn"]
    miss, bmiss, k, _, _ = _coverage(dense, G, ct.hutchpp, 200, 15, max_matvecs=48)
    assert miss <= k and bmiss.max() <= k, (miss, bmiss, k)
    tr = np.trace(G)
    err = np.array([ct.xtrace(dense, seed=s, max_matvecs=48).trace - tr for s in range(100)])
    assert abs(err.mean()) <= 3.5 * err.std(ddof=1) / 10


# ------------------------------------------------------------------------------- bad input
def _op():
    return matrix_op(rest=10)[0]


@pytest.mark.parametrize("fn", [ct.hutchinson, ct.hutchpp, ct.xtrace])
@pytest.mark.parametrize("kw,exc,match", [
    ({"rtol": 0.0}, ValueError, r"rtol: .*got 0\.0"),
    ({"rtol": -0.1}, ValueError, r"rtol: .*got -0\.1"),
    ({"rtol": float("nan")}, ValueError, r"rtol: .*got nan"),
    ({"rtol": float("inf")}, ValueError, r"rtol: .*got inf"),
    ({"rtol": "0.1"}, TypeError, r"rtol: .*'0\.1'"),
    ({"rtol": True}, TypeError, r"rtol: .*True"),
    ({"max_matvecs": 1}, ValueError, r"max_matvecs: .*got 1"),
    ({"max_matvecs": 0}, ValueError, r"max_matvecs: .*got 0"),
    ({"max_matvecs": 10.5}, TypeError, r"max_matvecs: .*10\.5"),
    ({"batch_size": 0}, ValueError, r"batch_size: .*got 0"),
    ({"batch_size": -3}, ValueError, r"batch_size: .*got -3"),
    ({"seed": 1.5}, TypeError, r"seed: .*1\.5"),
    ({"seed": -1}, ValueError, r"seed: .*>= 0, got -1"),
    ({"min_probes": 1}, ValueError, r"min_probes: .*got 1"),
])
def test_bad_arguments(fn, kw, exc, match):
    op = _op()
    with pytest.raises(exc, match=match):
        fn(op, **kw)
    assert op.matvecs == 0  # raised before any product


@pytest.mark.parametrize("fn,kw,match", [
    (ct.hutchpp, {"max_matvecs": 3}, r"max_matvecs: hutchpp needs at least 4 .*got 3"),
    (ct.xtrace, {"max_matvecs": 3}, r"max_matvecs: xtrace needs at least 4 .*got 3"),
    (ct.hutchpp, {"max_matvecs": 21, "sketch_size": 10},
     r"max_matvecs: hutchpp needs at least 22 .*sketch_size = 10.*got 21"),
    (ct.hutchpp, {"sketch_size": 0}, r"sketch_size: .*got 0"),
    (ct.xtrace, {"probes": "normal"}, r"probes: expected one of .*got 'normal'"),
])
def test_bad_method_arguments(fn, kw, match):
    op = _op()
    with pytest.raises(ValueError, match=match):
        fn(op, **kw)
    assert op.matvecs == 0


@pytest.mark.parametrize("method", ["hutchplusplus", ["hutchinson"], None])
def test_estimate_trace_bad_method_is_named(method):
    op = _op()
    with pytest.raises(ValueError, match=r"method: expected one of .*got"):
        ct.estimate_trace(op, method=method)
    assert op.matvecs == 0


@pytest.mark.parametrize("bad", [torch.eye(3), np.eye(3), None, "op"])
def test_not_an_operator(bad):
    for fn in (ct.hutchinson, ct.hutchpp, ct.xtrace):
        with pytest.raises(TypeError, match="op: expected a CurvatureOperator"):
            fn(bad)


def test_estimate_trace_dispatch():
    op = _op()
    with pytest.raises(ValueError, match="method: expected one of .*got 'lanczos'"):
        ct.estimate_trace(op, "lanczos")
    assert op.matvecs == 0
    for method, name in [("hutch++", "hutch++"), ("hutchpp", "hutch++"),
                         ("hutchinson", "hutchinson"), ("xtrace", "xtrace")]:
        assert ct.estimate_trace(op, method, max_matvecs=8).method == name


# ------------------------------------------------------------------------------- overhead
class _DiagOp(CurvatureOperator):
    """A v = d * v: one multiply per entry, the cheapest possible matmat."""

    def __init__(self, shapes):
        super().__init__(shapes, torch.float32, "cpu")
        self.d = [torch.linspace(1, 2, s.numel()).reshape(s) for s in self.shapes]

    def _matmat(self, V):  # counted by the base class
        return [v * d for v, d in zip(V, self.d)]


def test_hutchinson_work_is_linear_in_probes(monkeypatch):
    """Per-batch work beyond the matvecs is O(b P) (probe generation, one dot per probe), with
    no O(m^2) bookkeeping: counted, not timed (timings belong to bench/). Every P-sized call
    touches only the batch's own b probes, the calls add up to exactly budget x P entries each
    for probes and dots, and the running statistics keep n_blocks + 1 numbers however many
    probes came in."""
    op = _DiagOp([torch.Size([300, 100]), torch.Size([100]), torch.Size([50, 20])])
    P = op.numel
    add = ct._Running.add
    for budget in (128, 256):
        touched = {"rademacher": 0, "block_dots": 0}

        def counting(name, fn):
            def wrapped(*args, **kwargs):
                out = fn(*args, **kwargs)
                rows = out[0].shape[0] if name == "rademacher" else args[0][0].shape[0]
                assert rows <= 16  # one batch (batch_size 16), never the whole history
                touched[name] += rows * P
                return out
            return wrapped
        monkeypatch.setattr(ct, "rademacher", counting("rademacher", ck.rademacher))
        monkeypatch.setattr(ct, "block_dots", counting("block_dots", ck.block_dots))
        sizes = []

        def recording_add(self, X):
            add(self, X)
            sizes.append(self.mean.numel() + self.m2.numel())
        monkeypatch.setattr(ct._Running, "add", recording_add)
        res = ct.hutchinson(op, max_matvecs=budget, seed=0)
        assert res.matvecs == budget
        assert touched == {"rademacher": budget * P, "block_dots": budget * P}
        assert len(sizes) == budget // 16 and set(sizes) == {2 * (len(op.blocks) + 1)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this session")
def test_cuda_matches_cpu():
    op, A = matrix_op(spectrum="exp")
    cuda = MatrixOperator(op.matrix.cuda(), op.shapes, op.blocks)
    tol = rounding_tol(A)
    for fn in (ct.hutchinson, ct.hutchpp, ct.xtrace):
        a, b = fn(op, max_matvecs=64, seed=3), fn(cuda, max_matvecs=64, seed=3)
        assert abs(a.trace - b.trace) <= tol and abs(a.stderr - b.stderr) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["hutchpp", "xtrace"])
def test_sixteen_bit_sketches_keep_their_columns(dtype, method):
    """The sketch basis dropped columns below 128 eps of their norm: 1.0 in bfloat16, so every
    column went and XTrace (whose leave-one-out rule then takes A to be captured by Q) returned
    2.9 for a trace of 38.7. With float32's eps (curvature_orthogonality.decision_eps) the
    basis grows with the probes and the estimate is within its error bars plus the matrix's
    16-bit rounding (the reference is the trace of the rounded matrix, in float64)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A16 = (X @ X.T / 40).to(dtype)
    truth = float(A16.double().trace())
    res = getattr(ct, method)(MatrixOperator(A16, psd=True), max_matvecs=40, seed=0)
    assert res.rank >= 10
    assert abs(res.trace - truth) <= 4 * res.stderr + 8 * torch.finfo(dtype).eps * truth, (
        res.trace, res.stderr, truth)

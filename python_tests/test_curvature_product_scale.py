"""Operators of extreme scale (curvature_product_scale): every estimator on 2^e A must give
exactly 2^e times its values on A (a power of two commutes with every rounding), where before
the squared norms under- or overflowed (Lanczos 100x off and 'converged' for a float32 operator
at 1e-21 on the torch path, XTrace trace 0 +- 0 at 1e-24, Hutch++ failing inside eigh at 1e19,
float64 Lanczos wrong at 1e+-160); and a non-finite first product is refused clearly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gradience_kernels.curvature import (MatrixOperator, hutchinson, hutchpp, lanczos,
                                         power_iteration, slq_density, xtrace)
from gradience_kernels.curvature_kernels import rademacher, use_backend
from gradience_kernels.curvature_product_scale import ScaledProducts


def _matrix(P: int = 60, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((P, P))
    return (X + X.T) / 2


def _runs(op):
    """The values of every estimator in A's units, as float64 arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 'not converged' is a value here
        lz = lanczos(op, k=3, reorth="partial")
        lzb = lanczos(op, k=3, which="smallest", block_size=2)
        pw = power_iteration(op, k=2)
        d = slq_density(op, n_probes=3, steps=10)
        traces = [f(op, max_matvecs=64) for f in (hutchinson, hutchpp, xtrace)]
    out = {"lanczos": lz.eigenvalues.numpy(), "lanczos residuals": lz.residuals.numpy(),
           "block lanczos": lzb.eigenvalues.numpy(), "power": pw.eigenvalues.numpy(),
           "power residuals": pw.residuals.numpy(), "slq nodes": d.nodes.numpy(),
           "slq weights": d.weights.numpy()}
    for t in traces:
        out[t.method] = np.array([t.trace, t.stderr, *t.block_traces, *t.block_stderr,
                                  *[v for h in t.history for v in h[1:]]])
    return out


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype,exponents", [(torch.float32, (-90, -70, 70, 90)),
                                             (torch.float64, (-600, -520, 520, 600))])
def test_estimators_scale_exactly(backend, dtype, exponents):
    A = _matrix()
    with use_backend(backend):
        base = _runs(MatrixOperator(torch.tensor(A, dtype=dtype), shapes=[(20,), (40,)]))
        for e in exponents:
            s = math.ldexp(1.0, e)
            got = _runs(MatrixOperator(torch.tensor(A, dtype=dtype) * s, shapes=[(20,), (40,)]))
            for name, want in base.items():
                factor = 1.0 if name == "slq weights" else s
                assert np.array_equal(got[name], want * factor), (name, e)


def test_decimal_extremes_match_eigvalsh():
    """Scales that are not powers of two, where the runs on A and on s A differ by rounding
    only: within the usual tolerances of the true values."""
    A = _matrix(50)
    ev = np.linalg.eigvalsh(A)
    for dtype, scales, rtol in [(torch.float32, (1e-25, 1e-21, 1e20, 1e25), 1e-4),
                                (torch.float64, (1e-200, 1e-160, 1e160, 1e200), 1e-8)]:
        for s in scales:
            for backend in ("cpp", "torch"):
                with use_backend(backend):
                    r = lanczos(MatrixOperator(torch.tensor(A * s, dtype=dtype)), k=3)
                    assert r.all_converged
                    err = np.abs(r.eigenvalues.numpy() / s - ev[::-1][:3]).max()
                    assert err <= rtol * np.abs(ev).max(), (dtype, s, backend)
                    D = MatrixOperator(torch.tensor(np.diag(np.linspace(1, 2, 40)) * s,
                                                    dtype=dtype))
                    t = xtrace(D, max_matvecs=100)   # rank 40 after 40 products: exact
                    assert abs(t.trace / (60 * s) - 1) <= 10 * rtol and t.rank == 40


def test_normal_scales_untouched():
    """An operator of normal scale is not rescaled: its products are passed through as they
    are (the same tensors)."""
    op = MatrixOperator(torch.tensor(_matrix(8)))
    scaled = ScaledProducts(op)
    V = [torch.randn(2, 8, dtype=torch.float64)]
    out = scaled.matmat(V)
    assert scaled.factor == 1.0 and scaled.matvecs == op.matvecs == 2
    assert torch.equal(out[0], op.matmat(V)[0])
    tiny = ScaledProducts(MatrixOperator(torch.tensor(_matrix(8)) * 2.0 ** -60))
    tiny.matvec([torch.ones(8, dtype=torch.float64)])
    amax = float(np.abs(_matrix(8).sum(1)).max()) * 2.0 ** -60
    assert tiny.factor == math.ldexp(1.0, -math.frexp(amax)[1])   # largest entry to [0.5, 1)
    assert 0.5 <= amax * tiny.factor < 1.0


def test_scale_factor_stays_finite_in_the_dtype():
    """Products below 2^-128 (float32, subnormal) or 2^-1024 (float64) asked for a factor the
    dtype cannot hold: the float32 multiplication made it inf (Hutchinson nan +- nan), float64
    raised OverflowError in math.ldexp. The factor is capped; the results stay right."""
    for dtype, s in [(torch.float32, 1e-40), (torch.float64, 1e-309)]:
        op = MatrixOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64) * s).to(dtype))
        for fn in (hutchinson, hutchpp, xtrace):
            t = fn(op, max_matvecs=40)
            assert abs(t.trace / (10 * s) - 1) <= 1e-3, (dtype, fn.__name__, t.trace)
        r = lanczos(op, k=2)
        assert np.abs(r.eigenvalues.numpy() / s - [4, 3]).max() <= 1e-3


def test_first_product_far_below_the_operator_is_refused():
    """The factor comes from the first product: a +-1 probe exactly orthogonal to the large
    part of A (2^10 u u^T, u orthogonal to probe 0, beside 2^-60 I) sets c = 2^60, and the
    later products would overflow float32 after scaling (XTrace returned 7e-18 for a trace of
    8192). Refused with a message that says what to do."""
    z = rademacher([(16,)], 1, 0)[0][0, :8].double()
    u = z * torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1], dtype=torch.float64)
    assert float(u @ z) == 0
    A = torch.zeros(16, 16, dtype=torch.float64)
    A[:8, :8] = 2.0 ** 10 * torch.outer(u, u) / float(u @ u)
    A[8:, 8:] = 2.0 ** -60 * torch.eye(8, dtype=torch.float64)
    op = MatrixOperator(A.float())
    for fn in (xtrace, hutchpp, hutchinson):
        kw = {"probes": "rademacher"} if fn is xtrace else {}
        with pytest.raises(ValueError, match="products span too many powers of two"):
            fn(op, max_matvecs=40, batch_size=1, **kw)
    # a batch of probes sees the large part at once: no refusal, the right trace
    t = xtrace(op, max_matvecs=40, batch_size=16, probes="rademacher")
    assert abs(t.trace / (2.0 ** 10 + 8 * 2.0 ** -60) - 1) <= 1e-5


def test_lanczos_warning_quotes_residuals_in_the_operators_units():
    op = MatrixOperator(torch.diag(torch.linspace(1, 2, 300, dtype=torch.float64)) * 1e-30)
    with pytest.warns(RuntimeWarning, match="not converged") as rec:
        r = lanczos(op, k=3, max_iter=10)
    quoted = float(str(rec[0].message).rsplit("largest residual ", 1)[1])
    assert abs(quoted / float(r.residuals.max()) - 1) <= 1e-2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", [0, 4])
def test_non_finite_first_product_refused(bad, where):
    """In the first tensor or a later one (Python's max() dropped a NaN that was not first)."""
    A = torch.eye(5, dtype=torch.float64)
    A[where, where] = bad
    op = MatrixOperator(A, shapes=[(2,), (3,)])
    for run in (lambda: lanczos(op, k=2), lambda: power_iteration(op),
                lambda: slq_density(op, n_probes=2, steps=3), lambda: hutchinson(op),
                lambda: hutchpp(op), lambda: xtrace(op)):
        with pytest.raises(ValueError, match="op: its first product has non-finite entries"):
            run()

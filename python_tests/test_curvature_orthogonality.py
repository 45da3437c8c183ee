"""Tests of gradience_kernels.curvature_orthogonality: the omega recurrence behind
reorth='partial' must bound the true loss of orthogonality of a Lanczos basis.

Reference: a dense Lanczos run with the local recurrence only (no reorthogonalization), in
float32 and float64 NumPy, on explicit matrices with known spectra; the true loss is
max_i |q_i^T q_{j+1}| computed in float64 from the stored rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradience_kernels.curvature_orthogonality import OrthogonalityEstimate


def _matrix(lams: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((lams.size, lams.size)))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lams) @ Q.T
    return (A + A.T) / 2


def _local_lanczos(A: np.ndarray, dtype, steps: int, seed: int):
    """Rows (float64 copies) and the estimate's verdicts, with the local recurrence only:
    yields (true loss of the new row, estimated loss, needs-reorthogonalization)."""
    rng = np.random.default_rng(seed)
    Ad = A.astype(dtype)
    q = rng.choice([-1.0, 1.0], A.shape[0]).astype(dtype)
    q /= np.linalg.norm(q)
    rows = [q]
    alpha, beta = [], []
    eps = float(np.finfo(dtype).eps)
    est = OrthogonalityEstimate(eps)
    anorm = 0.0
    for j in range(steps):
        w = Ad @ rows[-1]
        asym = abs(float(rows[-2] @ w) - beta[-1]) if j else 0.0
        for r in rows[-2:]:          # local rows, twice (as the kernels do)
            w = w - (r @ w) * r
        for r in rows[-2:]:
            w = w - (r @ w) * r
        a = float(rows[-1].astype(np.float64) @ (Ad @ rows[-1]).astype(np.float64))
        b = float(np.linalg.norm(w))
        alpha.append(a)
        anorm = max(anorm, math.sqrt(a * a + b * b + (beta[-1] ** 2 if beta else 0.0)))
        theta = max(asym, eps * anorm)
        need = est.update(np.array(alpha), np.array(beta + [b]), theta)
        q = (w / b).astype(dtype)
        Q = np.array(rows, dtype=np.float64)
        true = float(np.abs(Q @ q.astype(np.float64)).max())
        estimated = float(np.abs(est.cur[:j]).max()) if j else 0.0
        yield true, estimated, need
        rows.append(q)
        beta.append(b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimate_bounds_true_loss_until_reorthogonalization(dtype, seed):
    """Until the estimate first asks for a full pass, it is above the true loss (a true loss
    above sqrt(eps) before that would mean semi-orthogonality was lost unnoticed)."""
    P = 300
    rng = np.random.default_rng(10 + seed)
    lams = np.concatenate([[40.0, 25, 18, 12, 9], rng.uniform(-2, 2, P - 5)])
    A = _matrix(lams, seed)
    eps = float(np.finfo(dtype).eps)
    asked = False
    for j, (true, estimated, need) in enumerate(_local_lanczos(A, dtype, 120, seed)):
        if j > 0 and true > 10 * eps:
            # Below a few eps the true loss is rounding noise of its own computation.
            assert estimated >= true, (j, true, estimated)
        if need:
            asked = True
            assert true <= math.sqrt(eps), (j, true)
            break
        assert true <= math.sqrt(eps), (j, true)
    assert asked   # converged outliers make the loss grow: the run must ask within 120 steps


def test_reset_drop_and_restart_bookkeeping():
    est = OrthogonalityEstimate(1e-16, capacity=2)
    alpha, beta = np.array([1.0]), np.array([0.5])
    assert est.update(alpha, beta, 1e-16) is False and est.rows == 2
    est.drop_last()
    assert est.rows == 1 and est.cur[0] == 1.0
    assert est.update(alpha, beta, 1e-16) is False
    est.restart()
    assert est.rows == 3 and est.cur[2] == 1.0 and np.all(est.cur[:2] == 1e-16)
    est.force = 1   # a pending second full pass
    assert est.update(np.array([1.0, 0.2, 0.3]), np.array([0.5, 0.0, 0.4]), 1e-16) is True
    est.reset(1e-16, 0.4)
    assert est.full == 1 and np.all(est.cur[:3] == 1e-16 / 0.4) and est.cur[3] == 1.0
    assert est.cur.size >= 4   # grown past its capacity

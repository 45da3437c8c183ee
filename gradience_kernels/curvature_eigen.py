"""Eigenvalues of curvature operators: Lanczos (top-k / bottom-k), power iteration (lambda_max,
PyHessian-style), the gradient-descent stability margin, and stochastic Lanczos quadrature (SLQ)
for the spectral density.

Every P-sized step outside the operator's matvecs goes through curvature_kernels
(``reorthogonalize_``: one call per Lanczos product; ``orthogonalize_``, ``block_dots``,
``combine``, ``gaussian``), over the operator's list of parameter-shaped tensors: nothing is
flattened into one P-vector. The inner loops call the kernels' unchecked entry points (the
lists are the operator's products and the basis allocated here with its shapes). The small dense algebra
(tridiagonal / banded projections of size m x m, m = number of Lanczos steps) runs in float64
with NumPy on the host.

References:
- C. Lanczos (1950); B. Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13 (Lanczos
  with full reorthogonalization, residual bounds |beta_m s_mi|), ch. 11 (|theta - lambda| <= ||r||
  and <= ||r||^2 / gap).
- G. Golub and R. Underwood (1977), block Lanczos.
- Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian" (2020): power iteration with deflation,
  SLQ density.
- S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"
  (SIAM J. Matrix Anal. Appl. 2017); B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into
  neural net optimization via Hessian eigenvalue density" (ICML 2019).
- J. Cohen, S. Kaur, Y. Li, Z. Kolter, A. Talwalkar, "Gradient descent on neural networks
  typically occurs at the edge of stability" (ICLR 2021).

Layout: this module holds power iteration and the stability margin, and gathers the public
names; Lanczos is in curvature_lanczos, SLQ in curvature_slq, their shared P-sized steps in
curvature_krylov_steps, the result types in curvature_eigen_results, the argument checks in
curvature_eigen_checks.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .curvature_eigen_checks import REORTH_METHODS, _check_int, _check_op, _check_positive
from .curvature_eigen_results import EigenResult, SpectralDensity, StabilityMargin
from .curvature_kernels import _block_dots_run, _orthogonalize_run, gaussian
from .curvature_krylov_steps import _all_blocks, _new_rows, _sq_norm
from .curvature_lanczos import lanczos
from .curvature_operators import CurvatureOperator
from .curvature_product_scale import ScaledProducts
from .curvature_slq import slq_density

__all__ = ["EigenResult", "StabilityMargin", "SpectralDensity", "lanczos", "power_iteration",
           "stability_margin", "slq_density", "REORTH_METHODS"]


def power_iteration(op: CurvatureOperator, k: int = 1, tol: float = 1e-6, max_iter: int = 1000,
                    seed: int = 0) -> EigenResult:
    """The k eigenvalues of largest magnitude by power iteration with deflation (PyHessian's
    ``eigenvalues``, Yao et al. 2020).

    For i = 1..k: from a normalized Gaussian probe (stream `seed`, probe i-1; PyHessian draws
    torch.randn; a +-1 probe can be orthogonal to the eigenvector, e.g. a zero-sum probe of the
    all-ones matrix, whose product 0 then passed for an eigenvalue 0), repeat
        v <- v - V_i V_i^T v (orthogonalized against the eigenvectors found so far), v /= ||v||,
        w = A v, theta = v^T w, v <- w / ||w||
    until |theta - theta_prev| <= tol |theta_prev| (PyHessian's stopping rule: the relative
    change of the Rayleigh quotient) or `max_iter` iterations. The iteration converges to the
    eigenvalue of largest |lambda| of the deflated operator, at the rate (|lambda_2| /
    |lambda_1|)^2 per matvec for the Rayleigh quotient: for a Hessian whose most negative
    eigenvalue outweighs its largest, that is the negative one (use ``lanczos`` for the
    algebraic top). A small relative change does not bound the error when the ratio is near 1,
    nor when tol is below the eps of op.dtype (a RuntimeWarning says so: 16-bit products).

    Returns an EigenResult with the eigenvalues in the order found (by decreasing magnitude),
    the last Rayleigh quotients; ``residuals`` = ||A v - theta v|| of the last iterate v whose
    quotient is theta (from ||A v||^2 - theta^2, accurate to about sqrt(eps) ||A v||); the
    returned eigenvectors are w / ||w||, one power step further, as in PyHessian.
    ``converged`` is PyHessian's rule met by an iterate near an eigenvector: relative residual
    ||A v - theta v|| / ||A v|| <= min(0.5, 10 sqrt(tol)). The rule alone also passes a
    quotient that stalls: for a pair +-lambda of largest magnitude, where power iteration
    cannot converge, theta stays at lambda (a^2 - b^2) for the iterate's weights a, b on the
    pair, with relative residual sqrt(1 - (a^2 - b^2)^2) (a fixed bound of 1/2 still passed 4
    of 8 seeds on diag(3, -3, 1, 0.5) with theta 7-11% off); the iteration stops there either
    way, as PyHessian's does. The residual sees an error component times the gap to the
    competing eigenvalue, so the flag is stricter next to a competitor of opposite sign (spectrum
    1, -0.995, ...: tol 1e-6 stopped 1e-4 off, flagged) than of the same sign (1, 0.995, ...:
    as far off, not flagged): False means "not near an eigenvector to ~sqrt(tol)", True does
    not bound the error (see above).
    """
    _check_op(op)
    P = op.numel
    k = _check_int("k", k, 1, P)
    tol = _check_positive("tol", tol)
    max_iter = _check_int("max_iter", max_iter, 1)
    seed = _check_int("seed", seed, 0)
    eps = torch.finfo(op.dtype).eps
    if tol < eps:
        # The rule compares Rayleigh quotients of products rounded to op.dtype: below its eps
        # two iterates can agree by rounding alone (a bfloat16 GGN stopped at its second
        # eigenvalue after 7 matvecs with tol 1e-3, measured).
        warnings.warn(f"power_iteration: tol={tol:g} is below the resolution of {op.dtype} "
                      f"products (eps {eps:.1e}): the relative-change rule can stop at any "
                      f"iterate; use tol >= {eps:.1e} or lanczos", RuntimeWarning, stacklevel=2)

    near = min(0.5, 10.0 * math.sqrt(tol))  # relative residual of a converged iterate
    start = op.matvecs
    found = _new_rows(op, k, op.dtype)
    scaled = ScaledProducts(op)  # products of extreme scale run as c A; values divided by c
    blocks = _all_blocks(op)
    values, residuals, converged = [], [], []
    iterations = 0
    for i in range(k):
        v = [t[0] for t in gaussian(op.shapes, 1, seed, first=i, dtype=op.dtype,
                                    device=op.device)]
        theta_prev = None
        ok = False
        theta = res = 0.0
        for _ in range(max_iter):
            _orthogonalize_run(v, found, i, 2)
            nv = math.sqrt(_sq_norm(v))
            if nv == 0.0:
                break
            v = [t / nv for t in v]
            w = scaled.matvec(v)
            iterations += 1
            vb = [t.unsqueeze(0) for t in v]
            wb = [t.unsqueeze(0) for t in w]
            theta = float(_block_dots_run(vb, wb, blocks)[0, 0])
            ww = float(_block_dots_run(wb, wb, blocks)[0, 0])
            res = math.sqrt(max(ww - theta * theta, 0.0))
            if ww == 0.0:
                ok = True       # A v = 0: v is an eigenvector of eigenvalue 0
                break
            v = [t / math.sqrt(ww) for t in w]
            if theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta_prev):
                ok = res <= near * math.sqrt(ww)
                break
            theta_prev = theta
        for r, t in zip(found, v):
            r[i].copy_(t)
        values.append(scaled.unscale(theta))
        residuals.append(scaled.unscale(res))
        converged.append(ok)
    result = EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(converged, dtype=torch.bool),
        matvecs=op.matvecs - start, iterations=iterations, method="power_iteration",
        eigenvectors=found, tol=tol)
    if not result.all_converged:
        warnings.warn(f"power_iteration: {k - sum(converged)} of k={k} eigenvalues not converged "
                      f"(max_iter={max_iter} iterations each, tol={tol:g}; or the quotient "
                      f"stalled with relative residual > {near:.2g}: a +-lambda pair)",
                      RuntimeWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------- stability margin
def stability_margin(op_or_lambda_max: CurvatureOperator | float, lr: float,
                     momentum: float = 0.0, **lanczos_kw) -> StabilityMargin:
    """Gradient-descent stability margin threshold - lambda_max, threshold = 2 / lr.

    On the quadratic model L(x) ~ L0 + g^T x + x^T H x / 2, gradient descent with step lr is
    stable along an eigenvector of H iff lr * lambda < 2; full-batch training drives
    lambda_max(H) up to 2 / lr and hovers there (the edge of stability, Cohen et al. 2021).
    With heavy-ball momentum beta the threshold is (2 + 2 beta) / lr (Cohen et al., appendix).

    Args:
        op_or_lambda_max: a CurvatureOperator (its algebraic largest eigenvalue is computed by
            ``lanczos(op, k=1, which="largest", **lanczos_kw)``) or the value lambda_max.
        lr: learning rate > 0.
        momentum: heavy-ball momentum in [0, 1).
    """
    lr = _check_positive("lr", lr)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a real number, got momentum={momentum!r}")
    momentum = float(momentum)
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got momentum={momentum}")
    threshold = (2.0 + 2.0 * momentum) / lr
    if isinstance(op_or_lambda_max, CurvatureOperator):
        for key in ("k", "which"):
            if key in lanczos_kw:
                raise TypeError(f"stability_margin: {key} is fixed (k=1, which='largest'), got "
                                f"{key}={lanczos_kw[key]!r}")
        eig = lanczos(op_or_lambda_max, k=1, which="largest", **lanczos_kw)
        lam = float(eig.eigenvalues[0])
        return StabilityMargin(lambda_max=lam, threshold=threshold, margin=threshold - lam,
                               lr=lr, momentum=momentum, matvecs=eig.matvecs,
                               residual=float(eig.residuals[0]), converged=eig.all_converged,
                               eigen=eig)
    if lanczos_kw:
        raise TypeError(f"stability_margin: options {sorted(lanczos_kw)} apply only to an "
                        f"operator, got lambda_max={op_or_lambda_max!r}")
    if isinstance(op_or_lambda_max, torch.Tensor):
        if op_or_lambda_max.numel() != 1:
            raise ValueError(f"lambda_max: expected one value, got shape "
                             f"{list(op_or_lambda_max.shape)}")
        op_or_lambda_max = op_or_lambda_max.item()
    if isinstance(op_or_lambda_max, bool) or not isinstance(
            op_or_lambda_max, (int, float, np.floating, np.integer)):
        raise TypeError(f"op_or_lambda_max must be a CurvatureOperator or a real number, got "
                        f"{type(op_or_lambda_max).__name__}")
    lam = float(op_or_lambda_max)
    if not math.isfinite(lam):
        raise ValueError(f"lambda_max must be finite, got lambda_max={lam}")
    return StabilityMargin(lambda_max=lam, threshold=threshold, margin=threshold - lam, lr=lr,
                           momentum=momentum)

"""Stochastic Lanczos quadrature (SLQ) for the spectral density of a curvature operator:
Rademacher probes run together as a batch of Lanczos recurrences, Gauss quadrature nodes and
weights per probe, Gaussian broadening on a grid.

References: S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
quadrature" (SIAM J. Matrix Anal. Appl. 2017); B. Ghorbani, S. Krishnan, Y. Xiao, "An
investigation into neural net optimization via Hessian eigenvalue density" (ICML 2019);
Z. Yao et al., "PyHessian" (2020).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch

from .curvature_eigen_checks import (_check_basis_dtype, _check_int, _check_op, _check_positive,
                                     _check_reorth)
from .curvature_eigen_results import SpectralDensity
from .curvature_kernels import rademacher
from .curvature_krylov_steps import (_BREAKDOWN_ULPS, _local_step, _new_rows, _omega_step,
                                     _owned, _reorth_step)
from .curvature_operators import CurvatureOperator
from .curvature_product_scale import ScaledProducts
from .curvature_orthogonality import OrthogonalityEstimate, decision_eps

__all__ = ["slq_density"]


_MAX_DEFAULT_GRID = 1 << 20  # 8 MiB of float64 grid, as much again for the density


def slq_density(op: CurvatureOperator, n_probes: int = 8, steps: int = 64,
                grid: torch.Tensor | None = None, sigma: float | None = None, seed: int = 0,
                n_grid: int | None = None, basis_dtype: torch.dtype | None = None,
                reorth: str = "full") -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (Ubaru, Chen
    and Saad 2017; Ghorbani, Krishnan and Xiao 2019; PyHessian's ``density``).

    For each of n_v Rademacher probes r_l (stream `seed`), v_l = r_l / sqrt(P), m = min(steps, P)
    Lanczos steps with full (or partial) reorthogonalization give T_m = S diag(theta) S^T; the Gauss
    quadrature v^T f(A) v ~ sum_j tau_j f(theta_j), tau_j = S_1j^2, is exact for polynomials of
    degree <= 2m - 1. The density of eigenvalues (1/P) sum_i delta(t - lambda_i) is estimated as

        phi(t) = (1/n_v) sum_l sum_j tau_j^(l) N(t; theta_j^(l), sigma^2),

    which integrates to 1. The probes run together: each Lanczos step is one ``op.matmat`` of
    all active probes; each probe's Krylov space that becomes invariant stops early (its
    quadrature is then exact).

    Args:
        op: the operator (P = op.numel).
        n_probes: number of probes n_v >= 1 (standard errors need >= 2).
        steps: Lanczos steps m >= 1 per probe (capped at P); memory n_v m P basis entries.
        grid: 1-D increasing float tensor of evaluation points; default n_grid points over
            [min theta - 8 sigma, max theta + 8 sigma] (Gaussian mass outside: 1e-15).
        sigma: Gaussian width > 0; default (max theta - min theta) / 200 (or 1e-2 max(1, |theta|)
            when all nodes coincide).
        n_grid: default grid size (an error with grid=); default max(1000, span / (sigma / 4))
            so that the trapezoid rule integrates each Gaussian to ~1e-30 (its error is
            exp(-2 pi^2 sigma^2 / h^2)), at most 2^20 (a RuntimeWarning when sigma would need
            more).
        basis_dtype: storage dtype of the Lanczos bases (default op.dtype).
        reorth: "full" (default) or "partial" (each probe's basis against its whole basis only
            when its estimated loss of orthogonality exceeds sqrt(eps); see lanczos).

    Returns:
        SpectralDensity (grid, density, nodes, weights, lengths, matvecs; ``moment(p)`` gives
        the estimate of tr(A^p) / P with its standard error).
    """
    _check_op(op)
    P = op.numel
    n_probes = _check_int("n_probes", n_probes, 1)
    steps = _check_int("steps", steps, 1)
    seed = _check_int("seed", seed, 0)
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
    if n_grid is not None:
        n_grid = _check_int("n_grid", n_grid, 2)
    if grid is not None:
        grid = _check_grid(grid)
        if n_grid is not None:
            raise ValueError(f"n_grid: the size of the default grid, not used with grid=; got "
                             f"n_grid={n_grid} and a grid of {grid.numel()} points")
    bdtype = _check_basis_dtype(basis_dtype, op)
    reorth = _check_reorth(reorth)

    start = op.matvecs
    scaled = ScaledProducts(op)  # products of extreme scale run as c A; nodes divided by c
    m = min(steps, P)
    nv = n_probes
    rows = _new_rows(op, m, bdtype, lead=(nv,))     # per tensor [n_v, m, *shape]
    probes = rademacher(op.shapes, nv, seed, dtype=op.dtype, device=op.device)
    inv = 1.0 / math.sqrt(P)
    for r, t in zip(rows, probes):
        r[:, 0].copy_(t * inv)
    del probes
    alpha = np.zeros((nv, m))
    beta = np.zeros((nv, m))
    lengths = np.zeros(nv, dtype=np.int64)
    invariant = np.zeros(nv, dtype=bool)
    anorm = np.zeros(nv)
    eps = torch.finfo(op.dtype).eps
    eps_store = max(eps, torch.finfo(bdtype).eps)
    eps_zero = decision_eps(op.dtype)  # breakdown tests (curvature_orthogonality)
    omega = [OrthogonalityEstimate(eps) for _ in range(nv)] if reorth == "partial" else None
    full_reorths = 0
    active = list(range(nv))
    for j in range(m):
        if not active:
            break
        if len(active) == nv:
            Q = [r[:, j].to(op.dtype) for r in rows]
        else:
            sel = torch.tensor(active, device=op.device)
            Q = [r[sel, j].to(op.dtype) for r in rows]
        W = _owned(scaled.matmat(Q), rows)
        still = []
        for a, l in enumerate(active):
            w = [t[a] for t in W]
            basis = [r[l] for r in rows]
            lo = max(0, j - 1)
            out = j + 1 if j + 1 < m else None
            if omega is None:
                coef, norm = _reorth_step(w, basis, j + 1, lo, out_row=out,
                                          min_norm=_BREAKDOWN_ULPS * eps_zero * anorm[l])
                full_reorths += 1
            else:
                # Partial: the local rows only, the whole basis when the estimated loss of
                # orthogonality of the new row exceeds sqrt(eps) (curvature_orthogonality).
                coef, norm = _local_step(w, [b[lo:] for b in basis], j + 1 - lo,
                                         None if out is None else out - lo,
                                         _BREAKDOWN_ULPS * eps_zero * anorm[l])
            alpha[l, j] = coef[-1]
            lengths[l] = j + 1
            anorm[l] = max(anorm[l], math.sqrt(float(coef @ coef) + norm * norm))
            if j + 1 == m:
                continue
            thr = _BREAKDOWN_ULPS * eps_zero * anorm[l]  # the breakdown level, updated ||A||
            if omega is not None and norm > thr:
                # (The quadrature uses T only: a full pass's coefficients are not kept.)
                total, norm = _omega_step(omega[l], w, basis, j, lo, coef, norm, alpha[l],
                                          beta[l], eps_store * anorm[l], out, thr)
                if total is not None:
                    full_reorths += 1
            if norm <= thr:
                invariant[l] = True     # Krylov space invariant: the quadrature is exact
                continue
            beta[l, j] = norm  # row j + 1 = w / norm, written by _reorth_step
            still.append(l)
        active = still
    matvecs = op.matvecs - start

    nodes = np.zeros((nv, m))
    weights = np.zeros((nv, m))
    for l in range(nv):
        L = int(lengths[l])
        if L == 1:
            th, S = alpha[l, :1].copy(), np.ones((1, 1))
        else:
            th, S = scipy.linalg.eigh_tridiagonal(alpha[l, :L].copy(), beta[l, :L - 1].copy())
        nodes[l, :L] = th
        nodes[l, L:] = th[-1]           # padding: a real node with zero weight
        weights[l, :L] = S[0] ** 2
    nodes /= scaled.factor  # exact: a power of two
    # A probe that spanned the whole space (L = P) has T_P similar to A: exact for every f.
    invariant |= lengths == P
    # Probes whose space stayed open have quadrature exact to degree 2 L - 1.
    open_lengths = lengths[~invariant]
    exact = None if open_lengths.size == 0 else int(2 * open_lengths.min() - 1)

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = (hi - lo) / 200.0 if hi > lo else 1e-2 * max(1.0, abs(hi))
    if grid is None:
        a, b = lo - 8.0 * sigma, hi + 8.0 * sigma
        if n_grid is None:
            n_grid = max(1000, int(math.ceil((b - a) / (sigma / 4.0))) + 1)
            if n_grid > _MAX_DEFAULT_GRID:
                # A sigma tiny against the spread of the nodes: sigma=1e-9 on a spectrum of
                # width 60 asked for 3e10 points (242 GB).
                warnings.warn(f"slq_density: sigma={sigma:g} over nodes spanning [{lo:.4g}, "
                              f"{hi:.4g}] needs {n_grid} grid points at spacing sigma / 4; the "
                              f"default grid is capped at {_MAX_DEFAULT_GRID} (spacing "
                              f"{(b - a) / (_MAX_DEFAULT_GRID - 1):.3g}, so it does not "
                              f"integrate to 1): pass grid= for a window of the spectrum",
                              RuntimeWarning, stacklevel=2)
                n_grid = _MAX_DEFAULT_GRID
        grid = torch.linspace(a, b, n_grid, dtype=torch.float64)
    density = _broadened(grid, nodes.reshape(-1), weights.reshape(-1) / nv, sigma)
    return SpectralDensity(grid=grid, density=density, nodes=torch.from_numpy(nodes),
                           weights=torch.from_numpy(weights),
                           lengths=torch.from_numpy(lengths), sigma=sigma, matvecs=matvecs,
                           numel=P, exact_degree=exact, full_reorthogonalizations=full_reorths)


def _check_grid(grid) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor):
        grid = torch.as_tensor(np.asarray(grid))
    if not grid.dtype.is_floating_point:
        raise TypeError(f"grid: expected a float tensor, got dtype={grid.dtype}")
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid: expected a 1-D tensor of >= 2 points, got shape "
                         f"{list(grid.shape)}")
    grid = grid.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("grid: contains non-finite values")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("grid: must be strictly increasing")
    return grid


def _broadened(grid: torch.Tensor, nodes: np.ndarray, weights: np.ndarray,
               sigma: float) -> torch.Tensor:
    """sum_j weights_j N(grid; nodes_j, sigma^2), in chunks of the grid (float64)."""
    th = torch.from_numpy(nodes)
    wt = torch.from_numpy(weights)
    keep = wt > 0
    th, wt = th[keep], wt[keep]
    out = torch.empty_like(grid)
    chunk = max(1, (1 << 22) // max(1, th.numel()))
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for s in range(0, grid.numel(), chunk):
        g = grid[s:s + chunk]
        z = (g[:, None] - th[None, :]) / sigma
        out[s:s + chunk] = torch.exp(-0.5 * z * z) @ wt * norm
    return out

"""Result types of the eigenvalue estimators (curvature_lanczos, curvature_eigen's power
iteration and stability margin, curvature_slq)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .curvature_eigen_checks import _check_int

__all__ = ["EigenResult", "StabilityMargin", "SpectralDensity"]


@dataclass
class EigenResult:
    """Eigenvalue estimates of a symmetric operator.

    ``eigenvalues``: float64 [k] (CPU), descending for which="largest", ascending for
    "smallest", in the order found for power iteration. ``residuals``: float64 [k], the
    residual norms ||A y - theta y|| of the unit eigenvector estimates (Lanczos: the recurrence's
    |beta_m s_mi|, plus the basis' storage rounding when basis_dtype is lower than the
    operator's; the true residual exceeds it by the rounding of the products, a few eps ||A||;
    power iteration: the residual of the last iterate). By Weyl / Bauer-Fike each theta_i is
    within residuals[i] of an eigenvalue of A (within residuals[i]^2 / gap when the rest of the
    spectrum is a gap away); that it is the i-th one, residuals cannot tell (see lanczos).
    ``converged``: bool [k]. ``matvecs``: matvecs this call used; ``iterations``: Lanczos
    (block) steps or power iterations in all. ``eigenvectors``: a list of [k, *shape] tensors
    (one per parameter tensor) in the operator's dtype, or None.
    ``full_reorthogonalizations``: Lanczos steps that orthogonalized against the whole basis
    (all of them with reorth="full"; power iteration: 0).
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    matvecs: int
    iterations: int
    method: str
    eigenvectors: list[torch.Tensor] | None = None
    tol: float = float("nan")
    restarts: int = 0
    full_reorthogonalizations: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass
class StabilityMargin:
    """Gradient-descent stability: ``margin = threshold - lambda_max`` with ``threshold =
    (2 + 2 momentum) / lr`` (2 / lr without momentum). Positive: the quadratic model is stable
    along the top curvature direction; near zero: the edge of stability (Cohen et al. 2021)."""

    lambda_max: float
    threshold: float
    margin: float
    lr: float
    momentum: float = 0.0
    matvecs: int = 0
    residual: float = float("nan")
    converged: bool = True
    eigen: EigenResult | None = None


@dataclass
class SpectralDensity:
    """Gaussian-broadened spectral density from stochastic Lanczos quadrature.

    phi(t) = (1/n_v) sum_l sum_j tau_j^(l) exp(-(t - theta_j^(l))^2 / (2 sigma^2)) /
    (sigma sqrt(2 pi)), theta_j^(l) the Ritz values (nodes) of probe l and tau_j^(l) the squared
    first components of T's eigenvectors (weights; sum_j tau_j^(l) = 1), so phi integrates to 1.
    ``nodes`` / ``weights``: float64 [n_probes, steps], a probe whose Krylov space became
    invariant before ``steps`` is padded with zero weights (its quadrature is then exact for every
    polynomial). ``lengths``: Lanczos steps per probe; ``exact_degree``: the largest p for which
    every probe's quadrature is exact (2 m - 1), None when all are exact;
    ``full_reorthogonalizations``: Lanczos steps (over all probes) that orthogonalized against
    the whole basis (every step with reorth="full").
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    lengths: torch.Tensor
    sigma: float
    matvecs: int
    numel: int
    exact_degree: int | None = None
    full_reorthogonalizations: int = 0

    def integral(self) -> float:
        """Trapezoid integral of the density over the grid (1 when the grid covers the nodes
        +- several sigma and its spacing is below sigma)."""
        return float(torch.trapezoid(self.density, self.grid))

    def probe_moments(self, p: int) -> torch.Tensor:
        """sum_j tau_j^(l) theta_j^(l)^p per probe [n_probes]: v_l^T A^p v_l exactly (Gauss
        quadrature with m nodes is exact for degree <= 2m - 1), v_l = r_l / ||r_l||, so for
        Rademacher r_l (||r_l||^2 = P) it is r_l^T A^p r_l / P."""
        p = _check_int("p", p, 0)
        if self.exact_degree is not None and p > self.exact_degree:
            raise ValueError(f"p: the {int(self.lengths.min())}-step quadrature is exact for "
                             f"moments up to p = {self.exact_degree}, got p={p}; run slq_density "
                             f"with steps >= {(p + 2) // 2}")
        return (self.weights * self.nodes.pow(p)).sum(1)

    def moment(self, p: int) -> tuple[float, float]:
        """(estimate of tr(A^p) / P, its standard error): the mean over probes of
        r^T A^p r / P (unbiased for Rademacher r, Hutchinson 1989) and std / sqrt(n_probes)
        (nan for one probe)."""
        vals = self.probe_moments(p)
        n = vals.numel()
        se = float(vals.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")
        return float(vals.mean()), se

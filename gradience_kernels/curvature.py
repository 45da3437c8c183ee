"""Curvature of a model's loss with matrix-vector products (DESIGN.md 3.3): the public API of
the curvature modules, in one place.

- operators (curvature_operators.py, curvature_model_operators.py, curvature_hessian.py,
  curvature_model_problem.py): ``hessian``, ``ggn``, ``empirical_fisher`` over all or some
  parameters, per-layer blocks, counted matvecs;
- trace (curvature_trace.py, curvature_hutchpp.py, curvature_xtrace.py): ``hutchinson``,
  ``hutchpp``, ``xtrace``, ``estimate_trace``;
- eigenvalues (curvature_eigen.py, curvature_lanczos.py, curvature_slq.py): ``lanczos``,
  ``power_iteration``, ``stability_margin``, ``slq_density``;
- sample space (curvature_samples.py): ``ntk_gram``, ``gradient_gram``, ``fisher_trace``,
  ``fisher_eigs``, ``gram_eigenvalues``, ``gram_logdet``, ``per_sample_gradients``;
- operators of extreme scale run as an exact power-of-two multiple (curvature_product_scale.py);
- the multi-tensor kernels behind them: curvature_kernels.py (Triton on CUDA, C++ on CPU, a
  torch path as their reference).
"""

from __future__ import annotations

from .curvature_eigen import (EigenResult, SpectralDensity, StabilityMargin, lanczos,
                              power_iteration, slq_density, stability_margin)
from .curvature_model_operators import (FisherOperator, GGNOperator, HessianOperator,
                                        ModelOperator, empirical_fisher, ggn, hessian)
from .curvature_operators import Block, CurvatureOperator, MatrixOperator
from .curvature_samples import (FisherTrace, fisher_eigs, fisher_trace, gradient_gram,
                                gram_eigenvalues, gram_logdet, ntk_gram, per_sample_gradients)
from .curvature_trace import TraceEstimate, estimate_trace, hutchinson, hutchpp, xtrace

__all__ = [
    "Block", "CurvatureOperator", "MatrixOperator", "ModelOperator", "HessianOperator",
    "GGNOperator", "FisherOperator", "hessian", "ggn", "empirical_fisher",
    "TraceEstimate", "hutchinson", "hutchpp", "xtrace", "estimate_trace",
    "EigenResult", "StabilityMargin", "SpectralDensity", "lanczos", "power_iteration",
    "stability_margin", "slq_density",
    "FisherTrace", "per_sample_gradients", "ntk_gram", "gradient_gram", "gram_eigenvalues",
    "gram_logdet", "fisher_trace", "fisher_eigs",
]

"""Streaming stochastic trace estimation of a curvature operator: Hutchinson, Hutch++, XTrace.

Every estimator draws its random probes in batches (one ``op.matmat`` per batch, vmapped by the
model operators), keeps a running estimate and standard error, and stops as soon as the
standard error is at most ``rtol * |estimate|`` (after ``min_probes`` probes, so that the
standard error itself is trustworthy) or before the matvec budget ``max_matvecs`` would be
exceeded (it never is). ``rtol=None`` spends the budget. Per-block traces tr(A_bb) come from the
same probes; the full trace is the sum of the block traces.

Probes are counter-based (curvature_kernels.rademacher / gaussian): probe j of stream ``seed`` is
the same whatever the batch split, so a run without ``rtol`` does not depend on ``batch_size``
(up to rounding), nor does Hutchinson's; with ``rtol`` the stop is checked after each batch,
and Hutch++'s adaptive sketch is sized batch by batch, so they can stop at a different count.
A dense reference can regenerate the probes (python_tests/reference.py).

P-sized work outside the matvecs goes through curvature_kernels only (probe generation,
per-block Gram matrices / dots, Gram-Schmidt against a basis, basis combinations), tensor by
tensor: nothing is flattened into one P-vector. Everything else is small float64 matrices.

Cost beyond the matvecs, per probe, with P parameters and a basis of r columns (Hutch++, XTrace):
Hutchinson O(P); Hutch++ O(r P) (three r x b Gram matrices per residual batch); XTrace O(m P)
with m probes so far (Gram-Schmidt of the new columns against the basis and the new rows and
columns of the per-block Gram matrices). Memory: Hutchinson one batch; Hutch++ 2 r vectors
(Q and A Q); XTrace 3 m vectors (the probes, Q and A Q).

References: Hutchinson (1989), Commun. Stat. Simul. Comput. 18(3); Meyer, Musco, Musco, Woodruff
(2021), "Hutch++: optimal stochastic trace estimation", SOSA; Persson, Cortinovis, Kressner
(2022), "Improved variants of the Hutch++ algorithm for trace estimation", SIMAX 43(3);
Epperly, Tropp, Webber (2024), "XTrace: making the most of every sample in stochastic trace
estimation", SIMAX 45(1).

Layout: this module holds Hutchinson and the dispatcher and gathers the public names; Hutch++ is
in curvature_hutchpp, XTrace in curvature_xtrace, their shared sketch basis in
curvature_trace_basis, and the result type, checks and stopping rule in curvature_trace_common.
"""

from __future__ import annotations

from .curvature_hutchpp import hutchpp
from .curvature_kernels import block_dots, rademacher
from .curvature_operators import CurvatureOperator
from .curvature_product_scale import ScaledProducts
from .curvature_trace_common import (METHODS, MIN_PROBES, XTRACE_PROBES, TraceEstimate,
                                     _blocks, _check_args, _result, _Running, _small, _stop)
from .curvature_xtrace import xtrace

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "xtrace", "estimate_trace", "METHODS",
           "MIN_PROBES", "XTRACE_PROBES"]


# ----------------------------------------------------------------------------- Hutchinson
def hutchinson(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
               batch_size: int = 16, seed: int = 0,
               min_probes: int = MIN_PROBES) -> TraceEstimate:
    """Hutchinson's estimator tr(A) ~ (1/m) sum_j z_j^T A z_j with Rademacher probes z_j
    (Hutchinson 1989), streamed in batches of ``batch_size`` probes (one ``op.matmat`` each).

    Per block b: tr(A_bb) ~ (1/m) sum_j <z_j, (A z_j)>_b (curvature_kernels.block_dots); the
    full estimate is the sum of the block estimates. Standard errors: sample SD / sqrt(m) of the
    per-probe values (per block, and of the per-probe totals for the full trace); for Rademacher
    probes Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2).

    Stops after a batch once m >= min_probes and stderr <= rtol |estimate|, or when the next
    batch would exceed max_matvecs (one matvec per probe; the last batch is shortened to fit).
    Probe j is probe j of curvature_kernels.rademacher's stream ``seed``."""
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, 2, "hutchinson",
        "two probes for a standard error")
    op = ScaledProducts(op)  # products of extreme scale run as c A (_result divides by c)
    blocks = _blocks(op)
    start, used = op.matvecs, 0
    run = _Running(len(blocks))
    history: list[tuple[int, float, float]] = []
    converged = False
    while used < max_matvecs:
        b = min(batch_size, max_matvecs - used)
        Z = rademacher(op.shapes, b, seed, first=used, dtype=op.dtype, device=op.device)
        AZ = op.matmat(Z)
        used += b
        run.add(_small(block_dots(Z, AZ, blocks)).T)
        means, ses, est, se = run.stats()
        if run.n >= 2:
            history.append((used, est, se))
        if _stop(rtol, run.n, min_probes, est, se):
            converged = True
            break
    return _result(op, "hutchinson", est, se, means, ses, used, used, converged, rtol,
                   max_matvecs, history, seed, start)


# ------------------------------------------------------------------------------ dispatcher
def estimate_trace(op: CurvatureOperator, method: str = "hutch++", **kw) -> TraceEstimate:
    """tr(op) by ``method``: "hutch++" (default; also "hutchpp"), "hutchinson" or "xtrace";
    keyword arguments go to the estimator (rtol, max_matvecs, batch_size, seed, ...)."""
    fns = {"hutch++": hutchpp, "hutchpp": hutchpp, "hutchinson": hutchinson, "xtrace": xtrace}
    if not isinstance(method, str) or method not in fns:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return fns[method](op, **kw)

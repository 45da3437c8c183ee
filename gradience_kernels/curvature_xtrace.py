"""XTrace (Epperly, Tropp & Webber 2024), the exchangeable Hutch++ estimator, streamed, with
per-block traces and the paper's error estimate."""

from __future__ import annotations

import math

import torch

from .curvature_kernels import block_dots, gaussian, rademacher
from .curvature_operators import CurvatureOperator
from .curvature_trace_basis import _Store, _append_gram, _extend_basis, _gram, _sym
from .curvature_product_scale import ScaledProducts
from .curvature_trace_common import (_F64, MIN_PROBES, XTRACE_PROBES, TraceEstimate, _blocks,
                                     _check_args, _result, _small, _stop)

__all__ = ["xtrace"]


def _loo_vectors(R: torch.Tensor, tau: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out directions of XTrace from R = Q^T Y [r, m] (Y = Q R): range(Y without
    column i) = Q range(R_{-i}); its orthogonal complement within range(Q) is spanned by a unit
    s_i with R^T s_i ~ e_i when column i is needed for the rank (e_i in range(R^T), leverage
    ||V^T e_i||^2 = 1 for R = U Sigma V^T), and is empty otherwise (s_i = 0: with fewer basis
    columns than probes, A's numerical rank is below m - 1 and every probe is redundant).
    s_i = (R^T)^+ e_i / ||.|| = U Sigma^-1 V^T e_i / ||.||; for square invertible R this is the
    normalized column i of R^-T of Epperly, Tropp & Webber (2024, sec. 2.1). Returns S [r, m]
    and the mask of probes with s_i != 0."""
    r, m = R.shape
    if r == 0:
        return torch.zeros(0, m, dtype=_F64), torch.zeros(m, dtype=torch.bool)
    U, sig, Vh = torch.linalg.svd(R, full_matrices=False)  # Vh [r, m] (r <= m)
    lev = (Vh * Vh).sum(0)
    X = U @ (Vh / sig[:, None])
    norms = X.norm(dim=0)
    has = (lev >= 1 - tau) & (norms > 0) & torch.isfinite(norms)
    S = torch.where(has[None, :], X / norms.clamp_min(1e-300)[None, :], torch.zeros_like(X))
    return S, has


def _xtrace_samples(R, GOQ, GOZ, GQQ, GQZ, norms2, n: int, improved: bool) -> torch.Tensor:
    """T_{i,b} [n_blocks, m]: the per-block leave-one-out Hutch++ estimates of XTrace.

    Inputs (float64): R = Q^T Y [r, m]; per block G^OQ_b = Omega_b^T Q_b [nb, m, r],
    G^OZ_b = Omega_b^T Z_b, G^QQ_b = Q_b^T Q_b, G^QZ_b = Q_b^T Z_b (Z = A Q); norms2 = ||omega||^2.
    For probe i, Pi_i = Q M Q^T with M = I - s s^T (s = s_i, _loo_vectors) projects on
    orth(Y without column i), and, with w = Q^T omega, u = M w, omega' = (I - Pi_i) omega:
      T_{i,b} = tr(P_b (Pi_i A + A Pi_i - Pi_i A Pi_i)) + c_i <omega', (I - Pi_i) A omega'>_b
      exact part = 2 (tr G^QZ_b - s^T G^QZ_b s)
                   - (tr(H G^QQ_b) - 2 s^T G^QQ_b H s + (s^T H s)(s^T G^QQ_b s)),   H = Q^T A Q,
      residual = G^OQ_b[i] . a - G^OZ_b[i] . u - u^T G^QQ_b a + u^T G^QZ_b u,
                 a = s (s^T R_i) + M H u,
    the residual using A omega = Y_i = Q R_i (so (I - Pi_i) A omega' = Q a - Z u exactly).
    c_i = 1, or for probes on the sphere ||omega||^2 = n ("improved" XTrace, sec. 2.2 of the
    paper) c_i = (n - rank Pi_i) / ||omega'||^2, ||omega'||^2 = ||omega||^2 - w^T M w: omega'
    rescaled to the radius sqrt(dim) of the complement is uniform on that sphere given the
    other probes, so each T_{i,b} stays unbiased for tr(A_bb). Summed over blocks (sum_b
    G^QQ_b = I) this is the paper's estimate T_i (its code xtrace_helper.m, term by term)."""
    m = R.shape[1]
    r = R.shape[0]
    nb = GOQ.shape[0]
    S, has = _loo_vectors(R)
    if r == 0:
        exact = torch.zeros(nb, m, dtype=_F64)
        return exact  # A Omega = 0 (Y in range(Q) = {0}): every residual form vanishes
    H = _sym(GQZ.sum(0))
    Wm = GOQ.sum(0).T                                   # Q^T Omega [r, m]
    sw = (S * Wm).sum(0)                                # s_i^T w_i [m]
    Um = Wm - S * sw                                    # u_i = M w_i
    HS = H @ S
    sHs = (S * HS).sum(0)
    GzS = GQZ @ S                                       # [nb, r, m]
    GqS = GQQ @ S
    trGz = GQZ.diagonal(dim1=1, dim2=2).sum(1)          # [nb]
    trHG = (GQQ * H).sum((1, 2))
    exact = (2 * (trGz[:, None] - (S * GzS).sum(1))
             - (trHG[:, None] - 2 * (GqS * HS).sum(1) + sHs * (S * GqS).sum(1)))
    HU = H @ Um
    A_ = S * (S * R).sum(0) + HU - S * (S * HU).sum(0)  # a_i = s (s^T R_i) + M H u_i
    resid = (torch.einsum("nir,ri->ni", GOQ, A_) - torch.einsum("nir,ri->ni", GOZ, Um)
             - (Um * (GQQ @ A_)).sum(1) + (Um * (GQZ @ Um)).sum(1))
    if improved:
        rank_i = r - has.to(_F64)
        w_m_w = (Wm * Wm).sum(0) - sw * sw
        res2 = norms2 - w_m_w
        dim = n - rank_i
        scale = torch.where((dim > 0) & (res2 > 0), dim / res2.clamp_min(1e-300),
                            torch.zeros_like(res2))
        resid = resid * scale
    return exact + resid


def xtrace(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
           batch_size: int = 16, seed: int = 0, min_probes: int = MIN_PROBES,
           probes: str = "sphere") -> TraceEstimate:
    """XTrace (Epperly, Tropp & Webber 2024): the exchangeable Hutch++ estimator, streamed, with
    per-block traces and the paper's error estimate.

    m probes omega_i, Y = A Omega, Q = orth(Y), Z = A Q (2 m matvecs). For each i, T_i is the
    Hutch++ estimate with sketch Omega without omega_i and residual probe omega_i; the estimate
    is mean_i T_i and the standard error std_i(T_i) / sqrt(m) (the paper's error estimate;
    the T_i are exchangeable, not independent, so it is a heuristic, not a sample SE: their
    positive correlation through the shared basis makes it optimistic on decaying spectra,
    measured RMS error / RMS reported SE = 1.2-1.7 for lambda_i = i^-2 and 0.9^i, 1.0-1.2 for
    flat spectra with m << P; with rtol, the actual error is then up to ~1.7 rtol, and about
    2 rtol on the bench MLP's GGN (2.05 / 2.25 rtol median / max over 3 seeds,
    bench/results/bench_curvature_cpu.json); it
    grows as m approaches P: on a flat spectrum (uniform on [0.5, 1.5], P = 200, 150 seeds)
    1.14 / 1.39 / 2.2 / 2.5 at m = 20 / 60 / 120 / 150, coverage at 3 SE 0.8 at m >= 120, and
    rtol 7e-4 (~290 matvecs) ended 2.2 rtol off in RMS; 1.09 at P = 600, m = 60). Per block:
    the same with T_{i,b} (_xtrace_samples), unbiased for tr(A_bb), sum over blocks = T_i.

    Streaming: each batch of b probes adds b columns to Y; Q grows by Gram-Schmidt of the new
    columns against the old basis (old columns kept), so a batch costs b matvecs for A omega
    and <= b for A q (exactly rank A in all when A is low rank). The per-block Gram matrices
    Omega_b^T Q_b, Omega_b^T Z_b, Q_b^T Q_b, Q_b^T Z_b and R = Q^T Y grow by their new rows and
    columns only; after the matvecs everything is m x m float64 algebra.

    probes: "sphere" (default, the paper's choice: Gaussian probes scaled to norm sqrt(P), with
    its "improved" residual scaling), "gaussian" or "rademacher" (plain XTrace). Probe i is
    probe i of curvature_kernels.gaussian's (or rademacher's) stream ``seed``, normalized for
    "sphere". Stops after a batch once m >= min_probes and stderr <= rtol |estimate|, when
    the next batch's 2 b matvecs would exceed max_matvecs, or once Q spans the whole space with
    m > P probes (a small P: every T_i is then the trace to rounding; converged when rtol is
    given)."""
    if probes not in XTRACE_PROBES:
        raise ValueError(f"probes: expected one of {XTRACE_PROBES}, got {probes!r}")
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, 4, "xtrace",
        "2 probes for the leave-one-out error estimate and 2 for A Q")
    op = ScaledProducts(op)  # products of extreme scale run as c A (_result divides by c)
    blocks = _blocks(op)
    nb = len(blocks)
    everything = [list(range(len(op.shapes)))]
    n = op.numel
    start, used = op.matvecs, 0
    Om, Q, Z = _Store(), _Store(), _Store()
    R = torch.zeros(0, 0, dtype=_F64)
    GOQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GOZ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQZ = torch.zeros(nb, 0, 0, dtype=_F64)
    norms2 = torch.zeros(0, dtype=_F64)
    history: list[tuple[int, float, float]] = []
    converged = False
    est, se = 0.0, math.nan

    def estimate(per_block: bool):
        args = (GOQ, GOZ, GQQ, GQZ) if per_block else tuple(
            g.sum(0, keepdim=True) for g in (GOQ, GOZ, GQQ, GQZ))
        return _xtrace_samples(R, *args, norms2, n, probes == "sphere")

    while True:
        b = min(batch_size, (max_matvecs - used) // 2)
        if b < 1:
            break
        m0 = Om.count
        if probes == "rademacher":
            On = rademacher(op.shapes, b, seed, first=m0, dtype=op.dtype, device=op.device)
        else:
            On = gaussian(op.shapes, b, seed, first=m0, dtype=op.dtype, device=op.device)
        nrm2 = _small(block_dots(On, On, everything)[0])
        if probes == "sphere":
            f = (n / nrm2).sqrt().to(op.dtype).to(op.device)
            for t in On:  # in place: the probes are this call's own (no P x b temporary)
                t.mul_(f.reshape(-1, *([1] * (t.dim() - 1))))
            nrm2 = _small(block_dots(On, On, everything)[0])
        Yn = op.matmat(On)
        used += b
        new, C, _ = _extend_basis(Q, Yn, everything)
        r0 = Q.count
        Om.append(On)
        norms2 = torch.cat([norms2, nrm2])
        if new is not None:
            rn = new[0].shape[0]
            Zn = op.matmat(new)
            used += rn
            Q.append(new)
            Z.append(Zn)
            R = torch.cat([torch.cat([R, C], 1),
                           torch.cat([torch.zeros(rn, m0, dtype=_F64),
                                      _gram(new, Yn, everything)[0]], 1)], 0)
            GQQ_new = Q.right(new, blocks)                             # [nb, rn, r]
            GQQ = _append_gram(GQQ, GQQ_new[:, :, :r0].transpose(1, 2), GQQ_new)
            GQZ = _append_gram(GQZ, Q.left(Zn, blocks, upto=-1), Z.right(new, blocks))
            GOQ = _append_gram(GOQ, Om.right(new, blocks, upto=-1).transpose(1, 2),
                               Q.right(On, blocks))
            GOZ = _append_gram(GOZ, Om.right(Zn, blocks, upto=-1).transpose(1, 2),
                               Z.right(On, blocks))
        else:
            R = torch.cat([R, C], 1)
            GOQ = torch.cat([GOQ, Q.right(On, blocks)], 1)
            GOZ = torch.cat([GOZ, Z.right(On, blocks)], 1)
        m = Om.count
        if m < 2:
            continue
        T = estimate(per_block=False)[0]
        est = float(T.mean())
        se = float(T.std()) / math.sqrt(m)
        history.append((used, est, se))
        if _stop(rtol, m, min_probes, est, se):
            converged = True
            break
        if Q.count == n and m > n:
            # Every leave-one-out sketch spans the whole space: each T_i is tr(A) to rounding,
            # and further probes cannot change it (a P = 5 operator spent its whole budget).
            converged = rtol is not None
            break
    Tb = estimate(per_block=True)                 # [nb, m]
    means = Tb.mean(1)
    m = Tb.shape[1]
    ses = Tb.std(1) / math.sqrt(m)
    tot = Tb.sum(0)
    est = float(means.sum())
    se = float(tot.std()) / math.sqrt(m)
    if history:
        history[-1] = (used, est, se)
    return _result(op, "xtrace", est, se, means, ses, used, m, converged, rtol, max_matvecs,
                   history, seed, start, sketch_size=Q.count, rank=Q.count)

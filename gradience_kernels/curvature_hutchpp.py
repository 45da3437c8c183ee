"""Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with the adaptive sketch of Persson, Cortinovis
and Kressner (2022), streamed, with per-block traces that are unbiased for each block."""

from __future__ import annotations

import math

import torch

from .curvature_kernels import block_dots, rademacher
from .curvature_operators import CurvatureOperator
from .curvature_trace_basis import _Store, _append_gram, _extend_basis, _sym
from .curvature_product_scale import ScaledProducts
from .curvature_trace_common import (_F64, MIN_PROBES, TraceEstimate, _blocks, _check_args,
                                     _check_int, _result, _Running, _small, _stop)

__all__ = ["hutchpp"]


def _hutchpp_exact(GQQ: torch.Tensor, GQW: torch.Tensor) -> torch.Tensor:
    """Per block tr(P_b (Pi A + A Pi - Pi A Pi)), Pi = Q Q^T, from G^QQ_b = Q_b^T Q_b and
    G^QW_b = Q_b^T (A Q)_b: 2 tr(G^QW_b) - <G^QQ_b, H>_F with H = Q^T A Q = sum_b G^QW_b
    (tr(P_b Pi A) = tr(P_b A Pi) = sum_i <q_i, A q_i>_b; tr(P_b Pi A Pi) = tr(H G^QQ_b))."""
    if GQQ.shape[1] == 0:
        return torch.zeros(GQQ.shape[0], dtype=_F64)
    H = _sym(GQW.sum(0))
    return 2 * GQW.diagonal(dim1=1, dim2=2).sum(1) - (GQQ * H).sum((1, 2))


def _hutchpp_residual(Q: _Store, W: _Store, GQQ, GQW, Z, AZ, blocks) -> torch.Tensor:
    """Per-block residual samples <z', (I - Pi) A z'>_b, z' = (I - Pi) z, for a batch of probes
    Z with AZ = A Z: [b, n_blocks]. E = tr(P_b (I - Pi) A (I - Pi)) given Q (P_b symmetric,
    idempotent): the blocks' samples sum to z'^T A z', Hutch++'s residual term.

    From Gram matrices only (no P-sized temporaries), with c = Q^T z, A z' = A z - W c
    (W = A Q), v = Q^T A z' = Q^T A z - H c:
      <z', A z'>_b = <z, A z>_b - c.(Q^T A z)_b - c.(W^T z)_b + c^T G^QW_b c
      <z', Pi A z'>_b = (Q^T z')_b . v,  (Q^T z')_b = (Q^T z)_b - G^QQ_b c."""
    d = _small(block_dots(Z, AZ, blocks))  # [nb, b]
    k = Q.count
    if k == 0:
        return d.T
    Gz = Q.left(Z, blocks)                           # [nb, k, b] (Q^T z)_b
    Gaz = Q.left(AZ, blocks)                         # [nb, k, b] (Q^T A z)_b
    Gwz = W.left(Z, blocks)                          # [nb, k, b] (W^T z)_b
    c = Gz.sum(0)                                    # [k, b]
    H = _sym(GQW.sum(0))
    zaz = (d - torch.einsum("nkj,kj->nj", Gaz, c) - torch.einsum("nkj,kj->nj", Gwz, c)
           + torch.einsum("kj,nkl,lj->nj", c, GQW, c))
    v = Gaz.sum(0) - H @ c
    qz = Gz - GQQ @ c                                # [nb, k, b]
    return (zaz - torch.einsum("nkj,kj->nj", qz, v)).T


def hutchpp(op: CurvatureOperator, rtol: float | None = None, max_matvecs: int = 1000,
            sketch_size: int | None = None, batch_size: int = 16, seed: int = 0,
            min_probes: int = MIN_PROBES) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021), streamed, with per-block traces.

    Sketch: Rademacher probes S, Q = orth(A S) (block Gram-Schmidt, batch by batch), W = A Q.
    Then tr(A) = tr(Q^T A Q) + tr((I - Pi) A (I - Pi)), Pi = Q Q^T: the first term exactly, the
    second by Hutchinson on residual Rademacher probes z' = (I - Pi) z (matvec A z only:
    A z' = A z - W Q^T z), whose sample SD / sqrt(l) is the standard error (given Q; S and the
    residual probes are independent, so the estimate is unbiased). Per block b (P_b the
    block's selector), unbiased for tr(A_bb) and summing to the total:
        tr(P_b A) = tr(P_b (Pi A + A Pi - Pi A Pi)) + tr(P_b (I - Pi) A (I - Pi)),
    the first exactly from per-block Gram matrices of Q and W, the second by
    <z', (I - Pi) A z'>_b.

    Sketch size: ``sketch_size`` probes when given; else with rtol=None the paper's split
    (max_matvecs // 3 sketch probes, as many matvecs for A Q, the rest for residual probes);
    else adaptively, in the spirit of A-Hutch++ (Persson, Cortinovis, Kressner 2022, sec. 3):
    residual probes needed for rtol are l ~ Var / (rtol tr)^2 with Var <= 2 ||A22||_F^2,
    A22 = (I - Pi) A (I - Pi), and ||A22||_F^2 = ||A||_F^2 - 2 ||A Q||_F^2 + ||Q^T A Q||_F^2,
    so adding columns to Q lowers the predicted cost by an amount known exactly from W, while a
    batch of b columns costs <= 2 b matvecs. Each sketch batch estimates, before it joins Q,
    ||(I - Pi) A||_F^2 ~ mean ||(I - Pi) A s||^2 and tr(A) ~ tr(H) + mean s^T (I - Pi) A s
    (unbiased given Q), hence ||A22||_F^2 after the batch. The sketch grows while the saving
    predicted for the next batch (the last saving times its ratio to the one before, a
    geometric decay; capped by the residual cost still to save, at an upper confidence bound
    of ||A22||_F^2) exceeds its cost 2 b, and never beyond max_matvecs // 3 probes. Decisions
    use the sketch only, never the residual probes, so the estimate stays unbiased. (A flat
    spectrum still pays one sketch batch, 2 b matvecs, that Hutchinson would not.)

    Probes: sketch probes are probes 0 .. sketch_size-1 of curvature_kernels.rademacher's stream
    ``seed``, residual probes the following ones. A sketch whose Q spans the whole space (a
    small P) makes the exact part the trace: it is returned at once, stderr 0 (converged when
    rtol is given)."""
    if sketch_size is None:
        minimum, why = 4, "1 sketch probe, 1 for A Q, 2 residual probes"
    else:
        sketch_size = _check_int(sketch_size, "sketch_size", 1)
        minimum = 2 * sketch_size + 2
        why = f"sketch_size = {sketch_size} probes and as many for A Q, 2 residual probes"
    rtol, max_matvecs, batch_size, seed, min_probes = _check_args(
        op, rtol, max_matvecs, batch_size, seed, min_probes, minimum, "hutchpp", why)
    op = ScaledProducts(op)  # products of extreme scale run as c A (_result divides by c)
    blocks = _blocks(op)
    nb = len(blocks)
    everything = [list(range(len(op.shapes)))]
    start, used, drawn = op.matvecs, 0, 0
    adaptive = rtol is not None and sketch_size is None
    k_max = sketch_size if sketch_size is not None else max(1, max_matvecs // 3)
    Q, W = _Store(), _Store()
    GQQ = torch.zeros(nb, 0, 0, dtype=_F64)
    GQW = torch.zeros(nb, 0, 0, dtype=_F64)
    w2 = 0.0              # ||A Q||_F^2
    last_gain = None      # the last batch's drop of ||A22||_F^2
    while drawn < k_max:
        b = min(batch_size, k_max - drawn)
        S = rademacher(op.shapes, b, seed, first=drawn, dtype=op.dtype, device=op.device)
        Y = op.matmat(S)
        used += b
        drawn += b
        new, _, X = _extend_basis(Q, Y, everything)
        if adaptive:
            H = _sym(GQW.sum(0))
            f_j = _small(block_dots(X, X, everything))[0]    # ||(I - Pi) A s_j||^2
            f_hat = float(f_j.mean())                         # ~ ||(I - Pi) A||_F^2
            f_se = float(f_j.std()) / math.sqrt(b) if b > 1 else f_hat
            t_hat = float(H.trace()) + float(_small(block_dots(S, X, everything)).mean())
            a_hat = f_hat + w2                                           # ||A||_F^2
            before = max(a_hat - 2 * w2 + float((H * H).sum()), 0.0)
        if new is not None:
            r = new[0].shape[0]
            Wn = op.matmat(new)
            used += r
            k = Q.count
            Q.append(new)
            W.append(Wn)
            w2 += float(_small(block_dots(Wn, Wn, everything)).sum())
            new_q = Q.right(new, blocks)                     # [nb, r, k + r]
            GQQ = _append_gram(GQQ, new_q[:, :, :k].transpose(1, 2), new_q)
            old_w = Q.left(Wn, blocks, upto=-1)              # [nb, k, r]
            GQW = _append_gram(GQW, old_w, W.right(new, blocks))
        if not adaptive:
            continue
        H = _sym(GQW.sum(0))
        after = max(a_hat - 2 * w2 + float((H * H).sum()), 0.0)
        gain = before - after
        per_unit = math.inf if t_hat == 0 else 2.0 / (rtol * t_hat) ** 2  # probes per F-norm^2
        ratio = 1.0 if not last_gain or last_gain <= 0 else min(1.0, max(gain, 0.0) / last_gain)
        last_gain = gain
        b_next = min(batch_size, k_max - drawn)
        # after = before - gain is a difference of estimates with noise ~ f_se (relative to
        # ||(I - Pi_old) A||_F^2, not to the smaller remainder): cap the saving by an upper
        # confidence bound of the remainder, so one noisy batch does not stop the growth.
        saving = min(per_unit * gain * ratio, per_unit * (after + 2 * f_se) - min_probes)
        if new is None or b_next < 1 or not saving > 2 * b_next:
            break
    exact = _hutchpp_exact(GQQ, GQW)
    sketch = drawn
    run = _Running(nb)
    history: list[tuple[int, float, float]] = []
    converged = False
    if Q.count == op.numel:
        # Q spans the whole space: tr(Q^T A Q) is the trace to rounding, the residual is 0 and
        # residual probes would only spend the budget (min_probes of them: never 'converged').
        means, ses = exact, torch.zeros_like(exact)
        est, se = float(means.sum()), 0.0
        history.append((used, est, se))
        return _result(op, "hutch++", est, se, means, ses, used, drawn, rtol is not None, rtol,
                       max_matvecs, history, seed, start, sketch_size=sketch, rank=Q.count)
    while used < max_matvecs:
        b = min(batch_size, max_matvecs - used)
        Z = rademacher(op.shapes, b, seed, first=drawn, dtype=op.dtype, device=op.device)
        AZ = op.matmat(Z)
        used += b
        drawn += b
        run.add(_hutchpp_residual(Q, W, GQQ, GQW, Z, AZ, blocks))
        rmeans, ses, _, se = run.stats()
        means = exact + rmeans
        est = float(means.sum())
        if run.n >= 2:
            history.append((used, est, se))
        if _stop(rtol, run.n, min_probes, est, se):
            converged = True
            break
    return _result(op, "hutch++", est, se, means, ses, used, drawn, converged, rtol,
                   max_matvecs, history, seed, start, sketch_size=sketch, rank=Q.count)

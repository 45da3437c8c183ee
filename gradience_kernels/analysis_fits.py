"""The power-law fit of every analysed layer (WeightWatcher 0.7.7's WWFit rules: one batched
fit_power_law call, the small-sample rule, the 2-point candidate), its metrics and its row."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .analysis_layers import _Layer

_WW_SMALL_N = 20          # WW_powerlaw.SMALL_N_CUTOFF: below, WWFit's small-sample rule
_WW_SMALL_N_KMIN = 8      # fit_powerlaw_smallN's k_min
_WW_SMALL_N_PENALTY = 0.868
_TWO_POINT_D = 1.0 - math.exp(-2.0) - 0.5   # D of WWFit's 2-point tail candidate, always
_OVER_TRAINED, _UNDER_TRAINED = 2.0, 6.0    # constants.OVER/UNDER_TRAINED_THRESH


def _small_n_fit(x: np.ndarray) -> dict:
    """WWFit's rule for fewer than 20 values (fit_powerlaw_smallN, lambda_prior = 0): tails of
    at least 8 values, alpha = 1 + (n - 1)/S, xmin minimising D - 0.868/sqrt(n)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n_all = x.size
    logs = np.log(x)
    best, best_j = None, math.inf
    for i in range(n_all - 1):
        n = n_all - i
        if n < _WW_SMALL_N_KMIN:
            continue
        s = float(np.sum(logs[i:]) - n * logs[i])
        if s <= 1e-12:
            continue
        alpha = 1.0 + (n - 1.0) / s
        if alpha <= 1.0:
            continue
        F = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        D = float(np.max(np.abs(np.arange(n) / n - F)))
        J = D - _WW_SMALL_N_PENALTY / math.sqrt(n)
        if J < best_j:
            best_j, best = J, (i, alpha, D, n)
    if best is None:
        if n_all == 0:
            return {}
        s = float(np.sum(logs) - n_all * logs[0])
        if s <= 1e-12:
            return {"xmin": float(x[0]), "alpha": 1.0, "D": 1.0, "sigma": 0.0}
        alpha = 1.0 + (n_all - 1.0) / s
        F = 1.0 - (x / x[0]) ** (1.0 - alpha)
        D = float(np.max(np.abs(np.arange(n_all) / n_all - F)))
        best = (0, alpha, D, n_all)
    i, alpha, D, n = best
    return {"xmin": float(x[i]), "alpha": alpha, "D": D, "sigma": (alpha - 1.0) / math.sqrt(n)}


def _fit_layers(layers: list[_Layer], idx: list[int], thresh: float) -> None:
    """Fit every layer in idx: one batched fit_power_law call for the layers with >= 20 values
    above thresh, WWFit's small-sample rule for the others."""
    from .power_law import fit_power_law

    big, big_vals = [], []
    for i in idx:
        layer = layers[i]
        v = layer.evals[layer.evals > thresh]
        layer.fit = {}
        if v.numel() >= _WW_SMALL_N:
            big.append(i)
            big_vals.append(v)
        elif v.numel() > 0:
            layer.fit = _small_n_fit(v.numpy())
            if layer.fit:
                layer.fit["rule"] = "small-N"
    if big:
        fits = fit_power_law(big_vals, nonpositive="error")
        for i, v, f in zip(big, big_vals, fits):
            D = float(f.D)
            if math.isnan(D) or D > _TWO_POINT_D:
                # WWFit's extra candidate (the second-largest value, a 2-point tail) wins.
                top = torch.sort(v).values[-2:].tolist()
                if top[1] > top[0]:
                    alpha = 1.0 + 2.0 / math.log(top[1] / top[0])
                    layers[i].fit = {"xmin": top[0], "alpha": alpha, "D": _TWO_POINT_D,
                                     "sigma": (alpha - 1.0) / math.sqrt(2.0), "rule": "2-point"}
                    continue
            if math.isnan(float(f.alpha)):
                continue
            layers[i].fit = {"xmin": float(f.xmin), "alpha": float(f.alpha), "D": D,
                             "sigma": float(f.sigma), "rule": "CSN"}


# --------------------------------------------------------------------------- metrics
def _metrics(layer: _Layer) -> dict[str, Any]:
    from .spectrum_metrics import marchenko_pastur_fit, spectral_metrics

    lam = layer.evals.numpy()
    lmax = float(lam[-1])
    total = float(lam.sum())
    N, M, rf = layer.N, layer.M, layer.rf
    # A pooled conv layer's values are the singular values of the block-diagonal matrix of its
    # rf slices, (rf N) x (rf M): its metrics are those of that matrix (rf = 1: W itself).
    sm = spectral_metrics(layer.evals, (rf * N, rf * M), values_are="squared",
                          dtype=torch.float64)
    # Marchenko-Pastur per slice (the slices are the random matrices), Gavish-Donoho noise level
    # and Tracy-Widom 0.99 margin (spectrum_metrics.marchenko_pastur_fit); edge in lambda units.
    mp = marchenko_pastur_fit(layer.per_matrix, (N, M), values_are="squared")
    s = np.sqrt(lam)
    out: dict[str, Any] = {
        "lambda_max": lmax,
        "spectral_norm": float(sm.spectral_norm),
        "log_spectral_norm": math.log10(lmax) if lmax > 0 else -math.inf,
        "frobenius_norm": float(sm.frobenius_norm),
        "log_norm": math.log10(total) if total > 0 else -math.inf,
        "stable_rank": total / lmax if lmax > 0 else math.nan,
        "nuclear_norm": float(sm.nuclear_norm),
        "effective_rank": float(sm.effective_rank),
        "condition_number": float(sm.condition_number),
        # WeightWatcher's matrix_rank: s > s_max N eps(float64), N of one matrix.
        "matrix_rank": int(np.count_nonzero(s > s[-1] * N * np.finfo(np.float64).eps)),
    }
    if total > 0:
        p = lam[lam > 0] / total
        rank = max(out["matrix_rank"], 2)
        out["entropy"] = float(-np.sum(p * np.log(p)) / math.log(rank))
    else:
        out["entropy"] = math.nan
    out["mp_bulk_edge"] = float(mp.bulk_edge.max()) * N
    out["mp_spikes"] = int(mp.num_spikes.sum())
    alpha = layer.fit.get("alpha") if layer.fit else None
    if alpha is not None and math.isfinite(alpha) and lmax > 0:
        out["alpha_weighted"] = alpha * math.log10(lmax)
        with np.errstate(over="ignore"):
            lan = float(np.sum(lam ** alpha))
        out["log_alpha_norm"] = math.log10(lan) if lan > 0 else -math.inf
    else:
        out["alpha_weighted"] = math.nan
        out["log_alpha_norm"] = math.nan
    return out


def _row(layer: _Layer, thresh: float) -> dict[str, Any]:
    f = layer.fit
    row: dict[str, Any] = {
        "name": layer.name, "kind": layer.kind, "shape": tuple(int(d) for d in layer.weight.shape),
        "N": layer.N, "M": layer.M, "rf": layer.rf, "num_evals": int(layer.evals.numel()),
    }
    if f:
        alpha = f["alpha"]
        row.update({
            "alpha": alpha, "xmin": f["xmin"], "xmax": float(layer.evals[-1]), "D": f["D"],
            "sigma": f["sigma"], "n_tail": int((layer.evals >= f["xmin"]).sum()),
            "status": "success",
            "warning": ("over-trained" if alpha < _OVER_TRAINED else
                        "under-trained" if alpha > _UNDER_TRAINED else ""),
            "fit_rule": f.get("rule", ""),
        })
    else:
        n_fit = int((layer.evals > thresh).sum())
        row.update({"alpha": math.nan, "xmin": math.nan, "xmax": float(layer.evals[-1]),
                    "D": math.nan, "sigma": math.nan, "n_tail": 0,
                    "status": f"failed: {n_fit} eigenvalues > {thresh:g} (too few distinct)",
                    "warning": "", "fit_rule": ""})
    row.update(_metrics(layer))
    row["precision"] = layer.route
    return row

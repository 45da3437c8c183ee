"""The demo's curvature section: Hessian trace (three estimators), top-5 Hessian eigenvalues,
the stability margin 2/lr - lambda_max of the demo's SGD, and the empirical Fisher trace, for
the demo MLP after its 20 SGD steps, on 128 of its synthetic samples."""

from __future__ import annotations

import time

import torch

from . import demo

CURVATURE_SAMPLES = 128
TRACE_RTOL = 0.05  # the trace rows stop at a 5% relative standard error (or the budget)
TRACE_BUDGET = 256


def curvature_rows(seed: int = 0, samples: int = CURVATURE_SAMPLES,
                   budget: int = TRACE_BUDGET) -> dict[str, object]:
    """Trace rows (method, estimate, stderr, matvecs, time), the top-5 eigenvalues, the
    stability margin at the demo's learning rate, and the Fisher trace."""
    from .curvature_eigen import lanczos, stability_margin
    from .curvature_operators import hessian
    from .curvature_samples import fisher_trace
    from .curvature_trace import estimate_trace

    _, model, _ = demo.train_small_model(seed, 20)
    inputs, labels = demo.synthetic_data(torch.Generator().manual_seed(seed))
    batch = (inputs[:samples], labels[:samples])
    loss_fn = torch.nn.functional.cross_entropy
    op = hessian(model, loss_fn, batch)
    t0 = time.perf_counter()
    op.prepare()  # the gradient graph and the jvp closures, outside the estimators' times
    t_prepare = time.perf_counter() - t0
    traces = []
    for method in ("hutchinson", "hutch++", "xtrace"):
        op.reset_count()
        t0 = time.perf_counter()
        est = estimate_trace(op, method=method, rtol=TRACE_RTOL, max_matvecs=budget,
                             seed=seed)
        traces.append({"method": method, "estimate": est, "time_s": time.perf_counter() - t0})
    op.reset_count()
    t0 = time.perf_counter()
    eig = lanczos(op, k=5, which="largest", seed=seed)
    t_eig = time.perf_counter() - t0
    margin = stability_margin(float(eig.eigenvalues[0]), demo.SGD_LR)
    t0 = time.perf_counter()
    fisher = fisher_trace(model, loss_fn, batch)
    t_fisher = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"traces": traces, "eigen": eig, "eigen_time_s": t_eig, "margin": margin,
            "fisher_trace": float(fisher), "fisher_time_s": t_fisher, "n_params": n_params,
            "samples": samples, "budget": budget, "hvp_method": op.single_method,
            "batch_methods": {b: path for b, path in sorted(op.choices.items()) if b > 1},
            "prepare_time_s": t_prepare}


def format_curvature(rows: dict[str, object]) -> str:
    head = f"{'Hessian trace':<14}{'estimate':>12}{'std err':>11}{'rel':>8}{'matvecs':>9}{'time':>9}"
    lines = [head, "-" * len(head)]
    for r in rows["traces"]:
        e = r["estimate"]
        lines.append(f"{r['method']:<14}{e.trace:>12.4g}{e.stderr:>11.3g}"
                     f"{e.stderr / abs(e.trace):>8.2%}{e.matvecs:>9d}{r['time_s']:>8.2f}s")
    eig = rows["eigen"]
    values = ", ".join(f"{float(v):.4g}" for v in eig.eigenvalues)
    m = rows["margin"]
    lines.append(f"top-5 eigenvalues (Lanczos, {eig.matvecs} matvecs, "
                 f"{rows['eigen_time_s']:.2f}s): {values}")
    lines.append(f"stability margin at lr = {demo.SGD_LR}: 2/lr - lambda_max = "
                 f"{m.threshold:.4g} - {m.lambda_max:.4g} = {m.margin:.4g}"
                 f" ({'stable' if m.margin > 0 else 'beyond the edge of stability'})")
    lines.append(f"empirical Fisher trace (exact, {rows['samples']} per-sample gradients): "
                 f"{rows['fisher_trace']:.4g} ({rows['fisher_time_s']:.2f}s)")
    batches = "".join(f", batches of {b} by {_path_name(p)}"
                      for b, p in rows["batch_methods"].items())
    lines.append(
        f"{rows['n_params']} parameters, {rows['samples']} samples, cross-entropy loss; single "
        f"HVPs by {_path_name(rows['hvp_method'])}{batches} (chosen from the timings of the "
        f"first products; operator built in {rows['prepare_time_s']:.1f}s). Each trace stops at a "
        f"{TRACE_RTOL:.0%} relative standard error or {rows['budget']} HVPs. Hutch++ and XTrace "
        "deflate the top of the spectrum: this Hessian's is flat (lambda_max ~ 1.3 of a trace "
        "~ 40), so they gain little here; on the GGNs of bench/bench_curvature.py they need a "
        "fraction of Hutchinson's HVPs.")
    return "\n".join(lines)


def _path_name(path: str | None) -> str:
    """How the operator computed a product: a method, or a loop of single products."""
    if path is None:
        return "not chosen yet"
    return "a loop of single products" if path == "loop" else path.replace("_", " ")

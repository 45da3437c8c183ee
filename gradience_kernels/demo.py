"""The main job (`gradience demo`): tail estimates on built-in data, with timings next to a
NumPy sort-based Hill on the same data.

Data: 10^7 draws each of Cauchy (alpha = 1), Student-t(3) (alpha = 3), Laplace and Gaussian
(exponential-type tails: gamma = 0), and the gradients of a small MLP that the demo builds and
trains for a few steps on synthetic data (all parameter gradients read as one sample).

Spectra section: ``analyze`` of that MLP's weight matrices at initialization and after training
(the same loop on the same data, run on to 500 SGD steps; the gradient rows stop at 20), in
WeightWatcher's conventions: power-law alpha of the ESD tail, stable rank, spectral norm,
Marchenko-Pastur spikes; with the time analyze takes (~2.5 s of training added to the demo).

Curvature section (demo_curvature.py): Hessian trace by Hutchinson, Hutch++ and XTrace with
standard errors and HVP counts, top-5 Hessian eigenvalues (Lanczos), the stability margin
2/lr - lambda_max of the demo's SGD, and the exact empirical Fisher trace (~10 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import tail, tail_fits, tail_selection

K_RATIOS = (0.05, 0.1, 0.2)


def built_in_samples(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    normal = torch.randn(n, generator=g, dtype=torch.float64)
    chi2 = torch.randn(3, n, generator=g, dtype=torch.float64).pow(2).sum(0)
    return {
        "Cauchy": torch.tan(torch.pi * (u - 0.5)).float(),
        "Student-t(3)": (torch.randn(n, generator=g, dtype=torch.float64) / (chi2 / 3).sqrt()).float(),
        "Laplace": (-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())).float(),
        "Gaussian": normal.float(),
    }


def small_model_gradients(seed: int, steps: int = 20) -> list[torch.Tensor]:
    """Gradients of every parameter of a 3-layer MLP after `steps` SGD steps."""
    return train_small_model(seed, steps)[2]


SGD_LR = 0.05


def synthetic_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's 2048 synthetic samples: standard normal inputs [2048, 256], labels in 0..9."""
    inputs = torch.randn(2048, 256, generator=g)
    labels = torch.randint(0, 10, (2048,), generator=g)
    return inputs, labels


def train_small_model(seed: int, steps: int = 20
                      ) -> tuple[dict[str, torch.Tensor], torch.nn.Module, list[torch.Tensor]]:
    """The demo's 3-layer MLP trained for `steps` SGD steps on synthetic data: its initial
    state_dict, the trained model, and the gradients of every parameter at the last step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    inputs, labels = synthetic_data(g)
    for step in range(steps + 1):
        batch = slice((step * 128) % 2048, (step * 128) % 2048 + 128)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        loss.backward()
        if step < steps:
            opt.step()
    return initial, model, [p.grad.detach().clone() for p in model.parameters()]


def numpy_sort_hill(arrays: list[np.ndarray], ratios=K_RATIOS) -> list[float]:
    """The usual NumPy route: |x|, drop zeros/non-finite, full sort, Hill per k."""
    a = np.abs(np.concatenate([x.reshape(-1) for x in arrays]).astype(np.float64))
    a = a[np.isfinite(a) & (a > 0)]
    a = np.sort(a)[::-1]
    logs = np.log(a)
    out = []
    for r in ratios:
        k = int(r * a.size)
        out.append(k / float(np.sum(logs[:k] - logs[k])))
    return out


def _timed(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    best = float("inf")
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def tail_table(n: int = 10**7, seed: int = 0) -> list[dict[str, object]]:
    samples: dict[str, list[torch.Tensor]] = {
        name: [x] for name, x in built_in_samples(n, seed).items()
    }
    samples["MLP gradients"] = small_model_gradients(seed)
    rows = []
    for name, xs in samples.items():
        (stats, counts), t_ours = _timed(lambda: tail.tail_stats(xs, (), K_RATIOS))
        moment = tail.moment_estimator(xs, k_ratio=0.05)
        pick = tail.pickands(xs, k_ratio=0.05)
        arrays = [x.numpy() for x in xs]
        ref_alphas, t_numpy = _timed(lambda: numpy_sort_hill(arrays), repeats=1)
        alphas = (stats[:, 0] / stats[:, 5]).tolist()
        rows.append(
            {
                "data": name,
                "n_eff": int(counts[0]),
                "alpha": alphas,
                "numpy_alpha": ref_alphas,
                "moment_gamma": float(moment.gamma),
                "moment_stderr": float(moment.stderr),
                "pickands_gamma": float(pick.gamma),
                "time_s": t_ours,
                "numpy_time_s": t_numpy,
            }
        )
    return rows


def format_tail_table(rows: list[dict[str, object]]) -> str:
    head = (
        f"{'data':<15}{'n_eff':>11}"
        + "".join(f"{'Hill a k/n=' + str(r):>16}" for r in K_RATIOS)
        + f"{'moment g':>16}{'Pickands g':>12}{'gradience':>11}{'NumPy sort':>12}{'speed-up':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        alphas = "".join(f"{a:>16.4f}" for a in r["alpha"])
        moment = f"{r['moment_gamma']:+.3f}±{r['moment_stderr']:.3f}"
        lines.append(
            f"{r['data']:<15}{r['n_eff']:>11}{alphas}{moment:>16}{r['pickands_gamma']:>+12.3f}"
            f"{r['time_s'] * 1e3:>9.1f}ms{r['numpy_time_s'] * 1e3:>10.0f}ms"
            f"{r['numpy_time_s'] / r['time_s']:>9.0f}x"
        )
    worst = max(
        abs(a - b) / abs(b) for r in rows for a, b in zip(r["alpha"], r["numpy_alpha"])
    )
    lines.append(
        f"Hill alpha agrees with the NumPy sort-based Hill to a relative {worst:.1e}. "
        "Moment gamma > 0: power-law tail (alpha = 1/gamma); ~0: exponential-type tail."
    )
    return "\n".join(lines)


def run_demo(n: int = 10**7, seed: int = 0) -> None:
    print(f"gradience demo: tail index of |x| on built-in data ({torch.get_num_threads()} threads)")
    print(format_tail_table(tail_table(n, seed)))
    print(f"\nTail type, k* and intervals (first {min(n, SUITE_N):.0e} entries of each sample), "
          "alpha-stable fit")
    print(format_suite_table(suite_table(n, seed, min(n, SUITE_N))))
    print(f"\nSpectra of the MLP's weight matrices at initialization and after {SPECTRA_STEPS} "
          "SGD steps (analyze, WeightWatcher conventions)")
    print(format_spectra_table(spectra_table(seed)))
    from .demo_curvature import curvature_rows, format_curvature

    print("\nCurvature of the MLP's loss after 20 SGD steps (Hessian-vector products)")
    print(format_curvature(curvature_rows(seed)))


SPECTRA_STEPS = 500


def spectra_table(seed: int = 0, steps: int = SPECTRA_STEPS) -> list[dict[str, object]]:
    """``analyze`` of the demo MLP (the model of the gradient rows, same data and optimizer)
    at initialization and after `steps` SGD steps: one row per layer with both."""
    from .analysis import analyze

    initial, model, _ = train_small_model(seed, steps)
    t0 = time.perf_counter()
    before = analyze(initial, progress=False)
    after = analyze(model, progress=False)
    t = (time.perf_counter() - t0) / 2
    return [{"name": a["name"], "shape": a["shape"], "before": b, "after": a, "time_s": t,
             "steps": steps} for b, a in zip(before, after)]


_SPECTRA_COLUMNS = (("alpha", "alpha", ".2f"), ("D", "D", ".3f"), ("n_tail", "n_tail", "d"),
                    ("stable_rank", "stable rank", ".1f"), ("spectral_norm", "||W||_2", ".3f"),
                    ("mp_spikes", "MP spikes", "d"))


def format_spectra_table(rows: list[dict[str, object]]) -> str:
    cells = [["layer", "shape"] + [h + " init -> trained" for _, h, _ in _SPECTRA_COLUMNS]]
    for r in rows:
        line = [str(r["name"]), "x".join(str(d) for d in r["shape"])]
        for key, _, spec in _SPECTRA_COLUMNS:
            pair = []
            for tag in ("before", "after"):
                v = r[tag].get(key)
                pair.append("-" if v is None or (isinstance(v, float) and v != v)
                            else format(v, spec))
            line.append(" -> ".join(pair))
        cells.append(line)
    widths = [max(len(c[j]) for c in cells) for j in range(len(cells[0]))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if j < 2 else x.rjust(w)
                               for j, (x, w) in enumerate(zip(c, widths))))
        if i == 0:
            lines.append("-" * len(lines[0]))
    steps = rows[0]["steps"] if rows else 0
    t = rows[0]["time_s"] if rows else 0.0
    lines.append(
        f"{steps} SGD steps on the synthetic data of the gradient rows. alpha: power-law exponent "
        "of the tail of the eigenvalues of W^T W (WeightWatcher: < 2 over-trained, > 6 "
        "under-trained); MP spikes: eigenvalues above the Marchenko-Pastur bulk edge. "
        f"analyze took {t * 1e3:.0f} ms per model; the 10x512 layer (10 eigenvalues) is fitted "
        "with WeightWatcher's small-sample rule.")
    return "\n".join(lines)


SUITE_N = 10**6


def suite_table(n: int = 10**7, seed: int = 0, suite_n: int = SUITE_N) -> list[dict[str, object]]:
    """Per sample: tail_index (double-bootstrap k*, intervals, verdict) on the first suite_n
    entries, and the McCulloch stable fit on all of them."""
    samples: dict[str, list[torch.Tensor]] = {
        name: [x] for name, x in built_in_samples(n, seed).items()
    }
    samples["MLP gradients"] = small_model_gradients(seed)
    rows = []
    for name, xs in samples.items():
        head = _first_entries(xs, suite_n)
        t0 = time.perf_counter()
        ti = tail_selection.tail_index(head, seed=seed)
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        stable = tail_fits.fit_stable(xs)
        t_stable = time.perf_counter() - t0
        rows.append({"data": name, "n": sum(int(t.numel()) for t in head), "index": ti,
                     "time_s": t_index, "stable": stable, "stable_time_s": t_stable,
                     "stable_n": sum(int(t.numel()) for t in xs)})
    return rows


def _first_entries(xs: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    out, left = [], n
    for t in xs:
        if left <= 0:
            break
        flat = t.reshape(-1)
        out.append(flat[:left])
        left -= int(out[-1].numel())
    return out


def format_suite_table(rows: list[dict[str, object]]) -> str:
    head = (f"{'data':<15}{'n':>9}{'verdict':>18}{'moment g [95%]':>26}{'k*':>8}"
            f"{'Hill a [95%]':>24}{'k*':>8}{'LR z':>8}{'time':>8}"
            f"{'stable a':>10}{'beta':>7}{'fit time':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ti = r["index"]
        g = f"{ti.gamma:+.3f} [{ti.gamma_interval.low:+.3f}, {ti.gamma_interval.high:+.3f}]"
        a = ("-" if ti.verdict != "power-law" else
             f"{ti.alpha:.3f} [{ti.alpha_interval.low:.3f}, {ti.alpha_interval.high:.3f}]")
        st = r["stable"]
        lines.append(
            f"{r['data']:<15}{r['n']:>9}{ti.verdict:>18}{g:>26}{ti.k_moment:>8}{a:>24}"
            f"{ti.k_hill:>8}{ti.likelihood_ratio.z:>8.1f}{r['time_s']:>7.1f}s"
            f"{st.alpha:>10.3f}{st.beta:>+7.2f}{r['stable_time_s'] * 1e3:>8.0f}ms")
    lines.append(
        "k* by the double bootstrap (Hill: Danielsson/Qi; moment: Draisma), 500 resamples of "
        "each size; LR z > 0 favours a power law over an exponential above X(k*+1). Stable fit "
        "(McCulloch quantiles) on every entry.")
    return "\n".join(lines)

"""Benchmark of the spectral tools (issue 5): randomized SVD, the batched power-law fit, and
``gradience_kernels.analyze`` against WeightWatcher's ``analyze()`` on the same model.

Parts (``--parts``, all by default):
  svd      rows of bench/spectral_svd_rows.py ``svd_rows(quick)``: randomized_svd / spectrum
           against torch.linalg.svdvals and torch.svd_lowrank, with accuracy.
  fit      rows of bench/spectral_fit_rows.py ``power_law_rows(quick=...)``: the batched
           fit_power_law against powerlaw.Fit and WeightWatcher's WWFit.
  analyze  ``gradience_kernels.analyze(model)`` (precision 'auto', the default, and 'float64')
           against ``weightwatcher.WeightWatcher(model=model).analyze()`` (its plain defaults)
           on an in-code transformer: time of both (median of interleaved runs), the speed-up,
           and the alpha difference on every layer both analyse (matched by name and N x M),
           with the other shared columns (xmin, D, n_tail, lambda_max, stable rank, ...).

The model (``build_transformer``): 4 blocks of width 768 (q, k, v, o projections 768x768, MLP
768x3072 and 3072x768, LayerNorms), an 8192x768 token embedding and a separate 768->8192
output layer: 40.9M parameters, 26 weight matrices. Weights are a heavy-tailed random init with
a fixed seed: every weight matrix gets i.i.d. Student-t entries, 0.02 * t(df), with df cycling
through (2, 2.5, 3, 4) over the matrices in order. Heavy-tailed entries give an ESD with a
power-law tail (Martin & Mahoney, JMLR 22(165) 2021, the "heavy-tailed random matrix" model),
so the fits have real tails (seed 0: alpha 2.1-2.8 for df 2, 3.4-5.3 for df 2.5, 4.6-12 for
df 3) next to near-Marchenko-Pastur layers (df 4: alpha 8-25 on tails of 10 to 68 eigenvalues,
where alpha is most sensitive to eigenvalue rounding). ``--quick``: a tiny transformer (2
blocks, width 64, MLP 256, vocabulary 512) and one run of each tool.

WeightWatcher and powerlaw are optional: the 'analyze' part compares only when
``import weightwatcher`` works (its rows are written either way). Set-up, without letting pip
touch torch:
    pip install --no-deps weightwatcher==0.7.7 powerlaw==2.0.0
    pip install pandas matplotlib matplotlib-inline scikit-learn mpmath tqdm safetensors

Usage:  python bench/bench_spectral.py                # full sizes
        python bench/bench_spectral.py --quick --parts analyze
Writes bench/results/bench_spectral_cpu.json (or --out NAME, --out-dir DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

from gradience_kernels.analysis import analyze  # noqa: E402

DFS = (2.0, 2.5, 3.0, 4.0)
FULL = {"vocab": 8192, "width": 768, "mlp": 3072, "blocks": 4}
QUICK = {"vocab": 512, "width": 64, "mlp": 256, "blocks": 2}


# --------------------------------------------------------------------------- the model
class Block(torch.nn.Module):
    def __init__(self, width: int, mlp: int):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(width)
        self.q = torch.nn.Linear(width, width)
        self.k = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width)
        self.o = torch.nn.Linear(width, width)
        self.ln2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, mlp)
        self.fc2 = torch.nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = torch.nn.functional.scaled_dot_product_attention(
            self.q(h), self.k(h), self.v(h), is_causal=True)
        x = x + self.o(att)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Transformer(torch.nn.Module):
    def __init__(self, vocab: int, width: int, mlp: int, blocks: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList([Block(width, mlp) for _ in range(blocks)])
        self.ln = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln(x))


def build_transformer(vocab: int = 8192, width: int = 768, mlp: int = 3072, blocks: int = 4,
                      seed: int = 0, dfs=DFS) -> Transformer:
    """The benchmark model with its heavy-tailed init (module docstring)."""
    torch.manual_seed(seed)
    model = Transformer(vocab, width, mlp, blocks)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        mats = [p for p in model.parameters() if p.dim() == 2]
        for i, p in enumerate(mats):
            t = rng.standard_t(dfs[i % len(dfs)], size=tuple(p.shape)).astype(np.float32)
            p.copy_(torch.from_numpy(0.02 * t))
    return model.eval()


# --------------------------------------------------------------------------- analyze vs WW
def _weightwatcher():
    try:
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import weightwatcher  # noqa: F401
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        return weightwatcher
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed"
        return f"{type(err).__name__}: {err}"


def _ww_analyze(ww_mod, model):
    # WWFit prints "SMALL N PL FIT" on stdout for short spectra: keep the table clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return ww_mod.WeightWatcher(model=model).analyze()


SHARED = (  # (our key, WeightWatcher's column, relative?)
    ("xmin", "xmin", True), ("D", "D", False), ("n_tail", "num_pl_spikes", False),
    ("lambda_max", "lambda_max", True), ("log_spectral_norm", "log_spectral_norm", False),
    ("log_norm", "log_norm", False), ("stable_rank", "stable_rank", True),
    ("alpha_weighted", "alpha_weighted", False), ("log_alpha_norm", "log_alpha_norm", False),
    ("matrix_rank", "matrix_rank", False), ("num_evals", "num_evals", False),
)


def run_analyze(quick: bool, repeats: int, seed: int) -> dict[str, object]:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    model = build_transformer(**sizes, seed=seed)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    info: dict[str, object] = {
        "model": {**sizes, "parameters": n_params, "seed": seed, "student_t_dfs": list(DFS),
                  "init": "0.02 * Student-t(df) entries, df cycling over the weight matrices",
                  "weight_matrices": sum(1 for p in model.parameters() if p.dim() == 2)},
        "build_s": build_s,
    }
    ww_mod = _weightwatcher()
    have_ww = not isinstance(ww_mod, str)
    info["weightwatcher"] = ww_mod.__version__ if have_ww else f"not available ({ww_mod})"

    # Warm-up (imports, the op library, LAPACK workspaces), then interleaved timed runs: the
    # machines are shared, and interleaving spreads their noise over both sides.
    rows = {p: analyze(model, precision=p) for p in ("auto", "float64")}
    ww_df = _ww_analyze(ww_mod, model) if have_ww else None
    times: dict[str, list[float]] = {"auto": [], "float64": [], "weightwatcher": []}
    for _ in range(repeats):
        for p in ("auto", "float64"):
            t0 = time.perf_counter()
            rows[p] = analyze(model, precision=p)
            times[p].append(time.perf_counter() - t0)
        if have_ww:
            t0 = time.perf_counter()
            ww_df = _ww_analyze(ww_mod, model)
            times["weightwatcher"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    info["times_s"] = times
    info["median_s"] = med
    if have_ww:
        info["speedup_auto"] = med["weightwatcher"] / med["auto"]
        info["speedup_float64"] = med["weightwatcher"] / med["float64"]

    layers = []
    ww_rows = {}
    if ww_df is not None:
        for rec in ww_df.to_dict("records"):
            ww_rows[(str(rec["longname"]), int(rec["N"]), int(rec["M"]))] = rec
    matched = 0
    for r_auto, r64 in zip(rows["auto"], rows["float64"]):
        entry = {"name": r_auto["name"], "shape": list(r_auto["shape"]), "N": r_auto["N"],
                 "M": r_auto["M"], "alpha": r_auto["alpha"], "alpha_float64": r64["alpha"],
                 "xmin": r_auto["xmin"], "D": r_auto["D"], "n_tail": r_auto["n_tail"],
                 "stable_rank": r_auto["stable_rank"], "effective_rank": r_auto["effective_rank"],
                 "spectral_norm": r_auto["spectral_norm"], "mp_spikes": r_auto["mp_spikes"],
                 "precision": r_auto["precision"]}
        ww = ww_rows.get((r_auto["name"], r_auto["N"], r_auto["M"]))
        if ww is not None:
            matched += 1
            entry["ww_alpha"] = float(ww["alpha"])
            entry["alpha_diff"] = abs(r_auto["alpha"] - float(ww["alpha"]))
            entry["alpha_diff_float64"] = abs(r64["alpha"] - float(ww["alpha"]))
            for ours, theirs, rel in SHARED:
                a, b = float(r_auto[ours]), float(ww[theirs])
                d = abs(a - b) / abs(b) if (rel and b != 0) else abs(a - b)
                entry[f"{ours}_{'rel_' if rel else ''}diff"] = d
        layers.append(entry)
    info["layers"] = layers
    info["layers_ours"] = len(rows["auto"])
    info["layers_weightwatcher"] = len(ww_rows)
    info["layers_matched"] = matched
    if matched:
        both = [e for e in layers if "alpha_diff" in e]
        info["max_alpha_diff"] = max(e["alpha_diff"] for e in both)
        info["max_alpha_diff_float64"] = max(e["alpha_diff_float64"] for e in both)
        for ours, _, rel in SHARED:
            key = f"{ours}_{'rel_' if rel else ''}diff"
            info[f"max_{key}"] = max(e[key] for e in both)
    return info


def print_analyze(info: dict[str, object]) -> None:
    m = info["model"]
    print(f"\nanalyze vs WeightWatcher {info['weightwatcher']}: transformer {m['blocks']} blocks, "
          f"width {m['width']}, MLP {m['mlp']}, vocabulary {m['vocab']} "
          f"({m['parameters'] / 1e6:.1f}M parameters, {m['weight_matrices']} weight matrices; "
          f"{torch.get_num_threads()} threads)")
    cols = [("name", "layer", ""), ("shape", "shape", ""), ("alpha", "alpha (auto)", ".6f"),
            ("ww_alpha", "WW alpha", ".6f"), ("alpha_diff", "|diff| auto", ".1e"),
            ("alpha_diff_float64", "|diff| float64", ".1e"), ("xmin", "xmin", ".4g"),
            ("n_tail", "n_tail", ""), ("stable_rank", "stable rank", ".2f"),
            ("mp_spikes", "MP spikes", "")]
    printable = [{**e, "shape": "x".join(map(str, e["shape"]))} for e in info["layers"]]
    print(harness.format_table(printable, cols))
    med = info["median_s"]
    timing = [{"name": "gradience analyze (precision='auto')", "median_s": med["auto"]},
              {"name": "gradience analyze (precision='float64')", "median_s": med["float64"]}]
    if "weightwatcher" in med:
        timing.append({"name": "WeightWatcher analyze() (defaults)",
                       "median_s": med["weightwatcher"]})
        for t in timing:
            t["speedup"] = med["weightwatcher"] / t["median_s"]
    print()
    print(harness.format_table(timing, [("name", "end to end", ""), ("median_s", "median s", ".3f"),
                                        ("speedup", "x faster than WW", ".1f")]))
    if info.get("layers_matched"):
        print(f"layers: ours {info['layers_ours']}, WeightWatcher {info['layers_weightwatcher']}, "
              f"matched {info['layers_matched']}; max |alpha diff| {info['max_alpha_diff']:.2e} "
              f"(auto), {info['max_alpha_diff_float64']:.2e} (float64); max |D diff| "
              f"{info['max_D_diff']:.1e}, max xmin rel diff {info['max_xmin_rel_diff']:.1e}, "
              f"max n_tail diff {info['max_n_tail_diff']:.0f}")


# --------------------------------------------------------------------------- composed parts
def _part(module: str, func: str, **kwargs) -> tuple[list[dict] | None, str | None]:
    try:
        mod = __import__(module)
    except ImportError as err:
        return None, f"bench/{module}.py not importable: {err}"
    try:
        return list(getattr(mod, func)(**kwargs)), None
    except Exception as err:  # noqa: BLE001 - a failing part is a result, the others still run
        return None, f"{module}.{func} failed: {type(err).__name__}: {err}"


def _print_rows(title: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys and not isinstance(r[k], (list, dict)))
    cols = []
    for k in keys:
        sample = next((r[k] for r in rows if r.get(k) is not None), None)
        spec = ".4g" if isinstance(sample, float) else ""
        cols.append((k, k, spec))
    print(f"\n{title}")
    print(harness.format_table(rows, cols))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (smoke test)")
    parser.add_argument("--parts", nargs="+", choices=["svd", "fit", "analyze"],
                        default=["svd", "fit", "analyze"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each analyze (default 3; --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_spectral_cpu", help="JSON file name (no suffix)")
    parser.add_argument("--out-dir", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got --repeats={repeats}")

    payload: dict[str, object] = {"machine": harness.machine_info("cpu"), "quick": args.quick}
    # (part, module, function, JSON key, title): the row sets written beside this script.
    row_parts = (("svd", "spectral_svd_rows", "svd_rows", "svd", "randomized SVD / spectrum"),
                 ("fit", "spectral_fit_rows", "power_law_rows", "power_law", "power-law fit"))
    for part, module, function, key, title in row_parts:
        if part not in args.parts:
            continue
        rows, err = _part(module, function, quick=args.quick)
        payload[f"{key}_rows"], payload[f"{key}_error"] = rows, err
        if rows:
            _print_rows(title, rows)
        else:
            print(f"\n{title} rows: {err}")
    if "analyze" in args.parts:
        info = run_analyze(args.quick, repeats, args.seed)
        payload["analyze"] = info
        print_analyze(info)
    path = harness.write_json(args.out, _finite(payload), args.out_dir)
    print(f"\nwrote {path}")
    return 0


def _finite(obj):
    """JSON has no NaN/inf: write them as null / strings."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (np.floating, np.integer)):
        return _finite(obj.item())
    return obj


if __name__ == "__main__":
    sys.exit(main())

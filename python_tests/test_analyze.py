"""gradience_kernels.analyze: rows against references computed here from float64 NumPy SVDs and
the O(n^2) power-law scan of reference.py; inputs (module, state_dict, .pt, .safetensors);
WeightWatcher's layer rules and filters; errors; output formats; the CLI and the demo section.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

import reference as ref
from gradience_kernels import analysis as an
from gradience_kernels.__main__ import main

EPS64 = float(np.finfo(np.float64).eps)
U32 = float(np.finfo(np.float32).eps) / 2


# --------------------------------------------------------------------------- models
def heavy(shape, df, seed):
    """0.02 * Student-t(df) entries: a power-law ESD tail (Martin & Mahoney 2021)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((0.02 * rng.standard_t(df, size=shape)).astype(np.float32))


class Small(torch.nn.Module):
    """Linear (tall and wide), Embedding, Conv2d, Conv1d, LayerNorm, a 10-column Linear (small-N
    fit), a 7-column Linear (skipped: 7 < min_evals)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(300, 48)
        self.up = torch.nn.Linear(48, 160)
        self.down = torch.nn.Linear(160, 48)
        self.norm = torch.nn.LayerNorm(48)
        self.conv = torch.nn.Conv2d(24, 40, 3)
        self.conv1 = torch.nn.Conv1d(16, 32, 5)
        self.head = torch.nn.Linear(48, 10)
        self.tiny = torch.nn.Linear(48, 7)
        with torch.no_grad():
            for i, p in enumerate(p for p in self.parameters() if p.dim() >= 2):
                p.copy_(heavy(tuple(p.shape), (2.0, 3.0, 4.0)[i % 3], seed + i))


def slices(w: torch.Tensor) -> list[np.ndarray]:
    x = w.detach().to(torch.float64).numpy()
    if x.ndim == 2:
        return [x]
    return [x[(slice(None), slice(None)) + idx] for idx in np.ndindex(*x.shape[2:])]


def ref_small_n(x: np.ndarray) -> dict:
    """WWFit's rule for < 20 values, from its description: tails of >= 8 values, alpha =
    1 + (n-1)/sum log(x/xmin), the xmin minimising D - 0.868/sqrt(n); D against i/n."""
    x = np.sort(x)
    best = None
    for i in range(x.size - 1):
        tail = x[i:]
        n = tail.size
        if n < 8:
            continue
        s = float(np.sum(np.log(tail / tail[0])))
        if s <= 1e-12:
            continue
        alpha = 1 + (n - 1) / s
        cdf = 1 - (tail / tail[0]) ** (1 - alpha)
        d = max(abs(j / n - cdf[j]) for j in range(n))
        j_obj = d - 0.868 / math.sqrt(n)
        if best is None or j_obj < best[0]:
            best = (j_obj, tail[0], alpha, d, n)
    return {"xmin": best[1], "alpha": best[2], "D": best[3],
            "sigma": (best[2] - 1) / math.sqrt(best[4])}


def reference_row(w: torch.Tensor, conv2d: bool) -> dict:
    """The row from float64 NumPy SVDs of the (out, in) slices and reference.power_law_scan."""
    sv = [ref.svd_values(s) for s in slices(w)]
    scale = 0.5 if conv2d else 1.0
    lam = np.sort(np.concatenate([s * s for s in sv]) * scale)
    fit_vals = lam[lam > 1e-5]
    if fit_vals.size >= 20:
        f = ref.power_law_scan(fit_vals)
        fit = {k: f[k] for k in ("xmin", "alpha", "D", "sigma")}
    else:
        fit = ref_small_n(fit_vals)
    out_c, in_c = w.shape[0], w.shape[1]
    N, M = max(out_c, in_c), min(out_c, in_c)
    rf = len(sv)
    mats = ref.matrix_metrics(np.sqrt(lam), (rf * N, rf * M), EPS64)
    mp = [ref.mp_fit(s * math.sqrt(scale), (N, M)) for s in sv]
    return {**fit, "lam": lam, "n_tail": int(np.sum(lam >= fit["xmin"])), "N": N, "M": M, "rf": rf,
            "lambda_max": lam[-1], "stable_rank": lam.sum() / lam[-1],
            "log_spectral_norm": math.log10(lam[-1]), "log_norm": math.log10(lam.sum()),
            "spectral_norm": mats["spectral_norm"], "frobenius_norm": mats["frobenius_norm"],
            "nuclear_norm": mats["nuclear_norm"], "effective_rank": mats["effective_rank"],
            "condition_number": mats["condition_number"],
            "matrix_rank": int(np.sum(np.sqrt(lam) > np.sqrt(lam[-1]) * N * EPS64)),
            "mp_spikes": sum(m["num_spikes"] for m in mp),
            "mp_bulk_edge": max(m["bulk_edge"] for m in mp) * N}


def check_row(row: dict, w: torch.Tensor, conv2d: bool, rtol: float) -> None:
    r = reference_row(w, conv2d)
    assert (row["N"], row["M"], row["rf"]) == (r["N"], r["M"], r["rf"])
    assert row["num_evals"] == r["lam"].size
    # Same candidate chosen: same xmin (to the eigenvalues' accuracy) and tail size.
    assert row["n_tail"] == r["n_tail"], row["name"]
    for key in ("xmin", "alpha", "D", "sigma", "lambda_max", "stable_rank", "spectral_norm",
                "frobenius_norm", "nuclear_norm", "effective_rank"):
        assert row[key] == pytest.approx(r[key], rel=rtol, abs=rtol), (row["name"], key)
    for key in ("log_spectral_norm", "log_norm"):
        assert row[key] == pytest.approx(r[key], abs=rtol), (row["name"], key)
    assert row["matrix_rank"] == r["matrix_rank"]
    assert row["mp_spikes"] == r["mp_spikes"]
    assert row["mp_bulk_edge"] == pytest.approx(r["mp_bulk_edge"], rel=1e-6)
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * math.log10(r["lambda_max"]),
                                                  rel=1e-12)


# float64 Gram + float64 eigensolver against a float64 SVD: eigenvalue errors of both are a few
# M eps lambda_max (Gram sums of N products: N eps relative to ||W||_F^2 at worst); for these
# matrices (N <= 300, lambda_max/xmin <= ~100) that moves alpha = 1 + n/sum log(x/xmin) by
# < 2 (alpha-1)^2 * 300 eps * 100 < 1e-9 relative.
RTOL64 = 1e-9


# --------------------------------------------------------------------------- rows vs reference
def test_module_rows_match_reference_float64():
    model = Small()
    rows = an.analyze(model, precision="float64", progress=False)
    names = [r["name"] for r in rows]
    # WeightWatcher's rules: no LayerNorm; Conv1d read per kernel position; 7-column Linear
    # skipped (7 < min_evals = 8).
    assert names == ["embed", "up", "down", "conv", "conv1", "head"]
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds == {"embed": "embedding", "up": "linear", "down": "linear", "conv": "conv2d",
                     "conv1": "conv1d", "head": "linear"}
    mods = dict(model.named_modules())
    for row in rows:
        w = mods[row["name"]].weight
        check_row(row, w, conv2d=row["kind"] == "conv2d", rtol=RTOL64)
        assert row["precision"] == "float64"
        assert row["status"] == "success"
    by = {r["name"]: r for r in rows}
    assert by["conv"]["rf"] == 9 and by["conv"]["num_evals"] == 9 * 24
    assert by["conv1"]["rf"] == 5 and by["conv1"]["num_evals"] == 5 * 16
    assert by["head"]["fit_rule"] == "small-N" and by["head"]["num_evals"] == 10
    assert by["up"]["fit_rule"] == "CSN"


def test_auto_precision_within_float32_gram_bound():
    """precision='auto' (float32 Gram, float64 eigensolver): the Gram entries' rounding is at most
    N u32 (|W|^T |W|)_ij, so every eigenvalue moves by at most E = N u32 ||W||_F^2 (Weyl), so
    S = sum log(x/xmin) by at most 2 n E / xmin, and alpha = 1 + n/S (1 + (n-1)/S for the
    small-sample rule) by at most 2 (alpha-1)^2 E / xmin (times n/(n-1)) while the same xmin
    is chosen."""
    model = Small(seed=3)
    auto = an.analyze(model, progress=False)
    exact = an.analyze(model, precision="float64", progress=False)
    mods = dict(model.named_modules())
    for a, e in zip(auto, exact):
        assert a["precision"] == "float32 Gram, float64 eig"
        w = mods[a["name"]].weight.detach().double()
        N = max(w.shape[0], w.shape[1])
        E = N * U32 * float((w ** 2).sum()) * (0.5 if a["kind"] == "conv2d" else 1.0)
        assert abs(a["lambda_max"] - e["lambda_max"]) <= E
        if a["n_tail"] == e["n_tail"]:
            n = e["n_tail"]
            bound = 2 * (e["alpha"] - 1) ** 2 * E / e["xmin"]
            if a["fit_rule"] == "small-N":
                bound *= n / (n - 1)
            assert abs(a["alpha"] - e["alpha"]) <= bound, a["name"]


def test_float32_precision_route():
    rows = an.analyze(Small(), precision="float32", progress=False)
    assert {r["precision"] for r in rows} == {"float32"}
    assert all(math.isfinite(r["alpha"]) for r in rows)


def test_state_dict_and_module_agree():
    model = Small()
    from_module = an.analyze(model, precision="float64", progress=False)
    from_sd = an.analyze(model.state_dict(), precision="float64", progress=False)
    # A state_dict has no module types: 2-D is dense, 4-D conv2d; 3-D (Conv1d) is skipped, as
    # in WeightWatcher's PyStateDictLayer.
    assert [r["name"] for r in from_sd] == ["embed", "up", "down", "conv", "head"]
    mod = {r["name"]: r for r in from_module}
    for r in from_sd:
        assert r["kind"] == ("conv2d" if r["name"] == "conv" else "dense")
        for key in ("alpha", "xmin", "D", "n_tail", "stable_rank", "spectral_norm", "mp_spikes"):
            assert r[key] == mod[r["name"]][key]


def test_wrapped_state_dict_is_unwrapped():
    sd = Small().state_dict()
    rows = an.analyze({"epoch": torch.tensor(3), "state_dict": sd}, progress=False)
    assert [r["name"] for r in rows] == ["embed", "up", "down", "conv", "head"]


def test_pt_round_trip(tmp_path):
    model = Small()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    direct = an.analyze(model.state_dict(), progress=False)
    for p in (path, str(path)):
        rows = an.analyze(p, progress=False)
        assert [r["alpha"] for r in rows] == [r["alpha"] for r in direct]
    pth = tmp_path / "model.pth"
    torch.save(model.state_dict(), pth)
    assert [r["name"] for r in an.analyze(pth, progress=False)] == [r["name"] for r in direct]


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = Small()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    st.save_file(sd, str(path))
    rows = an.analyze(path, progress=False)
    direct = an.analyze(sd, progress=False)
    # safetensors files store their keys sorted: the rows come in that order.
    assert [r["name"] for r in rows] == sorted(r["name"] for r in direct)
    assert sorted((r["name"], r["alpha"], r["n_tail"]) for r in rows) == \
        sorted((r["name"], r["alpha"], r["n_tail"]) for r in direct)


def test_safetensors_missing_package(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("No module named 'safetensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError, match="model.safetensors.*safetensors package"):
        an.analyze(path)


# --------------------------------------------------------------------------- conv handling
def test_conv2d_eigenvalues_are_pooled_and_halved():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(8, 20, (3, 2))
    rows = an.analyze(torch.nn.Sequential(conv), precision="float64", progress=False)
    (row,) = rows
    w = conv.weight.detach().double()
    lam = np.sort(np.concatenate([ref.svd_values(w[:, :, i, j].numpy()) ** 2
                                  for i in range(3) for j in range(2)]))
    assert (row["N"], row["M"], row["rf"], row["num_evals"]) == (20, 8, 6, 48)
    assert row["lambda_max"] == pytest.approx(lam[-1] / 2, rel=1e-12)
    raw = an.analyze(torch.nn.Sequential(conv), precision="float64", conv2d_norm=False,
                     progress=False)[0]
    assert raw["lambda_max"] == pytest.approx(lam[-1], rel=1e-12)
    assert raw["alpha"] == pytest.approx(row["alpha"], rel=1e-9)  # alpha is scale-free
    assert raw["xmin"] == pytest.approx(2 * row["xmin"], rel=1e-12)


def test_conv_wide_slices_oriented():
    """out < in: each (out, in) slice is transposed to N x M, N >= M, before its Gram matrix."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(30, 12, 2)
    (row,) = an.analyze(torch.nn.Sequential(conv), precision="float64", progress=False)
    assert (row["N"], row["M"], row["rf"]) == (30, 12, 4)
    check_row(row, conv.weight, conv2d=True, rtol=RTOL64)


# --------------------------------------------------------------------------- filters, options
def test_filters_and_include_skipped():
    model = Small()
    rows = an.analyze(model, include_skipped=True, progress=False)
    by = {r["name"]: r for r in rows}
    assert by["tiny"]["status"] == "skipped: 7 eigenvalues < min_evals=8"
    assert "alpha" not in by["tiny"]
    assert "tiny" in [r["name"] for r in an.analyze(model, min_evals=0, progress=False)]
    # max_evals counts M * rf: the conv has 24 * 9 = 216 eigenvalues.
    names = [r["name"] for r in an.analyze(model, max_evals=200, progress=False)]
    assert "conv" not in names and "up" in names
    names = [r["name"] for r in an.analyze(model, max_N=200, progress=False)]
    assert "embed" not in names and "up" in names


def test_layer_patterns():
    rows = an.analyze(Small(), layers=["up", "do*"], progress=False)
    assert [r["name"] for r in rows] == ["up", "down"]
    assert [r["name"] for r in an.analyze(Small(), layers="conv*", progress=False)] == \
        ["conv", "conv1"]


def test_tied_weights_computed_once_reported_twice():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(200, 32)
            self.out = torch.nn.Linear(32, 200, bias=False)
            self.out.weight = self.embed.weight

    rows = an.analyze(Tied(), progress=False)
    assert [r["name"] for r in rows] == ["embed", "out"]
    for key in ("alpha", "xmin", "stable_rank", "spectral_norm"):
        assert rows[0][key] == rows[1][key]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_weight_dtypes(dtype):
    model = Small().to(dtype)
    rows = an.analyze(model, progress=False)
    ref_rows = an.analyze(Small().to(dtype).double(), precision="float64", progress=False)
    expected = "float64" if dtype == torch.float64 else "float32 Gram, float64 eig"
    assert {r["precision"] for r in rows} == {expected}
    for r, e in zip(rows, ref_rows):
        assert r["lambda_max"] == pytest.approx(e["lambda_max"], rel=1e-5)


def test_input_not_modified():
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    an.analyze(model, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_matches_cpu():
    model = Small()
    cpu = an.analyze(model, precision="float64", progress=False)
    gpu = an.analyze(model.cuda(), precision="float64", progress=False)
    for c, g in zip(cpu, gpu):
        assert g["alpha"] == pytest.approx(c["alpha"], rel=RTOL64)
        assert g["n_tail"] == c["n_tail"]


# --------------------------------------------------------------------------- WeightWatcher
def test_matches_weightwatcher_analyze():
    """WeightWatcher 0.7.7's own analyze() (when installed) on the same module: same layers,
    alpha to 1e-9 (both float64), same xmin and tail size."""
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = Small(seed=5)
    model.conv1 = torch.nn.Identity()  # WeightWatcher cannot read Conv1d (module docstring)
    with contextlib.redirect_stdout(io.StringIO()):
        details = ww.WeightWatcher(model=model).analyze()
    ours = {r["name"]: r for r in an.analyze(model, precision="float64", progress=False)}
    theirs = {rec["longname"]: rec for rec in details.to_dict("records")}
    assert set(ours) == set(theirs)
    for name, r in ours.items():
        t = theirs[name]
        assert (r["N"], r["M"], r["rf"]) == (t["N"], t["M"], t["rf"])
        assert r["alpha"] == pytest.approx(t["alpha"], rel=1e-9), name
        assert r["xmin"] == pytest.approx(t["xmin"], rel=1e-9), name
        assert r["D"] == pytest.approx(t["D"], rel=1e-7, abs=1e-12), name
        assert r["n_tail"] == t["num_pl_spikes"], name
        for key in ("lambda_max", "stable_rank", "log_spectral_norm", "log_norm",
                    "alpha_weighted", "log_alpha_norm"):
            assert r[key] == pytest.approx(t[key if key != "lambda_max" else "lambda_max"],
                                           rel=1e-9), (name, key)
        assert r["matrix_rank"] == t["matrix_rank"]
        assert r["warning"] == t["warning"]


# --------------------------------------------------------------------------- errors
def test_errors_bad_paths(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        an.analyze(missing)
    with pytest.raises(IsADirectoryError, match="directory"):
        an.analyze(tmp_path)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.npz'.*weights\.npz"):
        an.analyze(other)
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        an.analyze(garbage)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(3, 3)], notdict)
    with pytest.raises(TypeError, match="list.pt.*holds a list"):
        an.analyze(notdict)


def test_errors_bad_contents():
    with pytest.raises(TypeError, match=r"state_dict\['a.weight'\] is a list"):
        an.analyze({"a.weight": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="no weight matrices in state_dict"):
        an.analyze({"a.bias": torch.zeros(4), "b.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match="no weight matrices in state_dict"):
        an.analyze({})
    with pytest.raises(ValueError, match="no weight matrices in ReLU"):
        an.analyze(torch.nn.ReLU())
    with pytest.raises(ValueError, match="passes the filters.*min_evals=8.*4 eigenvalues"):
        an.analyze(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="got int"):
        an.analyze(3)
    with pytest.raises(ValueError, match="matches no weight matrix"):
        an.analyze(Small(), layers=["missing"])


def test_errors_bad_arguments():
    with pytest.raises(ValueError, match="precision"):
        an.analyze(Small(), precision="float16")
    with pytest.raises(ValueError, match="min_evals"):
        an.analyze(Small(), min_evals=-1)
    with pytest.raises(ValueError, match="evals_thresh"):
        an.analyze(Small(), evals_thresh=float("nan"))


def test_degenerate_spectrum_reports_failed_fit():
    """All eigenvalues equal (orthogonal columns of one norm): no power law to fit."""
    w = torch.eye(12)
    (row,) = an.analyze({"a.weight": w}, progress=False)
    assert math.isnan(row["alpha"]) or row["fit_rule"] == "small-N"
    assert row["stable_rank"] == pytest.approx(12.0)


# --------------------------------------------------------------------------- output
def test_format_table_aligned():
    rows = an.analyze(Small(), include_skipped=True, progress=False)
    text = an.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "shape", "evals"]
    assert set(lines[1]) == {"-"}
    assert "300x48" in text and "tiny" in text
    # the numeric columns end at the same offset on every line
    col = lines[0].index("alpha") + len("alpha")
    for line in lines[2:]:
        if "skipped" not in line and "tiny" not in line:
            assert line[col - 1] != " "
    custom = an.format_table(rows[:2], [("name", "n", ""), ("alpha", "a", ".2f")])
    assert custom.splitlines()[2].split() == [rows[0]["name"], f"{rows[0]['alpha']:.2f}"]


def test_format_rows_json_csv(tmp_path):
    rows = an.analyze(Small(), progress=False)
    data = json.loads(an.format_rows(rows, "json"))
    assert [d["name"] for d in data] == [r["name"] for r in rows]
    assert data[0]["shape"] == [300, 48]
    csv_text = an.format_rows(rows, "csv")
    head, first = csv_text.splitlines()[:2]
    assert head.startswith("name,kind,shape") and first.startswith("embed,embedding,300x48")
    p = an.write_rows(rows, tmp_path / "rows.json")
    assert json.loads(p.read_text())[1]["name"] == "up"
    with pytest.raises(ValueError, match=r"\.txt"):
        an.write_rows(rows, tmp_path / "rows.txt")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_tty():
    tty = _Tty()
    bar = an._Progress(4, "analyze", True, stream=tty)
    for _ in range(4):
        bar.advance()
    bar.close()
    assert "analyze [" in tty.getvalue() and "4/4" in tty.getvalue()
    for progress, stream in ((True, io.StringIO()), (False, _Tty())):
        bar = an._Progress(4, "analyze", progress, stream=stream)
        bar.advance(4)
        bar.close()
        assert stream.getvalue() == ""
    # progress=None waits 0.5 s before drawing: a quick run draws nothing
    quiet = _Tty()
    bar = an._Progress(4, "analyze", None, stream=quiet)
    bar.advance(4)
    bar.close()
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- CLI and demo
def test_cli_analyze(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(Small().state_dict(), path)
    assert main(["analyze", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["layer", "shape"]
    for name in ("embed", "up", "down", "conv", "head"):
        assert any(line.split()[0] == name for line in out.splitlines()[2:])
    assert main(["analyze", str(path), "--format", "json", "--layers", "up"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["up"]
    csv_path = tmp_path / "rows.csv"
    assert main(["analyze", str(path), "--format", "csv", "-o", str(csv_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("name,kind,shape")
    assert csv_path.read_text() == captured.out
    assert f"wrote {csv_path}" in captured.err


def test_cli_analyze_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "x.pt"), "--format", "xml"])


def test_demo_spectra_section():
    from gradience_kernels.demo import format_spectra_table, spectra_table

    rows = spectra_table(seed=0, steps=3)
    assert [r["name"] for r in rows] == ["0", "2", "4"]
    text = format_spectra_table(rows)
    assert "alpha init -> trained" in text and "512x256" in text
    for r in rows:
        assert math.isfinite(r["before"]["alpha"]) and math.isfinite(r["after"]["alpha"])

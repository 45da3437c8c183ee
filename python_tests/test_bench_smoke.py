"""The benchmark script runs end to end (tiny sizes) and writes its JSON: it cannot rot."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tail.py"


def test_bench_tail_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "2e5", "--quick", "--memory-n", "1e6",
         "--suite-sizes", "3000", "--reference-seeds", "2", "--out", "smoke",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "smoke.json").read_text())
    names = {r["name"] for r in payload["rows"]}
    assert "gradience hill (k=n/10)" in names and "np.partition Hill" in names
    hill = [r for r in payload["rows"] if r["name"] == "np.partition Hill"]
    assert all(r["alpha_rel_diff"] < 1e-9 for r in hill)
    assert payload["peak_extra_memory"]["extra_mib"] < 64
    assert payload["machine"]["torch"]
    suite = {r["name"]: r for r in payload["suite_rows"]}
    boot = suite["tail_index double bootstrap, n=3e+03"]
    # The speed-up is a benchmark figure, not a test verdict (timings on a loaded 2-core machine
    # flip it at this size): only that it was measured.
    assert boot["speedup"] > 0 and math.isfinite(boot["speedup"])
    assert len(boot["reference_k_hill"]) == 2 and 1 <= boot["k_hill"] < boot["n"]
    assert suite["fit_stable (McCulloch), n=1e+05 fp64"]["max_abs_param_diff"] < 1e-9
    assert all(r["xi_rel_diff"] < 1e-3 for n, r in suite.items() if n.startswith("fit_gpd"))


GPU_BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tail_gpu.py"


def test_bench_tail_gpu_smoke(tmp_path):
    """The GPU benchmark script runs end to end on CPU (Triton interpreter), so a GPU session
    does not find it broken."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    out = subprocess.run(
        [sys.executable, str(GPU_BENCH), "--device", device, "--sizes", "2e4", "--quick",
         "--out", "gpu_smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env if device == "cpu" else os.environ,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "gpu_smoke.json").read_text())
    names = {r["name"] for r in payload["rows"] if "median_s" in r}
    assert {"x.sum() one-pass read", "gradience hill, Triton (k=n/10)", "torch.topk Hill"} <= names
    topk = [r for r in payload["rows"] if r["name"] == "torch.topk Hill"]
    assert all(r["alpha_rel_diff"] < 1e-6 for r in topk)
    assert payload["list_rows"][0]["list_over_flat"] > 0


SPECTRAL_BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_spectral.py"


def test_bench_spectral_smoke(tmp_path):
    """bench_spectral.py --quick: the SVD and power-law rows it composes, and analyze against
    WeightWatcher (compared when weightwatcher is importable) on the tiny transformer."""
    out = subprocess.run(
        [sys.executable, str(SPECTRAL_BENCH), "--quick", "--out", "spectral_smoke",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "spectral_smoke.json").read_text())
    assert payload["machine"]["torch"]
    assert payload["svd_rows"], payload.get("svd_error")
    assert payload["power_law_rows"], payload.get("power_law_error")
    info = payload["analyze"]
    assert info["layers_ours"] == info["model"]["weight_matrices"] == 14
    assert info["median_s"]["auto"] > 0
    if not str(info["weightwatcher"]).startswith("not available"):
        assert info["layers_matched"] == 14
        assert info["max_alpha_diff"] < 0.01
        assert info["max_alpha_diff_float64"] < 1e-9
        assert info["max_n_tail_diff"] == 0

"""bench/bench_curvature.py --quick runs end to end on the tiny SDPA transformer and writes its
JSON with every part's rows (so the benchmark cannot rot). Checks keys and sanity, not speed:
the quick mode's tiny products say nothing about timing."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_curvature.py"


def test_bench_curvature_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--models", "transformer",
         "--json-name", "curv_smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "curv_smoke.json").read_text())
    assert payload["machine"]["torch"] and payload["quick"] is True
    assert payload["models"]["transformer"]["parameters"] == 2763

    matvec = payload["matvec_rows"]
    assert matvec, payload["matvec_error"]
    assert {r["operator"] for r in matvec} >= {"ggn", "empirical_fisher"}
    for r in matvec:
        # batched and looped products are the same numbers (float32 rounding)
        assert r["max_rel_diff"] < 1e-5
        assert r["batched_ms_per_vec"] > 0 and r["looped_ms_per_vec"] > 0

    over = payload["overhead_rows"]
    assert over, payload["overhead_error"]
    assert {r["estimator"].split(" ")[0] for r in over} >= {
        "hutchinson", "hutchpp", "xtrace", "lanczos", "slq_density"}
    for r in over:
        # every product of the run was timed: the counter and the timer agree
        assert r["counted_vectors"] == r["matvecs"] > 0
        assert r["wall_s"] > 0 and r["matvec_s"] > 0

    trace = payload["trace_accuracy_rows"]
    assert trace, payload["trace_accuracy_error"]
    by = {r["estimator"]: r for r in trace}
    exact = by["hutchinson"]["exact_trace"]
    assert exact > 0 and all(r["exact_trace"] == exact for r in trace)
    # the history of a long run reproduces a short run's estimate (counter-based probes)
    assert by["hutchinson"]["history_vs_run"] < 1e-6
    assert by["hutchinson"]["clt_m_1pct_p90"] >= by["hutchinson"]["clt_m_1pct_median"] > 0
    for est in ("hutchpp", "xtrace"):
        curve = by[est]["curve"]
        assert curve and all(0 <= med <= p90 for _, med, p90 in curve)

    eigen = payload["eigen_rows"]
    assert eigen, payload["eigen_error"]
    ref = eigen[0]["ref_top5"]
    assert len(ref) == 5 and ref == sorted(ref, reverse=True)
    assert eigen[0]["ref_vs_eigsh"] < 1e-4  # our tight Lanczos matches ARPACK
    default = next(r for r in eigen if r["method"] == "lanczos top-5 (default tol)")
    assert default["max_rel_err"] < 1e-4 and default["converged"]

    cl = payload["curvlinops_rows"]
    if cl:  # curvlinops installed
        assert {r["estimator"] for r in cl} >= {"gradience xtrace", "curvlinops xtrace"}
    else:
        assert "curvlinops" in payload["curvlinops_error"]

    assert payload["goals"]
    for g in payload["goals"]:
        # None only where the rows cannot decide, and the case says why
        assert isinstance(g["met"], bool) or (g["met"] is None and "not comparable" in g["case"])
        assert g["value"] is None or math.isfinite(g["value"])


KERNELS = Path(__file__).resolve().parent.parent / "bench" / "bench_curvature_kernels.py"


def test_bench_curvature_kernels_smoke(tmp_path):
    """bench/bench_curvature_kernels.py --quick on CPU (the GPU check runs it with --device
    cuda): every kernel timed on the C++ ops and the torch path, combine on the torch path
    only (the library's CPU combine), and a bad model name rejected."""
    out = subprocess.run(
        [sys.executable, str(KERNELS), "--quick", "--models", "mlp", "--repeats", "1",
         "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "bench_curvature_kernels_cpu.json").read_text())
    assert payload["machine"]["device"] == "cpu" and payload["quick"] is True
    rows = payload["rows"]
    got = {(r["kernel"], r["backend"]) for r in rows}
    kernels = {"rademacher", "gaussian", "rademacher_dots", "block_dots", "block_gram",
               "orthogonalize", "reorthogonalize"}
    kernels |= {f"{k} ({dt} basis)" for k in ("orthogonalize", "reorthogonalize")
                for dt in ("bfloat16", "float16")}
    assert got == {(k, b) for k in kernels for b in ("torch", "cpp")} | {("combine", "torch")}
    for r in rows:
        assert r["model"] == "mlp" and r["ms"] > 0 and math.isfinite(r["torch_over_this"])
        if r["backend"] == "torch":
            assert r["torch_over_this"] == 1.0
    bad = subprocess.run([sys.executable, str(KERNELS), "--quick", "--models", "resnet"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--models: unknown ['resnet']" in bad.stderr

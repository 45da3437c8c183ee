#!/usr/bin/env bash
# The one GPU command (issue 4): on a GPU machine with its own torch (2.11+ with CUDA), Triton
# and no network, build the extension with CMake (no pip, no build isolation), run the test
# suite on the GPU, then the GPU benchmarks (tail estimators; curvature kernels), and write the
# JSON under $OUT (if set) and bench/results. Usage, from the repository root:  bash bench/gpu_check.sh [bench args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Build: the same CMakeLists.txt as the pip build; the module lands next to the package.
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_CUDA_ARCHITECTURES=90
cmake --build build/gpu -j "$(nproc)"
cp build/gpu/_C*.so gradience_kernels/
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

results=bench/results
mkdir -p "$results"
# Tests: every test runs; CUDA-parametrised ones run on the GPU (pytest/hypothesis are needed:
# carry their wheels if the machine lacks them, see the device tool's README).
set +e
"$PY" -m pytest -q -p no:cacheprovider python_tests 2>&1 | tee "${OUT:-$results}/gpu_tests.log"
tests=${PIPESTATUS[0]}
set -e
PYTHONUNBUFFERED=1 "$PY" bench/bench_tail_gpu.py --out-dir "$results" "$@"
# Curvature's Triton kernels against their torch path on the GPU (issue 6; well under a minute).
PYTHONUNBUFFERED=1 "$PY" bench/bench_curvature_kernels.py --device cuda --out-dir "$results"
if [ -n "${OUT:-}" ]; then
  cp "$results"/bench_tail_*.json "$results"/bench_curvature_kernels_cuda.json "$OUT"/ \
    2>/dev/null || true
fi
exit "$tests"

"""The bit-level float16 / bfloat16 conversions of csrc/common/half_float.h against NumPy's and
torch's casts, bitwise.

The curvature kernels use these conversions whenever the build has no F16C (x86 without it, or
a build with GRADIENCE_NATIVE=OFF, which drops -march=native): on this project's machines the
built extension takes the _Float16 path instead, so the kernel tests never reach them. Here a
small C++ program compiled from the header alone runs them on every 16-bit pattern and on
float32 inputs chosen where rounding is hard: every midpoint between neighbouring float16 values
(ties go to the even neighbour) and the floats just either side of it, the overflow threshold
65520, the subnormal range, and random bit patterns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HEADER_DIR = Path(__file__).resolve().parents[1] / "csrc" / "common"

HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include "half_float.h"
using namespace gradience;

// mode in out: reads the whole input file, converts element by element, writes the results.
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  FILE* in = std::fopen(argv[2], "rb");
  if (!in) return 3;
  std::vector<unsigned char> buf;
  unsigned char chunk[65536];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof chunk, in)) > 0) buf.insert(buf.end(), chunk, chunk + got);
  std::fclose(in);
  std::vector<unsigned char> out;
  const std::string mode = argv[1];
  if (mode == "f16_to_f32" || mode == "bf16_to_f32") {
    const size_t n = buf.size() / 2;
    out.resize(n * 4);
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, buf.data() + 2 * i, 2);
      const float f = mode == "f16_to_f32" ? float16_to_float(h) : bfloat16_to_float(h);
      std::memcpy(out.data() + 4 * i, &f, 4);
    }
  } else if (mode == "f32_to_f16" || mode == "f32_to_bf16") {
    const size_t n = buf.size() / 4;
    out.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      float f;
      std::memcpy(&f, buf.data() + 4 * i, 4);
      const uint16_t h = mode == "f32_to_f16" ? float_to_float16(f) : float_to_bfloat16(f);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  } else {
    return 4;
  }
  FILE* o = std::fopen(argv[3], "wb");
  if (!o) return 5;
  std::fwrite(out.data(), 1, out.size(), o);
  std::fclose(o);
  return 0;
}
"""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) on PATH to build the harness")
    d = tmp_path_factory.mktemp("half_float")
    src, exe = d / "harness.cpp", d / "harness"
    src.write_text(HARNESS)
    # -O2 as the extension; no -march=native and no fast-math: the bit-level forms themselves.
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-I", str(HEADER_DIR), str(src), "-o",
                           str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, f"harness did not compile:\n{proc.stderr}"
    return exe


def _run(exe: Path, mode: str, data: np.ndarray, out_dtype, tmp_path: Path) -> np.ndarray:
    src, dst = tmp_path / f"{mode}.in", tmp_path / f"{mode}.out"
    src.write_bytes(np.ascontiguousarray(data).tobytes())
    proc = subprocess.run([str(exe), mode, str(src), str(dst)], capture_output=True)
    assert proc.returncode == 0, f"harness {mode} exited {proc.returncode}"
    return np.frombuffer(dst.read_bytes(), dtype=out_dtype)


ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _hard_floats() -> np.ndarray:
    """float32 inputs where float16 rounding is decided: every float16 value, every midpoint of
    neighbouring finite float16 values and the float32 neighbours of each midpoint, the range
    around the overflow threshold 65520, the subnormal range and 2^20 random bit patterns."""
    h = ALL16.view(np.float16)
    pos = np.sort(h[np.isfinite(h) & (h.astype(np.float32) >= 0)].astype(np.float32))
    pos = np.unique(pos)
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)  # exact in float32
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(0))])
    top = np.linspace(65000, 66000, 20001, dtype=np.float32)
    tiny = np.ldexp(np.linspace(0.5, 1, 4097, dtype=np.float64), -13).astype(np.float32)
    tiny = np.concatenate([tiny, np.ldexp(np.arange(1, 4097, dtype=np.float64), -36)
                           .astype(np.float32)])
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, np.inf, np.nan, 65504, 65519.996, 65520, 2.0 ** -24, 2.0 ** -25,
                        np.float32(2.0 ** -25) * np.float32(1.0000001), 2.0 ** -14,
                        np.finfo(np.float32).max, np.finfo(np.float32).tiny], dtype=np.float32)
    x = np.concatenate([h.astype(np.float32), mids, near, top, tiny, rand, special])
    return np.concatenate([x, -x]).astype(np.float32)


def test_float16_to_float_is_exact_for_every_pattern(harness, tmp_path):
    got = _run(harness, "f16_to_f32", ALL16, np.float32, tmp_path)
    want = ALL16.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # signed zeros


def test_bfloat16_to_float_is_exact_for_every_pattern(harness, tmp_path):
    got = _run(harness, "bf16_to_f32", ALL16, np.float32, tmp_path)
    want = torch.from_numpy(ALL16.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_float_to_float16_rounds_as_numpy_and_torch(harness, tmp_path):
    x = _hard_floats()
    got = _run(harness, "f32_to_f16", x, np.uint16, tmp_path)
    with np.errstate(over="ignore"):
        want_np = x.astype(np.float16).view(np.uint16)
    want_torch = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.any() and not nan.all()
    got_nan = (got & 0x7C00 == 0x7C00) & (got & 0x03FF != 0)
    assert np.array_equal(got_nan, nan)  # NaN stays NaN, nothing else becomes one
    for want in (want_np, want_torch):
        bad = np.flatnonzero(got[~nan] != want[~nan])
        assert bad.size == 0, (f"{bad.size} mismatches, first x={x[~nan][bad[0]]!r}: "
                               f"got {got[~nan][bad[0]]:#06x}, want {want[~nan][bad[0]]:#06x}")


def test_float_to_bfloat16_rounds_as_torch(harness, tmp_path):
    rng = np.random.default_rng(1)
    rand = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    # ties (the low 16 bits exactly 0x8000) and their neighbours, on even and odd upper halves
    hi = rng.integers(0, 1 << 16, 1 << 14, dtype=np.uint64).astype(np.uint32) << 16
    ties = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi])
    x = np.concatenate([rand, ties]).view(np.float32)
    got = _run(harness, "f32_to_bf16", x, np.uint16, tmp_path)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.all(got[nan] == 0x7FC0)
    bad = np.flatnonzero(got[~nan] != want[~nan])
    assert bad.size == 0, (f"{bad.size} mismatches, first bits={x[~nan][bad[0]].view(np.uint32):#010x}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""Curvature's multi-tensor kernels (gradience_kernels.curvature_kernels) per call, against
their torch path, on the bench models' parameter lists.

Every kernel takes a list of parameter-shaped tensors (no flattening); the torch path is the
same step written with per-tensor torch ops (NumPy-style hash for the probes, BLAS for dots,
Gram matrices and Gram-Schmidt), which is what the estimators would run without the kernels.
On CPU the compiled C++ ops ("cpp") are timed against it, on CUDA the Triton kernels
("triton"). Cases, float32, b = 16 probe columns, a 64-row basis (a Lanczos run's size):

  rademacher, gaussian     16 probes drawn into the parameters' shapes
  rademacher_dots          the 16 probes' dots with 16 vectors, per block, without forming them
  block_dots, block_gram   per-block dots of 16 pairs, and the 16 x 16 per-block Gram matrix
  orthogonalize            one vector against the 64 rows, classical Gram-Schmidt twice
  reorthogonalize          one Lanczos step's call: local rows 62-63, a full pass, Kahan's test,
                           the next row written (the repeated calls take one full pass)
  combine                  64 rows times a 64 x 16 coefficient matrix (Triton on CUDA; on CPU
                           the library itself uses the torch path, so there is no other row)
  (re)orthogonalize (bfloat16 / float16 basis)   the same against the rows stored in 16 bits

Usage:
  python bench/bench_curvature_kernels.py [--device cpu|cuda] [--quick] [--models mlp,cnn]
Writes bench/results/bench_curvature_kernels_<device>.json; `bash bench/gpu_check.sh` runs it
on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curvature_matvec_rows import make_operator, problem  # noqa: E402
from harness import format_table, machine_info, time_interleaved, write_json  # noqa: E402

from gradience_kernels import curvature_kernels as ck  # noqa: E402

MODELS = ("mlp", "cnn", "transformer")
COLUMNS = [("model", "model", ""), ("parameters", "P", ""), ("kernel", "kernel", ""),
           ("backend", "backend", ""), ("ms", "ms / call", ".3f"),
           ("torch_over_this", "torch path / this", ".2f")]


def _orthonormal_rows(shapes, m: int, device) -> list[torch.Tensor]:
    """m orthonormal rows (a QR of Gaussian columns), split into the parameters' shapes."""
    g = torch.Generator().manual_seed(1)
    P = sum(s.numel() for s in shapes)
    Q, _ = torch.linalg.qr(torch.randn(P, m, generator=g, dtype=torch.float64))
    out, at = [], 0
    for s in shapes:
        n = s.numel()
        out.append(Q[at:at + n].T.reshape(m, *s).to(torch.float32).to(device).contiguous())
        at += n
    return out


def _cases(shapes, blocks, device):
    """(kernel name, function of the backend) for every case; the data is built once."""
    b, m = 16, 64
    X = ck.gaussian(shapes, b, 3, device=device)
    Y = ck.gaussian(shapes, b, 4, device=device)
    basis = [torch.cat([r, torch.zeros(1, *r.shape[1:], device=device)])
             for r in _orthonormal_rows(shapes, m, device)]
    w = [t[0].clone() for t in ck.gaussian(shapes, 1, 5, device=device)]
    coeffs = torch.randn(m, b, generator=torch.Generator().manual_seed(6),
                         dtype=torch.float64).to(device)
    return [
        ("rademacher", lambda be: ck.rademacher(shapes, b, 0, device=device, backend=be)),
        ("gaussian", lambda be: ck.gaussian(shapes, b, 0, device=device, backend=be)),
        ("rademacher_dots", lambda be: ck.rademacher_dots(Y, blocks, 0, backend=be)),
        ("block_dots", lambda be: ck.block_dots(X, Y, blocks, backend=be)),
        ("block_gram", lambda be: ck.block_gram(X, Y, blocks, backend=be)),
        ("orthogonalize", lambda be: ck.orthogonalize_(w, basis, m, 2, backend=be)),
        ("reorthogonalize", lambda be: ck.reorthogonalize_(w, basis, m, m - 2, out_row=m,
                                                           backend=be)),
        ("combine", lambda be: ck.combine(basis, m, coeffs, backend=be)),
    ] + [case for dt in (torch.bfloat16, torch.float16)
         for case in _low_precision_cases(w, [r.to(dt) for r in basis], m, str(dt)[6:])]


def _low_precision_cases(w, basis, m: int, tag: str):
    """The Gram-Schmidt steps against a basis stored in 16 bits (lanczos' basis_dtype)."""
    return [
        (f"orthogonalize ({tag} basis)", lambda be: ck.orthogonalize_(w, basis, m, 2, backend=be)),
        (f"reorthogonalize ({tag} basis)",
         lambda be: ck.reorthogonalize_(w, basis, m, m - 2, out_row=m, backend=be)),
    ]


def kernel_rows(device: torch.device, models=MODELS, quick: bool = False,
                repeats: int | None = None) -> list[dict]:
    repeats = repeats or (3 if quick else 31)
    fast = "triton" if device.type == "cuda" else "cpp"
    rows = []
    for name in models:
        model, loss_fn, batch, facts = problem(name, quick)
        op = make_operator("ggn", model, loss_fn, batch)
        shapes = list(op.shapes)
        blocks = [list(blk.tensors) for blk in op.blocks]
        for kernel, run in _cases(shapes, blocks, device):
            backends = ["torch"] if kernel == "combine" and device.type != "cuda" else [
                "torch", fast]
            times = time_interleaved({be: (lambda be=be: run(be)) for be in backends},
                                     repeats, warmup=2, device=device)
            for be in backends:
                rows.append({**facts, "kernel": kernel, "backend": be, "ms": 1e3 * times[be],
                             "torch_over_this": times["torch"] / times[be]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (C++ ops) or cuda (Triton)")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out-dir", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {list(MODELS)}")
    rows = kernel_rows(device, models, args.quick, args.repeats)
    print(format_table(rows, COLUMNS))
    path = write_json(f"bench_curvature_kernels_{device.type}", {
        "machine": machine_info(device.type), "quick": args.quick, "dtype": "float32",
        "notes": "median ms per call; torch_over_this = the torch path's time / this "
                 "backend's (> 1: the kernel is faster)", "rows": rows},
        None if args.out_dir is None else Path(args.out_dir))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

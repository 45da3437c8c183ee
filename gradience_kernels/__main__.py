"""Command line: `gradience demo` and `gradience analyze PATH` (also `python -m
gradience_kernels ...`)."""

from __future__ import annotations

import argparse
import sys


def _analyze_command(args, parser: argparse.ArgumentParser) -> int:
    from .analysis import analyze, format_rows, write_rows

    if args.min_evals < 0 or args.max_evals < 0 or args.max_n < 1:
        parser.error(f"--min-evals and --max-evals must be >= 0 and --max-n >= 1, got "
                     f"--min-evals={args.min_evals} --max-evals={args.max_evals} "
                     f"--max-n={args.max_n}")
    try:
        rows = analyze(args.path, layers=args.layers, min_evals=args.min_evals,
                       max_evals=args.max_evals, max_N=args.max_n,
                       conv2d_norm=not args.no_conv2d_norm, precision=args.precision,
                       include_skipped=args.include_skipped,
                       progress=False if args.no_progress else None)
        if args.output:
            path = write_rows(rows, args.output)
    except (OSError, ValueError, TypeError, ImportError) as err:
        print(f"gradience analyze: error: {err}", file=sys.stderr)
        return 1
    text = format_rows(rows, args.format)
    print(text, end="" if text.endswith("\n") else "\n")
    if args.output:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradience", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tail estimates and timings on built-in data")
    demo.add_argument("--n", type=int, default=10**7, help="entries per synthetic sample")
    demo.add_argument("--seed", type=int, default=0)
    an = sub.add_parser(
        "analyze", help="spectral metrics and power-law alphas of a saved state_dict",
        description="One row per weight matrix of a saved state_dict (.pt/.pth/.bin/.ckpt read "
                    "with torch.load(weights_only=True); .safetensors with the safetensors "
                    "package): power-law alpha of the ESD tail, xmin, D, tail size, stable and "
                    "effective rank, norms, Marchenko-Pastur spikes; WeightWatcher 0.7.7's "
                    "conventions (see gradience_kernels.analysis).")
    an.add_argument("path", help="state_dict file: .pt, .pth, .bin, .ckpt or .safetensors")
    an.add_argument("--format", choices=["table", "json", "csv"], default="table",
                    help="what to print on stdout (default: an aligned table)")
    an.add_argument("--output", "-o", default=None,
                    help="also write the rows to this .json or .csv file")
    an.add_argument("--layers", nargs="+", default=None,
                    help="names or fnmatch patterns of the layers to analyse (default: all)")
    an.add_argument("--precision", choices=["auto", "float64", "float32"], default="auto")
    an.add_argument("--min-evals", type=int, default=8,
                    help="skip layers with fewer eigenvalues (WeightWatcher: 8)")
    an.add_argument("--max-evals", type=int, default=15000,
                    help="skip layers with more eigenvalues (WeightWatcher: 15000; 0: no limit)")
    an.add_argument("--max-n", type=int, default=50000,
                    help="skip layers whose larger dimension N exceeds this (WeightWatcher: 50000)")
    an.add_argument("--no-conv2d-norm", action="store_true",
                    help="do not halve the eigenvalues of Conv2d layers (WeightWatcher does)")
    an.add_argument("--include-skipped", action="store_true",
                    help="also list the weight matrices the filters leave out, with the reason")
    an.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.n < 100:
            parser.error(f"--n must be >= 100, got --n={args.n}")
        from .demo import run_demo

        run_demo(n=args.n, seed=args.seed)
    elif args.command == "analyze":
        return _analyze_command(args, an)
    return 0


if __name__ == "__main__":
    sys.exit(main())

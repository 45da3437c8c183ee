"""Command line: `gradience demo` (also `python -m gradience_kernels demo`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradience", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tail estimates and timings on built-in data")
    demo.add_argument("--n", type=int, default=10**7, help="entries per synthetic sample")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.n < 100:
            parser.error(f"--n must be >= 100, got --n={args.n}")
        from .demo import run_demo

        run_demo(n=args.n, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

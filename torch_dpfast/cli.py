"""The ``dpfast`` command: train, epsilon, explain, bench, info.

dpfast train                     # DP-SGD on the bundled digits, no arguments needed
dpfast train --non-private       # the baseline: what privacy costs
dpfast epsilon --sigma 1.1 --sample-rate 0.01 --epochs 3
dpfast explain vit_small_patch16_224
dpfast bench --smoke
dpfast info
"""

from __future__ import annotations

import argparse
import sys

from .commands import UsageError, bench, epsilon, explain, train


def _info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpfast",
        description="Fast, correct differentially private training (DP-SGD) for PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_arguments(commands.add_parser("train", help="train a model with DP-SGD"))
    epsilon.add_arguments(
        commands.add_parser("epsilon", help="epsilon from sigma, or sigma from a target")
    )
    explain.add_arguments(commands.add_parser("explain", help="how each parameter is clipped"))
    bench.add_arguments(commands.add_parser("bench", help="run a benchmark suite"))
    commands.add_parser("info", help="what was built and what this machine has").set_defaults(
        run=_info
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"dpfast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

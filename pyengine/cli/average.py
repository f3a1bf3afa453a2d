"""`pyengine average`: one model from several checkpoints of one run, their weights averaged
uniformly or as an exponential moving average (pyengine.compress.average_checkpoints)."""

from __future__ import annotations

import argparse
import sys

from pyengine.cli.options import finite_float


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "average", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="average the weights of checkpoints of one run into one model",
        description="Average the weights of checkpoints of one training run (model.pt, best.pt, "
        "last.pt or copies of them, oldest first): uniformly, or as an exponential moving "
        "average that favours the latest. The result is a model checkpoint that evaluate, "
        "generate, export and serve read. Checkpoints of different architectures, or out of "
        "training order, are refused.")
    add = parser.add_argument
    add("checkpoints", nargs="+", metavar="CKPT", help="checkpoints of one run, oldest first")
    add("--output", required=True, help="the averaged model checkpoint to write (e.g. avg.pt)")
    add("--mode", choices=["uniform", "ema"], default="uniform", help="how to weigh them")
    add("--decay", type=finite_float(low=0), default=0.9,
        help="ema: avg <- decay * avg + (1 - decay) * next checkpoint; in [0, 1)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pyengine.compress import average_checkpoints
    from pyengine.train import CheckpointError

    if not args.decay < 1:
        print(f"pyengine average: error: --decay must be in [0, 1), got {args.decay:g}",
              file=sys.stderr)
        return 2
    try:
        average_checkpoints(args.checkpoints, args.mode, args.decay, output=args.output)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"pyengine average: error: {error}", file=sys.stderr)
        return 2
    how = "uniform average" if args.mode == "uniform" else f"EMA (decay {args.decay:g})"
    print(f"wrote {args.output}: the {how} of {len(args.checkpoints)} checkpoints")
    return 0

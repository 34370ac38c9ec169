"""``dpfast explain MODEL``: the per-parameter table of ``dpf.explain`` for a model."""

from __future__ import annotations

import torch

from ..explain import explain
from . import UsageError
from .models import build


def add_arguments(parser) -> None:
    parser.add_argument("model", help="'cnn' or a timm model name")
    parser.add_argument("--input-shape", default="3,224,224", help="C,H,W of one example")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--clipping", default="auto", choices=["auto", "bk", "ghost", "per_example"]
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(
            f"--input-shape must be C,H,W (three positive ints), got {args.input_shape!r}"
        )
    model, note = build(args.model, shape[0], args.classes, shape[1])
    if note:
        print(f"note: {note}")
    try:
        table = explain(model, torch.randn(2, *shape), clipping=args.clipping)
    except (NotImplementedError, RuntimeError, ValueError) as error:
        raise UsageError(f"{args.model}: {error}") from None
    print(table)
    return 0

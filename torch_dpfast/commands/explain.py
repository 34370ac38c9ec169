"""``dpfast explain MODEL``: the per-parameter table of ``dpf.explain`` for a model: 'cnn', a timm
model name, or ``hf:NAME_OR_PATH`` for a transformers model built from its config (a hub name,
or a local directory with a config.json; no weights are loaded)."""

from __future__ import annotations

import torch

from ..explain import explain
from . import UsageError
from .models import build


def add_arguments(parser) -> None:
    parser.add_argument(
        "model", help="'cnn', a timm model name, or hf:NAME_OR_PATH (a transformers config)"
    )
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per example (hf:)")
    parser.add_argument("--input-shape", default="3,224,224", help="C,H,W of one example")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--clipping", default="auto", choices=["auto", "bk", "ghost", "per_example"]
    )
    parser.set_defaults(run=run)


def _transformers_model(name: str, seq_len: int):
    """(model, keyword inputs of a batch of 2) for a transformers config name or path."""
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "hf: models need the transformers package (pip install transformers)"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"hf:{name}: no transformers config found ({error})") from None
    model = transformers.AutoModel.from_config(config)
    if getattr(config, "is_encoder_decoder", False) or hasattr(config, "vocab_size"):
        ids = torch.randint(0, config.vocab_size, (2, seq_len))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        return model, inputs
    size, channels = getattr(config, "image_size", 224), getattr(config, "num_channels", 3)
    return model, dict(pixel_values=torch.randn(2, channels, size, size))


def run(args) -> int:
    if args.model.startswith("hf:"):
        model, inputs = _transformers_model(args.model[3:], args.seq_len)
        try:
            table = explain(model, kwargs=inputs, clipping=args.clipping)
        except (NotImplementedError, RuntimeError, ValueError) as error:
            raise UsageError(f"{args.model}: {error}") from None
        print(table)
        return 0
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

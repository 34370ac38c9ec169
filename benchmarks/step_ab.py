"""Non-private and ``auto`` training steps of one model interleaved in one process, full
physical batches (no sampling, no padding): the quickest side-by-side ratio, and the one to
compare two commits with (run it in a worktree of each).

Usage:
  python benchmarks/step_ab.py --model vit_small --batch 8 --steps 6 [--out DIR]
Prints (and with --out writes DIR/step_ab.json) the median step time of each and the median of
the per-step ratios non-private / ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.training import (  # noqa: E402
    LANGUAGE_MODELS,
    MODELS,
    NUM_CLASSES,
    SEQUENCE_MODELS,
    build_model,
    synthetic_text,
    synthetic_tokens,
)


def batch_of(model_name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one full batch: images (B, 3, S, S), or token ids (B, T) with
    class labels (B,) or next-token labels (B, T)."""
    size = MODELS[model_name][1]
    if model_name in LANGUAGE_MODELS:
        return synthetic_text(batch, size).tensors
    if model_name in SEQUENCE_MODELS:
        return synthetic_tokens(batch, size).tensors
    return torch.randn(batch, 3, size, size), torch.randint(0, NUM_CLASSES, (batch,))


def measure(model_name: str, batch: int, steps: int) -> dict:
    """{"non_private_ms", "dpfast_auto_ms", "ratio", "ratios"}: ``steps`` interleaved steps
    each, after one warm-up step each."""
    import torch_dpfast as dpf

    torch.manual_seed(0)
    plain = build_model(model_name)
    private = copy.deepcopy(plain)
    x, y = batch_of(model_name, batch)
    attachment = dpf.attach(private, probe_coupling=False)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.0)

    def step_plain():
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    def step_private():
        F.cross_entropy(private(x), y).backward()
        attachment.clip_and_accumulate(1.0)
        for p in private.parameters():
            p.summed_grad = None

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    step_plain(), step_private()
    times = [(timed(step_plain), timed(step_private)) for _ in range(steps)]
    ratios = [a / b for a, b in times]
    return {
        "non_private_ms": 1e3 * statistics.median(a for a, _ in times),
        "dpfast_auto_ms": 1e3 * statistics.median(b for _, b in times),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result = {"model": args.model, "batch": args.batch, "steps": args.steps}
    result.update(measure(args.model, args.batch, args.steps))
    print(
        f"{args.model}, batch {args.batch}: non-private {result['non_private_ms']:.0f} ms, "
        f"auto {result['dpfast_auto_ms']:.0f} ms, ratio {result['ratio']:.3f} "
        f"[{min(result['ratios']):.2f}-{max(result['ratios']):.2f}]"
    )
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "step_ab.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

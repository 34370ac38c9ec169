"""What the norm certification (torch_dpfast/certify.py) costs: the clipping step of one physical
batch with and without it, side by side in one process.

For each model and mode, one physical batch is run forward and backward, then
``Attachment.clip_and_accumulate`` is timed; runs with the certification on and off alternate
(``--repeats`` pairs, a fresh forward/backward before each), so slow spells of a shared machine
hit both. Reported: the median step time of each and the median of the per-pair ratios. The
training-throughput A/B is ``throughput.py --modes dpfast_auto,dpfast_auto_uncertified,...``.

Usage:
  python benchmarks/certify_cost.py --models vit_small,resnet18_gn --modes bk,auto,ghost \\
      --batch 8 --repeats 7 --out benchmarks/results/cpu-2core/certify-cost-step
Writes DIR/certify_cost.json (environment, settings, every raw timing) and DIR/certify_cost.md.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import write_run  # noqa: E402
from benchmarks.training import MODELS, build_model, uncertified_check  # noqa: E402


def step_seconds(model, x, y, mode: str, certified: bool) -> float:
    """Seconds of the clipping step of one batch (forward and backward not timed)."""
    import torch_dpfast as dpf
    from torch_dpfast import certify
    from torch_dpfast.ghost import ghost_backward

    real_check = certify.check
    certify.check = real_check if certified else uncertified_check
    attachment = dpf.attach(model, clipping=mode, probe_coupling=False)
    try:
        losses = F.cross_entropy(model(x), y, reduction="none")
        if mode == "ghost":  # both passes are the clipping step
            start = time.perf_counter()
            ghost_backward(attachment, losses, 1.0)
            return time.perf_counter() - start
        losses.mean().backward()
        start = time.perf_counter()
        attachment.clip_and_accumulate(1.0)
        return time.perf_counter() - start
    finally:
        certify.check = real_check
        for p in model.parameters():
            p.summed_grad = None
        attachment.detach()


def measure(model_name: str, mode: str, batch: int, repeats: int, progress=print) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name)
    size = MODELS[model_name][1]
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    step_seconds(model, x, y, mode, True)  # warm-up: workspaces, kernels
    pairs = []
    for k in range(repeats):
        progress(f"[certify_cost] {model_name} {mode} pair {k + 1}/{repeats}")
        on = step_seconds(model, x, y, mode, True)
        off = step_seconds(model, x, y, mode, False)
        pairs.append((on, off))
    ratios = [on / off for on, off in pairs]
    return dict(
        model=model_name,
        mode=mode,
        batch=batch,
        pairs=pairs,
        certified_s=statistics.median(on for on, _ in pairs),
        uncertified_s=statistics.median(off for _, off in pairs),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
    )


def markdown(env: dict, settings: dict, results: list[dict]) -> str:
    lines = [
        "# Cost of the norm certification (clipping step of one physical batch)",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}, {env['device']} "
        f"({env['cpu']}, {env['cpu_threads']} threads). "
        f"Batch {settings['batch']}, {settings['repeats']} alternating pairs; step = "
        "clip_and_accumulate (ghost: both backward passes), forward and backward not timed.",
        "",
        "| model | mode | certified (s) | uncertified (s) | certified / uncertified |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {MODELS[r['model']][2]} | {r['mode']} | {r['certified_s']:.3f} | "
            f"{r['uncertified_s']:.3f} | {r['ratio']:.3f}x [{r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small,resnet18_gn")
    parser.add_argument("--modes", default="bk,auto,ghost")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    settings = dict(batch=args.batch, repeats=args.repeats)
    results = [
        measure(model, mode, args.batch, args.repeats)
        for model in args.models.split(",")
        for mode in args.modes.split(",")
    ]
    return write_run(args.out, "certify_cost", settings, results, markdown)


if __name__ == "__main__":
    main()

"""Training throughput: non-private vs torch_dpfast's modes vs Opacus, side by side.

For every model x precision x physical batch size, each mode trains ``--steps`` logical steps
of true Poisson batches (expected size ``--logical``) in a fresh process; throughput = real
examples processed per second over all steps but the first. ``--repeats`` rounds run every mode
round-robin; reported: the median throughput over rounds with its range, and the ratio to
non-private taken within each round (adjacent in time, so slow spells of a shared machine
cancel), with its range. Peak memory is CUDA memory allocated by torch (GPU) or peak RSS (CPU).

Usage:
  python benchmarks/throughput.py --device cuda --models vit_base,bit_50x1 \\
      --precisions fp32,tf32 --physical 32,64 --logical 256 --out DIR
  python benchmarks/throughput.py --smoke --out DIR          # CPU, tiny model, < 1 min
  python benchmarks/throughput.py --device cpu --models vit_small --physical 8 --logical 16 \\
      --flop-model --out DIR                                  # the CPU goal of issue 3
Writes DIR/throughput.json (environment, settings, every raw timing), DIR/throughput.md and
plots: relative throughput (the paper's Fig. 1), cost multiple of DP (Fig. 3), throughput vs
physical batch (Fig. 6, with two or more batch sizes), TF32 / FP32 (Fig. 7, with both).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks import plots  # noqa: E402
from benchmarks.common import default_device, run_worker, write_run  # noqa: E402
from benchmarks.training import (
    DEFAULT_MODES,
    MODELS,
    MODES,
    OURS,
    SEQUENCE_MODELS,
    Settings,
    dpfast_options,
)  # noqa: E402

SMOKE = dict(
    models="smoke_vit",
    modes="non_private,dpfast_auto,opacus_hooks",
    physical="4",
    logical=8,
    steps=3,
)


def worker(settings: Settings, steps: int) -> dict:
    """Trains in this process; returns per-step examples and seconds and the peak memory."""
    import torch

    from benchmarks.training import Run, peak_memory_mib

    try:
        run = Run(settings)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        examples, rows, seconds = zip(*run.logical_steps(steps))
    except torch.OutOfMemoryError:
        return dict(error="out of memory")
    measured = slice(1, None) if steps > 1 else slice(None)
    return dict(
        examples=list(examples),
        rows=list(rows),
        seconds=list(seconds),
        samples_per_s=sum(examples[measured]) / sum(seconds[measured]),
        rows_per_s=sum(rows[measured]) / sum(seconds[measured]),
        peak_memory_mib=peak_memory_mib(run.device),
    )


def run_in_process(settings: Settings, steps: int) -> dict:
    """:func:`worker` in a fresh Python process (so its peak memory is its own)."""
    return run_worker(__file__, ["--worker", json.dumps(vars(settings)), "--steps", str(steps)])


def flop_model(model_name: str, mode: str) -> float | None:
    """DP over non-private throughput that the multiply-add count predicts, per example.
    Non-private training costs 3F (forward F, backward 2F). Book-keeping modes (auto, bk)
    replace the weight-gradient GEMMs by clipped-sum GEMMs of the same size and add the norm
    work N (from ``dpf.explain``): 3F / (3F + N). per_example also costs 3F (per-example
    instead of summed weight gradients): 1.0, its cost being memory traffic. ghost runs a second
    backward (input gradients twice, weight gradients once): 3F / (4F + N). None for Opacus."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import torch_dpfast as dpf
    from benchmarks.training import build_model

    if mode == "non_private" or mode == "dpfast_per_example":
        return 1.0
    if mode not in OURS or model_name in SEQUENCE_MODELS:
        return None
    model = build_model(model_name)
    size = MODELS[model_name][1]
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    forward = counter.get_total_flops() / 2
    clipping, _ = dpfast_options(mode)
    norms = sum(r["macs"] or 0 for r in dpf.explain(model, x, clipping).rows)
    return 3 * forward / (3 * forward + (forward if clipping == "ghost" else 0) + norms)


def combine(rounds: list[dict], baseline: list[dict] | None) -> dict:
    """One configuration's figures over its rounds (see the module docstring)."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return dict(rounds=rounds, error=rounds[0]["error"])
    rates = [r["samples_per_s"] for r in good]
    out = dict(
        rounds=rounds,
        samples_per_s=statistics.median(rates),
        samples_per_s_min=min(rates),
        samples_per_s_max=max(rates),
        rows_per_s=statistics.median(r["rows_per_s"] for r in good),
        peak_memory_mib=max(r["peak_memory_mib"] for r in good),
    )
    pairs = [
        (r, b) for r, b in zip(rounds, baseline or []) if "error" not in r and "error" not in b
    ]
    if pairs:
        ratios = [r["samples_per_s"] / b["samples_per_s"] for r, b in pairs]
        out.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        out["rows_ratio"] = statistics.median(r["rows_per_s"] / b["rows_per_s"] for r, b in pairs)
    return out


def measure_all(args, progress=print) -> list[dict]:
    results = []
    configs = [
        (model, precision, physical)
        for model in args.models
        for precision in args.precisions
        for physical in args.physical
    ]
    for n, (model, precision, physical) in enumerate(configs, 1):
        runs = {mode: [] for mode in args.modes}
        for k in range(args.repeats):
            for mode in args.modes:
                progress(
                    f"[throughput {n}/{len(configs)}] {model} {precision} physical {physical} "
                    f"/ {mode} (round {k + 1}/{args.repeats}) ...",
                )
                settings = Settings(
                    model, mode, precision, physical, max(args.logical, physical), args.device
                )
                settings.seed = k  # each round its own model, data and Poisson batch sizes
                runs[mode].append(run_in_process(settings, args.steps))
                if "error" in runs[mode][-1]:
                    progress(f"  failed: {runs[mode][-1]['error']}")
        for mode in args.modes:
            results.append(
                dict(
                    model=model,
                    precision=precision,
                    physical=physical,
                    mode=mode,
                    flop_model=flop_model(model, mode) if args.flop_model else None,
                    **combine(runs[mode], runs.get("non_private")),
                )
            )
    return results


def markdown(env: dict, settings: dict, results: list[dict]) -> str:
    lines = [
        f"# Training throughput ({env['device']})",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}. Poisson logical "
        f"batches of expected size {settings['logical']}, {settings['steps']} logical steps per "
        f"run (the first not timed), each run in its own process, {settings['repeats']} "
        "round(s) of all modes (round k draws model, data and batch sizes from seed k). "
        "samples/s: real examples per second, median over rounds [range]; vs non-private: "
        "median of the per-round ratios [range]; rows: the same for rows through the model, "
        "the padding of fixed-shape physical batches included (Opacus cuts variable-size "
        "physical batches: no padding).",
        "",
        "| model | precision | physical batch | mode | samples/s | vs non-private | rows vs "
        "non-private | FLOP model | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {MODELS[r['model']][2]} | {r['precision']} | {r['physical']} | {r['mode']} |"
        predicted = f"{r['flop_model']:.2f}x" if r.get("flop_model") else ""
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | {predicted} | |")
            continue
        rate = (
            f"{r['samples_per_s']:.2f} [{r['samples_per_s_min']:.2f}-{r['samples_per_s_max']:.2f}]"
        )
        ratio = (
            f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if "ratio" in r else ""
        )
        rows = f"{r['rows_ratio']:.2f}x" if "rows_ratio" in r else ""
        lines.append(
            f"{head} {rate} | {ratio} | {rows} | {predicted} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--device", default=default_device())
    parser.add_argument(
        "--models", help="default: vit_base,bit_50x1 on CUDA, vit_small,resnet18_gn on CPU"
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--precisions", default="fp32", help="comma-separated fp32,tf32,bf16")
    parser.add_argument("--physical", default="32", help="physical batch sizes, comma-separated")
    parser.add_argument("--logical", type=int, default=256, help="expected logical batch size")
    parser.add_argument("--steps", type=int, default=6, help="logical steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all modes")
    parser.add_argument(
        "--flop-model", action="store_true", help="add what the FLOP model predicts per mode"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, < 1 min")
    args = parser.parse_args(argv)
    if args.models is None:
        on_gpu = args.device.startswith("cuda")
        args.models = "vit_base,bit_50x1" if on_gpu else "vit_small,resnet18_gn"
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.device, args.repeats, args.precisions = "cpu", 1, "fp32"
    args.models = args.models.split(",")
    args.modes = args.modes.split(",")
    args.precisions = args.precisions.split(",")
    args.physical = [int(b) for b in args.physical.split(",")]
    unknown = [m for m in args.models if m not in MODELS] + [
        m for m in args.modes if m not in MODES
    ]
    if unknown:
        parser.error(
            f"unknown {', '.join(unknown)}; models: {', '.join(MODELS)}; modes: {', '.join(MODES)}"
        )
    if "non_private" in args.modes:  # the baseline of each round runs first
        args.modes = ["non_private"] + [m for m in args.modes if m != "non_private"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Settings(**json.loads(args.worker)), args.steps)))
        return {}
    results = measure_all(args, progress=lambda msg: print(msg, flush=True))
    settings = dict(
        models=args.models,
        modes=args.modes,
        precisions=args.precisions,
        physical=args.physical,
        logical=args.logical,
        steps=args.steps,
        repeats=args.repeats,
        device=args.device,
    )
    payload = write_run(args.out, "throughput", settings, results, markdown)
    plots.throughput_figures(results, args.out)
    return payload


if __name__ == "__main__":
    main()

"""Training steps of one model on full physical batches (no sampling, no padding), the modes
interleaved in one process: non-private with ``auto``, then (``--opacus``) non-private with
Opacus's hooks (its per-sample gradients, clipping and accumulation; no noise, as ours). The
quickest side-by-side ratio, the protocol of issue 21's goal, and the one to compare two
commits with (run it in a worktree of each).

Usage:
  python benchmarks/step_ab.py --model vit_small --batch 8 --steps 6 [--opacus] [--out DIR]
  python benchmarks/step_ab.py --models vit_small:8,bit_50x1:8 --opacus --out DIR
(--models: each model in a fresh process; in one process, BiT after three other models ran
0.64x against 0.78x on its own.)
Prints (and with --out writes DIR/step_ab.json, raw times, and DIR/step_ab.md) per model the
median step time of each mode, the median of the per-round ratios non-private / mode and their
quotient, ours / Opacus. One process holds every mode's model: peak memory is not separable
here (throughput.py reports it).
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

from benchmarks.common import run_worker, write_run  # noqa: E402
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


def measure(model_name: str, batch: int, steps: int, opacus: bool = False) -> dict:
    """{"<mode>_ms": median step time, "ratio(s)": non-private / ``auto`` (median, per round),
    with ``opacus`` also "opacus_ratio(s)" (non-private / Opacus) and "ours_vs_opacus" (the
    ratio of the two), or "opacus_error"}: ``steps`` rounds of one non-private and one ``auto``
    step, then ``steps`` rounds of one non-private and one Opacus step, after a warm-up step
    each (Opacus last: the memory its per-sample gradients take and give back slows the steps
    after it, ours 62 -> 89 ms on the char-LSTM at batch 64 when interleaved)."""
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

    def rounds(modes: dict) -> list[dict]:
        for step in modes.values():
            step()
        return [{name: timed(step) for name, step in modes.items()} for _ in range(steps)]

    ours = rounds({"non_private": step_plain, "dpfast_auto": step_private})
    result = {
        "non_private_ms": 1e3 * statistics.median(r["non_private"] for r in ours),
        "dpfast_auto_ms": 1e3 * statistics.median(r["dpfast_auto"] for r in ours),
        "ratios": [r["non_private"] / r["dpfast_auto"] for r in ours],
        "raw_seconds": {"ours": ours},
    }
    result["ratio"] = statistics.median(result["ratios"])
    if opacus:  # after ours: Opacus's large per-sample tensors slow the steps that follow them
        try:
            step_opacus = _opacus_step(model_name, batch, x, y)
            step_opacus()  # fails here on the models Opacus cannot train
        except Exception as error:  # noqa: BLE001 - reported, as throughput.py does
            result["opacus_error"] = f"{type(error).__name__}: {error}"[:300]
            return result
        theirs = rounds({"non_private": step_plain, "opacus_hooks": step_opacus})
        result["raw_seconds"]["opacus"] = theirs
        result["opacus_hooks_ms"] = 1e3 * statistics.median(r["opacus_hooks"] for r in theirs)
        result["opacus_ratios"] = [r["non_private"] / r["opacus_hooks"] for r in theirs]
        result["opacus_ratio"] = statistics.median(result["opacus_ratios"])
        result["ours_vs_opacus"] = result["ratio"] / result["opacus_ratio"]
    return result


def _opacus_step(model_name: str, batch: int, x: torch.Tensor, y: torch.Tensor):
    """One step of Opacus's hooks on a fresh model of the family (its DPLSTM for the LSTM):
    forward, backward with per-sample gradients, clip and accumulate (DPOptimizer, no noise)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = GradSampleModule(build_model(model_name, opacus=True))  # the "hooks" mode
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
    )

    def step():
        F.cross_entropy(model(x), y).backward()
        optimizer.clip_and_accumulate()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--models",
        help="model:batch,... one after another, each in a fresh process (instead of "
        "--model/--batch)",
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--opacus", action="store_true", help="Opacus hooks side by side")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one model, in this process: its result as a JSON line
        print(json.dumps(measure(args.model, args.batch, args.steps, args.opacus)))
        return
    runs = [(args.model, args.batch)]
    if args.models:
        runs = [_model_and_batch(item) for item in args.models.split(",")]
    results = []
    for model, batch in runs:
        result = {"model": model, "batch": batch, "steps": args.steps}
        if args.models:  # a fresh process per model: one model's memory slowed the next's
            flags = ["--worker", "--model", model, "--batch", str(batch)]
            flags += ["--steps", str(args.steps)] + (["--opacus"] if args.opacus else [])
            result.update(run_worker(__file__, flags))
        else:
            result.update(measure(model, batch, args.steps, args.opacus))
        print(_line(result), flush=True)
        results.append(result)
    if args.out:
        settings = {"runs": runs, "steps": args.steps, "opacus": args.opacus, "device": "cpu"}
        write_run(pathlib.Path(args.out), "step_ab", settings, results, _table)


def _model_and_batch(item: str) -> tuple[str, int]:
    model, _, batch = item.partition(":")
    if model not in MODELS or not batch.isdigit():
        raise SystemExit(f"--models: expected model:batch with a model of {sorted(MODELS)}")
    return model, int(batch)


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']}, batch {r['batch']}: failed: {r['error']}"
    text = (
        f"{r['model']}, batch {r['batch']}: non-private {r['non_private_ms']:.0f} ms, "
        f"auto {r['dpfast_auto_ms']:.0f} ms, ratio {r['ratio']:.3f} "
        f"[{min(r['ratios']):.2f}-{max(r['ratios']):.2f}]"
    )
    if "opacus_ratio" in r:
        text += f"; Opacus {r['opacus_hooks_ms']:.0f} ms, ours / Opacus {r['ours_vs_opacus']:.2f}x"
    elif "opacus_error" in r:
        text += f"; Opacus fails: {r['opacus_error'][:80]}"
    return text


def _table(env: dict, settings: dict, results: list) -> str:
    lines = [
        f"# Full batches side by side ({env['device']})",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}. Each model in a fresh "
        f"process: {settings['steps']} rounds of a non-private and an `auto` step, then as many "
        "of a non-private and an Opacus step (after a warm-up step each), full physical "
        "batches, no sampling or noise; median step time, the median of the per-round ratios "
        "[range], and ours / Opacus as the quotient of the two medians.",
        "",
        "| model | batch | non-private ms | ours `auto` ms | vs non-private | Opacus hooks ms "
        "| Opacus vs non-private | ours / Opacus |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {MODELS[r['model']][2]} | {r['batch']} | failed: {r['error']} |")
            continue
        ours = f"{r['ratio']:.2f}x [{min(r['ratios']):.2f}-{max(r['ratios']):.2f}]"
        if "opacus_ratio" in r:
            opacus = (
                f"{r['opacus_hooks_ms']:.0f} | {r['opacus_ratio']:.2f}x | "
                f"{r['ours_vs_opacus']:.2f}x"
            )
        else:
            opacus = f"{'fails: ' + r['opacus_error'][:90] if 'opacus_error' in r else '-'} | | "
        lines.append(
            f"| {MODELS[r['model']][2]} | {r['batch']} | {r['non_private_ms']:.0f} | "
            f"{r['dpfast_auto_ms']:.0f} | {ours} | {opacus} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

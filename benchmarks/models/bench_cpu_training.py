"""CPU training throughput: non-private vs torch_dpfast's clipping modes vs Opacus.

Each (model, mode) runs in a fresh process (so peak memory is its own): a few training steps of
one physical batch on synthetic 224x224 images with CIFAR-100-shaped labels, timed after
warm-up. Reports samples/s, the ratio to non-private training and peak resident memory.
Models: timm ViT-S/16 and a ResNet-18 with GroupNorm. Opacus runs with grad_sample_mode
"hooks" (GradSampleModule + DPOptimizer) and "ghost" (fast gradient clipping).

Usage:  python benchmarks/models/bench_cpu_training.py [--out DIR] [--batch 8] [--steps 6]
        [--models vit_small,resnet18_gn] [--smoke]
Writes DIR/bench_cpu_training.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

MODES = [
    "non_private",
    "dpfast_auto",
    "dpfast_bk",
    "dpfast_per_example",
    "dpfast_ghost",
    "opacus_hooks",
    "opacus_ghost",
]
MODELS = {
    "vit_small": "ViT-S/16 (timm vit_small_patch16_224)",
    "resnet18_gn": "ResNet-18 with GroupNorm (timm resnet18)",
    "smoke": "tiny ViT (smoke test)",
}


def build_model(name: str):
    import timm
    from torch import nn

    if name == "vit_small":
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100), 224
    if name == "resnet18_gn":
        return timm.create_model(
            "resnet18",
            pretrained=False,
            num_classes=100,
            norm_layer=lambda c, **kw: nn.GroupNorm(8, c),
        ), 224
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=100,
    ), 32


def worker(model_name: str, mode: str, batch: int, steps: int) -> dict:
    """Times ``steps`` training steps in this process; returns the figures."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, size = build_model(model_name)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    if mode.startswith("dpfast"):
        import torch_dpfast as dpf

        clipping = mode.removeprefix("dpfast_")
        attachment = dpf.attach(model, clipping=clipping)
        optimizer = dpf.DPOptimizer(
            base, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )
        if clipping == "ghost":
            from torch_dpfast.ghost import DPCriterion

            criterion = DPCriterion(criterion, attachment, optimizer, "mean")
    elif mode == "opacus_hooks":
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(model)
        optimizer = DPOptimizer(
            base, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )
    elif mode == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        model = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        optimizer = DPOptimizerFastGradientClipping(
            base, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )
        criterion = DPLossFastGradientClipping(model, optimizer, torch.nn.CrossEntropyLoss())
    else:
        optimizer = base

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        ghost = mode in ("opacus_ghost", "dpfast_ghost")
        loss = criterion(model(x), y) if ghost else F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    measured = times[2:] if len(times) > 3 else times[1:]
    median = statistics.median(measured)
    return dict(
        step_s=measured,
        median_step_s=median,
        samples_per_s=batch / median,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def predicted_ratio(model_name: str, mode: str) -> float | None:
    """FLOP model of a DP step relative to a non-private one, per example: non-private costs 3F
    (forward F, backward 2F); our book-keeping modes replace the weight-gradient GEMMs by the
    clipped-sum GEMMs (same multiply-adds) and add the norm computation N, so 3F / (3F + N).
    per_example also does 3F multiply-adds (the per-example weight gradients instead of the
    summed ones), so the model predicts 1.0 there; its cost is memory traffic. ghost runs a
    second backward: input gradients twice (2F), the weight-gradient GEMMs once (F), plus N, so
    3F / (4F + N)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import torch_dpfast as dpf

    if mode == "non_private":
        return 1.0
    if not mode.startswith("dpfast"):
        return None
    clipping = mode.removeprefix("dpfast_")
    if clipping == "per_example":
        return 1.0
    model, size = build_model(model_name)
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    forward_macs = counter.get_total_flops() / 2
    norm_macs = sum(r["macs"] or 0 for r in dpf.explain(model, x, clipping).rows)
    extra = forward_macs if clipping == "ghost" else 0
    return 3 * forward_macs / (3 * forward_macs + extra + norm_macs)


def run(model_name: str, mode: str, batch: int, steps: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        model_name,
        mode,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=tail[:300])
    return json.loads(lines[-1])


def combine(rounds: list[dict], baseline: list[dict] | None) -> dict:
    """One mode's figures over the rounds: the median throughput, and its ratio to non-private
    taken within each round (adjacent in time, so slow spells of the machine cancel)."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return dict(rounds=rounds, error=rounds[0]["error"])
    out = dict(
        rounds=rounds,
        samples_per_s=statistics.median(r["samples_per_s"] for r in good),
        peak_rss_mib=max(r["peak_rss_mib"] for r in good),
    )
    if baseline:
        ratios = [
            r["samples_per_s"] / b["samples_per_s"]
            for r, b in zip(rounds, baseline)
            if "error" not in r and "error" not in b
        ]
        if ratios:
            out.update(
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios)
            )
    return out


def markdown(env: dict, settings: dict, results: list[dict]) -> str:
    lines = [
        f"# CPU training throughput ({env['cpu_threads']} threads, {env['cpu']})",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; physical batch "
        f"{settings['batch']}, median of {settings['steps']} steps after warm-up, each mode "
        f"in its own process; {settings.get('rounds', 1)} round(s) of all modes, round-robin "
        "(samples/s: median over rounds; vs non-private: median of the per-round ratios, with "
        "their range).",
        "",
        "| model | mode | samples/s | vs non-private | range over rounds | FLOP model predicts "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model_name]
        base = next((r for r in rows if r["mode"] == "non_private" and "error" not in r), None)
        for r in rows:
            predicted = f"{r['predicted']:.2f}x" if r.get("predicted") else ""
            if "error" in r:
                lines.append(
                    f"| {MODELS[model_name]} | {r['mode']} | failed: {r['error']} | | | "
                    f"{predicted} | |"
                )
                continue
            ratio = f"{r['ratio']:.2f}x" if base and "ratio" in r else ""
            spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x" if ratio else ""
            lines.append(
                f"| {MODELS[model_name]} | {r['mode']} | {r['samples_per_s']:.2f} | "
                f"{ratio} | {spread} | {predicted} | {r['peak_rss_mib']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default="vit_small,resnet18_gn")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, our modes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat all modes round-robin this many times (ratios taken within each round)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.steps)))
        return
    from benchmarks.common import environment, write_json

    models = ["smoke"] if args.smoke else args.models.split(",")
    modes = ["non_private", "dpfast_auto", "dpfast_ghost"] if args.smoke else args.modes.split(",")
    steps = 3 if args.smoke else args.steps
    results = []
    for model_name in models:
        runs = {mode: [] for mode in modes}
        for k in range(args.rounds):
            for mode in modes:
                print(f"[bench_cpu_training] {model_name} / {mode} (round {k + 1}) ...", flush=True)
                runs[mode].append(run(model_name, mode, args.batch, steps))
        for mode in modes:
            predicted = predicted_ratio(model_name, mode)
            results.append(
                dict(
                    model=model_name,
                    mode=mode,
                    predicted=predicted,
                    **combine(runs[mode], runs.get("non_private")),
                )
            )
    env = environment()
    settings = dict(batch=args.batch, steps=steps, smoke=args.smoke, rounds=args.rounds)
    write_json(
        args.out / "bench_cpu_training.json",
        {"environment": env, "settings": settings, "results": results},
    )
    (args.out / "bench_cpu_training.md").write_text(markdown(env, settings, results))
    print((args.out / "bench_cpu_training.md").read_text())


if __name__ == "__main__":
    main()

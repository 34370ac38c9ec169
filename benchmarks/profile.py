"""Per-phase time of a training step, for non-private training, our modes and Opacus (the seed
paper's Table A3).

Each mode runs in a fresh process at one physical batch size P, with logical batches of
expected size ``--logical`` (default P). Phases are reported per P real examples (the time of
one full physical batch), over ``--steps`` logical steps after one warm-up step: the physical
batches of a Poisson sample are not all full (our padded ones, Opacus's shorter last ones), so
per physical batch would flatter whichever mode skips most work on padding rows.

* forward, backward, step: wall time of each phase with the device synchronised at both ends
  (as the paper's Nsight measurement, the synchronisation is included);
* inside them, from the torch profiler (CPU time on CPU, kernel time on CUDA) in a second,
  profiled pass: per-example norms and book-keeping clipped sums (our ``torch_dpfast::*_norm_sq``
  and ``*_clipped_sum`` ops), materialised per-example gradients (the engine's
  ``torch_dpfast::per_example_gradients`` label), clip and accumulate (our ``clip_factors``
  and ``clip_accumulate_``; Opacus's ``DPOptimizer.clip_and_accumulate``), noise (our
  ``add_noise_``; Opacus's ``DPOptimizer.add_noise``) and Opacus's per-example gradients (its
  backward hooks).

Usage:
  python benchmarks/profile.py --device cuda --model vit_base --physical 32 --out DIR
  python benchmarks/profile.py --smoke --out DIR            # CPU, tiny model, < 1 min
Writes DIR/profile.json, DIR/profile.md and DIR/profile.png (stacked phases per mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.common import default_device, pyplot, run_worker, write_run  # noqa: E402
from benchmarks.training import DEFAULT_MODES, MODELS, Settings  # noqa: E402

PHASES = ("forward", "backward", "step")
# Profiler event name -> the part of a phase it belongs to.
PARTS = {
    "torch_dpfast::linear_norm_sq": "per-example norms",
    "torch_dpfast::conv_norm_sq": "per-example norms",
    "torch_dpfast::embedding_norm_sq": "per-example norms",
    "torch_dpfast::linear_clipped_sum": "clipped sums",
    "torch_dpfast::conv_clipped_sum": "clipped sums",
    "torch_dpfast::embedding_clipped_sum": "clipped sums",
    "torch_dpfast::per_example_norm_sq": "per-example norms",
    "torch_dpfast::per_example_gradients": "per-example gradients (materialised)",
    "torch_dpfast::clip_factors": "clip and accumulate",
    "torch_dpfast::total_clip_factors": "clip and accumulate",
    "torch_dpfast::clip_accumulate_": "clip and accumulate",
    "torch_dpfast::add_noise_": "noise",
    "opacus::per_example_gradients": "per-example gradients (Opacus hooks)",
    "opacus::clip_and_accumulate": "clip and accumulate",
    "opacus::add_noise": "noise",
}
SMOKE = dict(model="smoke_vit", modes="non_private,dpfast_auto,opacus_hooks", physical=4, steps=2)


class PhaseTimer:
    """``run.phase`` replacement: synchronised wall time per phase, and a profiler label."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.batches = 0

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        with self.torch.profiler.record_function(f"phase::{name}"):
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start
        self.batches += name == "forward"


def label_opacus() -> None:
    """Labels Opacus's per-example gradient hooks, clipping and noise for the profiler (patched
    on the classes, before any model is wrapped: hooks are bound when they are registered)."""
    import torch
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    def labelled(fn, name):
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return wrapper

    targets = {
        "clip_and_accumulate": (
            (DPOptimizer, DPOptimizerFastGradientClipping),
            "opacus::clip_and_accumulate",
        ),
        "add_noise": ((DPOptimizer, DPOptimizerFastGradientClipping), "opacus::add_noise"),
        "capture_backprops_hook": (
            (GradSampleModule, GradSampleModuleFastGradientClipping),
            "opacus::per_example_gradients",
        ),
    }
    for method, (classes, name) in targets.items():
        owners = {next(c for c in cls.__mro__ if method in vars(c)) for cls in classes}
        for owner in owners:  # the classes that define it, each patched once
            setattr(owner, method, labelled(vars(owner)[method], name))


def profiled_parts(events, on_cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """("phase/part" -> seconds, phase -> seconds) in a profiled pass; a part counts its
    outermost labelled events only (nested ones are inside them) and is filed under the phase
    it ran in."""
    parts: dict[str, float] = {}
    phases = dict.fromkeys(PHASES, 0.0)
    for event in events:
        micros = event.device_time_total if on_cuda else event.cpu_time_total
        if event.name.startswith("phase::"):
            phases[event.name.removeprefix("phase::")] += micros / 1e6
        part = PARTS.get(event.name)
        if part is None:
            continue
        parent, nested, phase = event.cpu_parent, False, None
        while parent is not None:
            nested = nested or parent.name in PARTS
            if parent.name.startswith("phase::"):
                phase = parent.name.removeprefix("phase::")
            parent = parent.cpu_parent
        if not nested and phase is not None:
            key = f"{phase}/{part}"
            parts[key] = parts.get(key, 0.0) + micros / 1e6
    return parts, phases


def worker(settings: Settings, steps: int) -> dict:
    import torch

    from benchmarks.training import Run

    if settings.mode.startswith("opacus"):
        label_opacus()
    run = Run(settings)
    for _ in run.logical_steps(1):  # warm-up
        pass
    timer = PhaseTimer(run.device)
    run.phase = timer
    examples = sum(real for real, _, _ in run.logical_steps(steps))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if run.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    run.phase = PhaseTimer(run.device)  # labels for the profiled pass
    with torch.profiler.profile(activities=activities) as prof:
        for _ in run.logical_steps(steps):
            pass
    per_batch = settings.physical / max(examples, 1)  # seconds -> seconds per P examples
    phases_ms = {k: 1e3 * v * per_batch for k, v in timer.seconds.items()}
    # The profiler slows what it watches: a part is its share of its phase in the profiled
    # pass, applied to the phase's time in the timed pass.
    parts, profiled_phases = profiled_parts(prof.events(), run.device.type == "cuda")
    return dict(
        physical_batches=timer.batches,
        examples=examples,
        phases_ms=phases_ms,
        parts_ms={
            key: phases_ms[key.split("/")[0]] * v / profiled_phases[key.split("/")[0]]
            for key, v in parts.items()
        },
    )


def markdown(env: dict, settings: dict, results: list[dict]) -> str:
    good = [r for r in results if "error" not in r]
    parts = list(dict.fromkeys(p for r in good for p in r["parts_ms"]))
    lines = [
        f"# Time per {settings['physical']} examples by phase ({env['device']})",
        "",
        f"{MODELS[settings['model']][2]}, physical batch {settings['physical']}, Poisson "
        f"logical batches of expected size {settings['logical']}, "
        f"precision {settings['precision']}; torch {env['torch']}, commit {env['commit']}, "
        f"{env['time_utc']}. Milliseconds per {settings['physical']} real examples (one full "
        f"physical batch), over {settings['steps']} logical steps; phases synchronised at both "
        "ends; indented rows are parts of the phase above them (their share of it in a second "
        "pass under the torch profiler).",
        "",
        "| phase | " + " | ".join(r["mode"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(label: str, value) -> str:
        cells = ("failed" if "error" in r else f"{value(r):.2f}" for r in results)
        return f"| {label} | " + " | ".join(cells) + " |"

    for phase in PHASES:
        lines.append(row(phase, lambda r, phase=phase: r["phases_ms"][phase]))
        for key in parts:
            if key.split("/")[0] == phase:
                label = f"&nbsp;&nbsp;{key.split('/')[1]}"
                lines.append(row(label, lambda r, key=key: r["parts_ms"].get(key, 0.0)))
    lines.append(row("total", lambda r: sum(r["phases_ms"].values())))
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['mode']} failed: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: pathlib.Path) -> None:
    plt = pyplot()
    good = [r for r in results if "error" not in r]
    if plt is None or not good:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(good)), 3.6))
    bottom = [0.0] * len(good)
    for phase in PHASES:
        heights = [r["phases_ms"][phase] for r in good]
        ax.bar([r["mode"] for r in good], heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per physical batch of real examples")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(out / "profile.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--model", default="vit_base", choices=list(MODELS))
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--physical", type=int, default=32)
    parser.add_argument("--logical", type=int, help="expected logical batch (default: physical)")
    parser.add_argument("--steps", type=int, default=4, help="logical steps timed")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Settings(**json.loads(args.worker)), args.steps)))
        return {}
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.device = "cpu"
    results = []
    logical = args.logical or args.physical
    for mode in args.modes.split(","):
        print(f"[profile] {args.model} / {mode} ...", flush=True)
        settings = Settings(args.model, mode, args.precision, args.physical, logical, args.device)
        worker_args = ["--worker", json.dumps(vars(settings)), "--steps", str(args.steps)]
        results.append(dict(mode=mode, **run_worker(__file__, worker_args)))
    settings = dict(
        model=args.model,
        precision=args.precision,
        physical=args.physical,
        logical=logical,
        steps=args.steps,
        device=args.device,
    )
    payload = write_run(args.out, "profile", settings, results, markdown)
    plot(results, args.out)
    return payload


if __name__ == "__main__":
    main()

"""Largest physical batch that trains without running out of memory, per model and mode.

For each model x mode: doubling from 1, then bisection, where each probe trains two logical
steps at physical batch b (logical batches of expected size 2b, so full physical batches occur
in every mode) in a fresh process, so that memory fragmentation from earlier probes does not
lie. A probe fits when it finishes; it does not when it raises an out-of-memory error. With
``--memory-gib`` the probe gets that much memory: a cap on torch's CUDA allocator on a GPU
(``torch.cuda.set_per_process_memory_fraction``), an address-space limit on what the process
may allocate beyond its start-up footprint on CPU (which is how the CPU smoke run exercises the
search). With ``--throughput`` each mode's throughput is then measured at its largest batch.

Usage:
  python benchmarks/max_batch.py --device cuda --models vit_base --precision tf32 \\
      --throughput --out DIR
  python benchmarks/max_batch.py --smoke --out DIR           # CPU, 0.5 GiB budget, < 1 min
Writes DIR/max_batch.json, DIR/max_batch.md, DIR/max_batch.png (the paper's Fig. 2) and, with
--throughput, DIR/throughput_at_max_batch.png (Fig. 5).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks import plots  # noqa: E402
from benchmarks.common import default_device, write_run  # noqa: E402
from benchmarks.throughput import run_in_process  # noqa: E402
from benchmarks.training import DEFAULT_MODES, MODELS, Settings  # noqa: E402

# How running out of memory shows: torch's CUDA and CPU allocators, Python, C++, and oneDNN (CPU
# convolutions and matmuls), which reports a failed allocation as a primitive it cannot create.
OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "MemoryError",
    "std::bad_alloc",
    "could not create a primitive",
)
SMOKE = dict(models="smoke_vit", modes="non_private,dpfast_auto", memory_gib=0.5, cap=2)


def limit_memory(device: str, gib: float) -> None:
    """Lets this process allocate about ``gib`` GiB more (CUDA allocator cap, or address space
    beyond the current footprint on CPU)."""
    import torch

    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
        return
    import resource

    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    limit = current + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def probe(settings: Settings, memory_gib: float | None) -> dict:
    """Two logical steps at ``settings.physical`` in this process: {"fits": bool} or error."""
    import torch

    from benchmarks.training import Run

    if memory_gib:  # libraries loaded and threads started before the budget starts
        import timm  # noqa: F401

        import torch_dpfast  # noqa: F401

        if settings.mode.startswith("opacus"):
            import opacus  # noqa: F401
        torch.ones(64, 64) @ torch.ones(64, 64)
        limit_memory(settings.device, memory_gib)
    try:
        run = Run(settings)
        for _ in run.logical_steps(2):
            pass
    except (torch.OutOfMemoryError, MemoryError):
        return dict(fits=False)
    except RuntimeError as err:
        if any(marker in str(err) for marker in OOM_MARKERS):
            return dict(fits=False)
        raise
    return dict(fits=True)


def probe_in_process(settings: Settings, memory_gib: float | None) -> dict:
    cmd = [sys.executable, __file__, "--probe", json.dumps(vars(settings))]
    if memory_gib:
        cmd += ["--memory-gib", str(memory_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if any(marker in proc.stderr for marker in OOM_MARKERS) or proc.returncode < 0:
        return dict(fits=False)  # killed, or died while failing to allocate
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(error=tail[:300])


def search(fits, cap: int, progress=print) -> dict:
    """Largest b in [1, cap] with ``fits(b)`` (assumed monotone): doubling, then bisection.
    Returns {"max_batch": b, "probes": [...], "capped": bool} or {"error": ...}."""
    probes = []

    def check(b: int) -> bool | None:
        result = fits(b)
        probes.append(dict(batch=b, **result))
        progress(f"  batch {b}: {'error' if 'error' in result else result['fits']}")
        return None if "error" in result else result["fits"]

    good, bad, b = 0, None, 1
    while b <= cap:
        ok = check(b)
        if ok is None:
            return dict(error=probes[-1]["error"], probes=probes)
        if not ok:
            bad = b
            break
        good, b = b, b * 2
    if bad is None and good < cap:  # cap lies between two powers of two
        ok = check(cap)
        if ok is None:
            return dict(error=probes[-1]["error"], probes=probes)
        if ok:
            good = cap
        else:
            bad = cap
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        ok = check(mid)
        if ok is None:
            return dict(error=probes[-1]["error"], probes=probes)
        good, bad = (mid, bad) if ok else (good, mid)
    return dict(max_batch=good, capped=bad is None, probes=probes)


def measure_all(args, progress=print) -> list[dict]:
    results = []
    for model in args.models:
        for mode in args.modes:
            progress(f"[max_batch] {model} / {mode} / {args.precision} ...")

            def fits(b, model=model, mode=mode):
                settings = Settings(model, mode, args.precision, b, 2 * b, args.device)
                return probe_in_process(settings, args.memory_gib)

            row = dict(model=model, mode=mode, precision=args.precision)
            row.update(search(fits, args.cap, progress))
            if args.throughput and row.get("max_batch"):
                b = row["max_batch"]
                logical = max(b, args.logical)
                settings = Settings(model, mode, args.precision, b, logical, args.device)
                figures = run_in_process(settings, args.steps)
                row.update(
                    {"throughput_error": figures["error"]}
                    if "error" in figures
                    else dict(
                        samples_per_s=figures["samples_per_s"],
                        peak_memory_mib=figures["peak_memory_mib"],
                    )
                )
            results.append(row)
    base = {r["model"]: r.get("max_batch") for r in results if r["mode"] == "non_private"}
    for r in results:
        if r.get("max_batch") and base.get(r["model"]):
            r["vs_non_private"] = r["max_batch"] / base[r["model"]]
    return results


def markdown(env: dict, settings: dict, results: list[dict]) -> str:
    budget = f"{settings['memory_gib']} GiB budget" if settings["memory_gib"] else "all memory"
    lines = [
        f"# Largest physical batch ({env['device']}, {budget})",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; precision "
        f"{settings['precision']}; search capped at {settings['cap']}; each probe in a fresh "
        "process.",
        "",
        "| model | mode | max physical batch | vs non-private | examples/s at it |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {MODELS[r['model']][2]} | {r['mode']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | |")
            continue
        batch = f">= {r['max_batch']}" if r["capped"] else str(r["max_batch"])
        vs = f"{r['vs_non_private']:.2f}x" if "vs_non_private" in r else ""
        rate = r.get("throughput_error", "")
        if "samples_per_s" in r:
            rate = f"{r['samples_per_s']:.2f}"
        lines.append(f"{head} {batch} | {vs} | {rate} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--models", help="default: vit_base on CUDA, vit_small on CPU")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--memory-gib", type=float, default=None, help="memory budget per probe")
    parser.add_argument("--cap", type=int, default=4096, help="largest batch tried")
    parser.add_argument("--throughput", action="store_true", help="also time the max batch")
    parser.add_argument("--logical", type=int, default=0, help="logical batch for --throughput")
    parser.add_argument("--steps", type=int, default=4, help="logical steps for --throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, batch <= 2")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.device, args.throughput, args.steps = "cpu", True, 2
    args.models = (args.models or ("vit_base" if args.device != "cpu" else "vit_small")).split(",")
    args.modes = args.modes.split(",")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(Settings(**json.loads(args.probe)), args.memory_gib)))
        return {}
    results = measure_all(args, progress=lambda msg: print(msg, flush=True))
    settings = dict(
        models=args.models,
        modes=args.modes,
        precision=args.precision,
        memory_gib=args.memory_gib,
        cap=args.cap,
        device=args.device,
        throughput=args.throughput,
    )
    payload = write_run(args.out, "max_batch", settings, results, markdown)
    plots.max_batch_figures(results, args.out)
    return payload


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: timing, the environment record, and result files.

Every result file records the device, driver, versions, commit and settings beside the raw
timings, so that a number in docs/ can always be traced to the run that produced it."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    if os.environ.get("DPFAST_COMMIT"):
        return os.environ["DPFAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=pathlib.Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict:
    """Device, driver, library versions, commit and time of this run."""
    env = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torch_dpfast": _version("torch_dpfast"),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def measure(fn: Callable[[], object], device: str, repeats: int, warmup: int = 3) -> list[float]:
    """Wall times of ``fn()`` in milliseconds, one per repeat, after ``warmup`` calls.

    CUDA work is timed with events around each call (synchronised), CPU work with perf_counter.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    """Median and interquartile range of a list of timings (ms)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2]}


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def run_worker(script: str, args: list[str], timeout: float = 3600) -> dict:
    """Runs ``python script *args`` in a fresh process; returns the last JSON object it printed,
    or ``{"error": last line of stderr}`` when it failed or printed none."""
    try:
        proc = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def write_run(out: pathlib.Path, name: str, settings: dict, results: list, table) -> dict:
    """Writes out/name.json (environment, settings, results) and out/name.md
    (``table(env, settings, results)``), prints the table; returns the JSON payload."""
    env = environment()
    if settings.get("device") == "cpu":
        env["device"] = f"cpu ({env['cpu_threads']} threads)"
    payload = {"environment": env, "settings": settings, "results": results}
    write_json(out / f"{name}.json", payload)
    (out / f"{name}.md").write_text(table(env, settings, results))
    print((out / f"{name}.md").read_text())
    return payload


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt

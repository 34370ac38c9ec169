"""``dpfast bench``: runs the benchmark scripts of a source checkout (benchmarks/)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from . import UsageError

SCRIPTS = {
    "throughput": "benchmarks/throughput.py",
    "max-batch": "benchmarks/max_batch.py",
    "profile": "benchmarks/profile.py",
    "kernels": "benchmarks/kernels/bench_ops.py",
    "triton": "benchmarks/kernels/bench_triton.py",
    "scaling": "benchmarks/distributed/bench_scaling.py",
}


def add_arguments(parser) -> None:
    parser.add_argument("suite", nargs="?", default="throughput", choices=sorted(SCRIPTS))
    parser.add_argument("--smoke", action="store_true", help="a few seconds, to check it runs")
    parser.add_argument("--out", help="directory for the JSON and markdown results")
    parser.set_defaults(run=run)


def run(args) -> int:
    root = pathlib.Path(__file__).resolve().parents[2]
    script = root / SCRIPTS[args.suite]
    if not script.exists():
        raise UsageError(
            "dpfast bench runs the scripts in benchmarks/ of a source checkout, which this "
            "installation lacks: git clone the repository and pip install -e it"
        )
    command = [sys.executable, str(script)]
    if args.smoke:
        command += ["--smoke"] if args.suite != "scaling" else ["--steps", "1", "--logical", "16"]
    if args.out:
        command += ["--out", args.out]
    return subprocess.run(command, cwd=root).returncode

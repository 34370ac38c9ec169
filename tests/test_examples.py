"""The examples run end to end."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_torchrun_example_trains_on_two_processes():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            str(ROOT / "examples" / "torchrun_ddp.py"),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"accuracy ([0-9.]+), epsilon ([0-9.]+)", result.stdout)
    assert match, result.stdout
    accuracy, epsilon = map(float, match.groups())
    assert accuracy > 0.6 and 2.8 <= epsilon <= 3.0

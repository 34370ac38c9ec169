"""The examples run end to end."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

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


def _example(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_custom_loop_example_learns():
    assert _example("custom_loop").main(["--epochs", "1"]) > 0.75


def test_transformer_lm_example_runs_in_ghost_mode():
    import math

    loss = _example("transformer_lm").main(["--epochs", "1", "--clipping", "ghost"])
    assert math.isfinite(loss) and loss < 4.0  # below the ~3.4 nats of a uniform guess + margin


@pytest.mark.parametrize("lora", [False, True])
def test_causal_lm_example_fine_tunes_a_transformers_model(lora):
    """A GPT-2-architecture model from transformers, unmodified, through make_private: padding
    and attention masks, the per-example token-mean loss, LoRA adapters (peft) with the base
    frozen. The loss must fall below a uniform guess over the ~28-symbol vocabulary."""
    import math

    pytest.importorskip("transformers")
    if lora:
        pytest.importorskip("peft")
    argv = ["--epochs", "2", "--context", "48"] + (["--lora"] if lora else [])
    loss = _example("dp_causal_lm").main(argv)
    assert math.isfinite(loss) and loss < math.log(28)


def test_timm_vit_example_on_an_image_folder(tmp_path):
    import pytest

    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(8):
            pixels = (rng.random((16, 16, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    argv = [
        "--data",
        str(tmp_path),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--physical-batch-size",
        "4",
        "--train-head-only",
    ]
    epsilon = _example("finetune_timm_vit").main(argv)
    assert 7.5 <= epsilon <= 8.0

"""The `dpfast` command and the accountants at their edges: no privacy by accident (seeds),
no hang or MemoryError, and a `dpfast ...: error:` line (never a traceback) for bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.helpers import private
from torch_dpfast import accounting
from torch_dpfast.cli import main
from torch_dpfast.commands.train import _real_loss

pytest.importorskip("sklearn")


def _fails_cleanly(argv, capsys, *needles):
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert f"dpfast {argv[0]}: error:" in captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in captured.err
    return captured


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--epsilon", "inf"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--noise-multiplier", "nan"], "--noise-multiplier"),
        (["--noise-multiplier", "inf"], "--noise-multiplier"),
        (["--max-grad-norm", "inf"], "--max-grad-norm"),
        (["--lr", "nan"], "--lr"),
        (["--image-size", "0"], "--image-size"),
        (["--seed", "1", "--secure-mode"], "--secure-mode"),
    ],
)
def test_bad_train_flags_end_in_an_error_line(flags, needle, capsys):
    _fails_cleanly(["train", "--epochs", "1", *flags], capsys, needle)


def test_an_object_array_npz_is_refused_without_unpickling(tmp_path, capsys):
    x = np.empty(4, dtype=object)
    x[:] = [np.zeros((2, 2))] * 4
    np.savez(tmp_path / "data.npz", x=x, y=np.zeros(4, dtype=np.int64))
    _fails_cleanly(
        ["train", "--epochs", "1", "--data", str(tmp_path / "data.npz")], capsys, "object"
    )


def test_a_corrupt_image_is_found_before_training(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for k in range(3):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / label / f"{k}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    captured = _fails_cleanly(
        ["train", "--epochs", "1", "--data", str(tmp_path)], capsys, "broken.png"
    )
    assert "epoch 1/1" not in captured.out


def test_without_a_seed_the_cli_samples_and_noises_from_the_os(tmp_path, capsys):
    runs = []
    for k in range(2):
        summary = tmp_path / f"{k}.json"
        argv = ["train", "--epochs", "1", "--noise-multiplier", "1.0", "--summary", str(summary)]
        assert main(argv) == 0
        runs.append(json.loads(summary.read_text())["history"][0]["loss"])
    assert "OS CSPRNG (secure mode)" in capsys.readouterr().out
    assert runs[0] != runs[1]


def test_a_seed_makes_the_run_reproducible_and_says_what_that_costs(tmp_path, capsys):
    runs = []
    for k in range(2):
        summary = tmp_path / f"{k}.json"
        argv = ["train", "--epochs", "1", "--noise-multiplier", "1.0", "--seed", "3"]
        assert main([*argv, "--summary", str(summary)]) == 0
        runs.append(json.loads(summary.read_text())["history"][0]["loss"])
    assert runs[0] == runs[1]
    assert "does not hold against anyone who knows" in capsys.readouterr().out


def test_the_reported_loss_leaves_out_padding_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [2.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([1, 1, 1, 1])
    real = torch.tensor([True, True, False, False])
    summed, count = _real_loss(F.cross_entropy(logits, y), logits, y, real)
    assert count == 2
    expected = F.cross_entropy(logits[:2], y[:2], reduction="sum").item()
    assert summed == pytest.approx(expected)


def test_infinite_noise_spends_nothing_and_does_not_hang(capsys):
    eps = accounting.compute_epsilon(
        noise_multiplier=math.inf, sample_rate=0.01, steps=100, delta=1e-5
    )
    assert eps == 0.0
    assert main(["epsilon", "--sigma", "inf", "--sample-rate", "0.01", "--steps", "100"]) == 0
    assert "epsilon = 0.0000" in capsys.readouterr().out
    _fails_cleanly(["epsilon", "--sigma", "nan", "--sample-rate", "0.01", "--steps", "9"], capsys)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_huge_step_count_gives_an_answer_not_a_memory_error(accountant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PRV falls back to RDP, saying so
        eps = accounting.compute_epsilon(
            noise_multiplier=1.0, sample_rate=0.01, steps=10**12, delta=1e-5, accountant=accountant
        )
    assert math.isfinite(eps) and eps > 1e6


def test_delta_above_one_over_n_is_warned(gen, capsys):
    data = TensorDataset(torch.randn(30, 3, generator=gen), torch.randint(0, 2, (30,)))
    with pytest.warns(UserWarning, match="exceeds 1/N"):
        private(
            nn.Linear(3, 2),
            data,
            6,
            noise_multiplier=None,
            target_epsilon=5.0,
            target_delta=0.1,
            epochs=1,
        )
    argv = ["epsilon", "--sigma", "1", "--batch-size", "10", "--dataset-size", "100"]
    with pytest.warns(UserWarning, match="exceeds 1/N"):
        assert main([*argv, "--steps", "10", "--delta", "0.05"]) == 0

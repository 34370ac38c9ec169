"""Checkpoints cannot run code, survive a kill during the save, and cannot be resumed in a
way that counts an example twice or spends more than the target budget."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf
from torch_dpfast import checkpoint
from torch_dpfast.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _engine(gen, physical_batch_size=4, **kwargs):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,)))
    engine = dpf.PrivacyEngine()
    kwargs.setdefault("noise_multiplier", 1.0)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16),
        max_grad_norm=1.0,
        physical_batch_size=physical_batch_size,
        **kwargs,
    )
    return engine, model, optimizer, loader


def _run(model, optimizer, loader, batches, stop_inside=False):
    """Trains ``batches`` physical batches (then, with ``stop_inside``, on to the first point
    inside a logical batch)."""
    done = 0
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        done += 1
        if done >= batches and (not stop_inside or optimizer._accumulating):
            return done
    return done


def _state(engine, model):
    return (
        [p.detach().clone() for p in model.parameters()],
        list(engine.accountant.history),
    )


def test_a_pickle_payload_in_a_checkpoint_does_not_run(gen, tmp_path):
    engine, model, optimizer, _ = _engine(gen)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module_state_dict": _Payload(str(marker))}, path)
    with pytest.raises(dpf.CheckpointError, match="evil.pt.*could run code"):
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    assert not marker.exists()


def test_the_cli_refuses_a_pickle_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "module_state_dict": _Payload(str(marker))}, path)
    assert main(["train", "--epochs", "1", "--resume", str(path)]) != 0
    err = capsys.readouterr().err
    assert "dpfast train: error:" in err and "could run code" in err and "io.open" in err
    assert "weights_only` set to `False`" not in err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "foreign", "list"])
def test_a_damaged_or_foreign_checkpoint_names_the_file_and_the_problem(damage, gen, tmp_path):
    engine, model, optimizer, loader = _engine(gen)
    _run(model, optimizer, loader, 2)
    path = tmp_path / "run.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        torch.save([1, 2, 3], path)
    before = _state(engine, model)
    with pytest.raises(dpf.CheckpointError, match="run.pt") as error:
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    expected = {"foreign": "lacks", "list": "not a checkpoint dict"}.get(damage, "truncated")
    assert expected in str(error.value)
    after = _state(engine, model)
    assert after[1] == before[1]
    assert all(torch.equal(p, q) for p, q in zip(after[0], before[0]))


def test_a_failed_save_leaves_the_previous_checkpoint(gen, tmp_path, monkeypatch):
    engine, model, optimizer, loader = _engine(gen)
    path = tmp_path / "run.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    good = path.read_bytes()

    def killed(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary left


def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at a random moment of a loop of 40 MB saves: the file always loads."""
    path = tmp_path / "big.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from torch_dpfast import checkpoint
        state = {{"w": torch.zeros(10_000_000)}}
        checkpoint.save(state, {str(path)!r})
        print("ready", flush=True)
        while True:
            state["w"] += 1
            checkpoint.save(state, {str(path)!r})
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(1.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    loaded = checkpoint.load(path)
    assert loaded["w"].shape == (10_000_000,)
    assert bool((loaded["w"] == loaded["w"][0]).all())


def test_resume_inside_a_logical_batch_at_another_physical_size_is_refused(gen, tmp_path):
    """Saved after 2 of 4 physical batches of 2; at size 1 the cursor "2 batches consumed"
    would re-feed the second of them: 1 example added twice to one noisy sum."""
    engine, model, optimizer, loader = _engine(gen, physical_batch_size=2)
    _run(model, optimizer, loader, 1, stop_inside=True)
    assert optimizer._accumulating
    path = tmp_path / "run.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    engine2, model2, optimizer2, loader2 = _engine(gen, physical_batch_size=1)
    before = _state(engine2, model2)
    with pytest.raises(ValueError, match="inside a logical batch at physical_batch_size=2"):
        engine2.load_checkpoint(path=path, module=model2, optimizer=optimizer2)
    after = _state(engine2, model2)
    assert after[1] == before[1] and not optimizer2._accumulating
    assert all(torch.equal(p, q) for p, q in zip(after[0], before[0]))


def test_resume_at_the_end_of_a_logical_batch_at_another_physical_size(gen, tmp_path):
    """Each example sampled in the epoch is fed once in all: the real rows consumed before
    the save plus those the resumed loader feeds at the new size."""
    engine, model, optimizer, loader = _engine(gen, physical_batch_size=4)
    fed = []
    for x, y in loader:
        fed.append(x[engine.attachment.mask])
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if not optimizer._accumulating and len(fed) >= 2:
            break
    path = tmp_path / "run.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    sampled = int(engine.data_loader.batch_sampler.consumed["sizes"].sum())
    engine2, model2, optimizer2, loader2 = _engine(gen, physical_batch_size=3)
    engine2.load_checkpoint(path=path, module=model2, optimizer=optimizer2)
    for x, y in loader2:
        fed.append(x[engine2.attachment.mask])
        optimizer2.zero_grad()
        F.cross_entropy(model2(x), y).backward()
        optimizer2.step()
    fed = torch.cat(fed)
    assert fed.shape[0] == sampled  # nothing twice, nothing lost
    assert torch.unique(fed, dim=0).shape[0] == sampled


def test_resume_with_a_target_epsilon_below_what_was_spent_is_refused(gen, tmp_path):
    engine, model, optimizer, loader = _engine(gen, noise_multiplier=0.6)
    _run(model, optimizer, loader, 8)
    spent = engine.get_epsilon(1e-5)
    path = tmp_path / "run.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    engine2, model2, optimizer2, _ = _engine(
        gen, noise_multiplier=None, target_epsilon=spent / 2, target_delta=1e-5, epochs=1
    )
    with pytest.raises(ValueError, match="already spent epsilon"):
        engine2.load_checkpoint(path=path, module=model2, optimizer=optimizer2)
    assert len(engine2.accountant) == 0
    engine3, model3, optimizer3, _ = _engine(
        gen, noise_multiplier=None, target_epsilon=spent * 3, target_delta=1e-5, epochs=1
    )
    engine3.load_checkpoint(path=path, module=model3, optimizer=optimizer3)
    assert engine3.get_epsilon(1e-5) == pytest.approx(spent)


def test_cli_save_into_a_missing_directory_fails_before_training(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "run.pt"
    assert main(["train", "--epochs", "1", "--save", str(missing)]) != 0
    err = capsys.readouterr()
    assert "nowhere" in err.err and "epoch 1/1" not in err.out

"""Ranks that disagree on the settings fail at make_private, on every rank, with an error
naming what differs: before, they drifted apart and hung in a collective."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf

TIMEOUT_S = 120


def _worker(rank, world_size, init_file, out_dir, settings):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        mine = {key: value[rank] for key, value in settings.items()}
        data = TensorDataset(torch.randn(mine["n"], 4), torch.randint(0, 2, (mine["n"],)))
        model = nn.Linear(4, 2)
        try:
            dpf.PrivacyEngine().make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(data, batch_size=mine["batch_size"]),
                noise_multiplier=mine["sigma"],
                max_grad_norm=mine["max_grad_norm"],
                physical_batch_size=4,
            )
            result = {"error": None}
        except ValueError as error:
            result = {"error": str(error)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, settings) -> list[dict]:
    context = mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path), settings),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    waited = 0
    while not context.join(timeout=5):
        waited += 5
        if waited >= TIMEOUT_S:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


BASE = {"n": [40, 40], "batch_size": [8, 8], "sigma": [1.0, 1.0], "max_grad_norm": [1.0, 1.0]}


@pytest.mark.parametrize(
    "field,values,named",
    [
        ("max_grad_norm", [1.0, 2.0], "max_grad_norm (rank 0: 1, rank 1: 2)"),
        ("sigma", [1.0, 0.5], "noise_multiplier"),
        ("n", [40, 44], "dataset size"),
        ("batch_size", [8, 4], "sample rate"),
    ],
)
def test_disagreeing_ranks_fail_alike_and_name_the_difference(field, values, named, tmp_path):
    results = _spawn(tmp_path, {**BASE, field: values})
    for result in results:
        assert result["error"] is not None and "ranks disagree on" in result["error"]
        assert named in result["error"]


def test_agreeing_ranks_pass(tmp_path):
    assert [r["error"] for r in _spawn(tmp_path, BASE)] == [None, None]

"""DP-SGD across 2 and 3 processes with gloo on CPU (spawned from pytest, file:// rendezvous).

Checks: identical parameters on every rank after every logical step; each step equals the
brute-force clipped sum over the union of the ranks' samples divided by q N; the ranks' samples
are disjoint; the noise is added once (its measured std is sigma C / (q N), not sqrt(W) times
that); ranks with empty samples do not hang the group; a DDP-wrapped model is refused.
"""

from __future__ import annotations

import math
import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf

TIMEOUT_S = 240


def _dataset(n: int):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x[2] *= 1e4  # one huge example: clipped like any other
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, y, torch.arange(n))


def _model():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _worker(rank, world_size, init_file, out_dir, config):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(100 + rank)  # ranks start different: make_private must align them
        model = _model() if not config.get("wide") else nn.Linear(40, 30).double()
        if config.get("ddp"):
            try:
                dpf.PrivacyEngine().make_private(
                    module=nn.parallel.DistributedDataParallel(model),
                    optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                    data_loader=DataLoader(_dataset(12), batch_size=3),
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                )
            except ValueError as error:
                torch.save({"error": str(error)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        dataset = _dataset(config["n"])
        if config.get("wide"):
            dataset = TensorDataset(torch.zeros(config["n"], 40, dtype=torch.float64))
        engine = dpf.PrivacyEngine(secure_mode=config.get("secure", False))
        clipping = config.get("clipping", "auto")
        out = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=config["lr"]),
            data_loader=DataLoader(dataset, batch_size=config["batch_size"]),
            noise_multiplier=config["sigma"],
            max_grad_norm=config["max_grad_norm"],
            physical_batch_size=config["physical_batch_size"],
            padding=config.get("padding", "full"),
            clipping=clipping,
            criterion=nn.CrossEntropyLoss() if clipping == "ghost" else None,
        )
        if clipping == "ghost":
            model, optimizer, criterion, loader = out
        else:
            (model, optimizer, loader), criterion = out, nn.CrossEntropyLoss()
        start = [p.detach().clone() for p in model.parameters()]
        infos, announce = [], loader.on_batch
        loader.on_batch = lambda info: (infos.append(info), announce(info))
        steps, rows, batches = [], [], 0
        for batch in loader:
            info = infos[-1]
            if info.first:
                rows.append([])
            optimizer.zero_grad()
            if config.get("wide"):
                zero = torch.zeros(len(batch[0]), dtype=torch.long)
                criterion(model(batch[0]) * 0, zero).backward()  # zero gradient: noise only
            else:
                x, y, idx = batch
                rows[-1] += idx[info.mask].tolist()
                criterion(model(x), y).backward()
            optimizer.step()
            batches += 1
            if info.last:
                steps.append([p.detach().clone() for p in model.parameters()])
        torch.save(
            dict(
                start=start,
                steps=steps,
                rows=rows,
                batches=batches,
                accountant=engine.accountant.history,
                bytes=optimizer.bytes_communicated,
                overlapped=optimizer.bytes_overlapped,
                expected_batch_size=optimizer.expected_batch_size,
            ),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, tmp_path: pathlib.Path, config: dict) -> list[dict]:
    init_file = tmp_path / "rendezvous"
    context = mp.start_processes(
        _worker,
        args=(world_size, str(init_file), str(tmp_path), config),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = TIMEOUT_S
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish in {TIMEOUT_S} s (a hang)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def _clipped_sum(model, x, y, max_norm):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"), params
        )
        norm = torch.sqrt(sum(g.square().sum() for g in grads)).item()
        for t, g in zip(total, grads):
            t += min(1.0, max_norm / (norm + 1e-6)) * g
    return total


@pytest.mark.parametrize(
    "world_size, physical_batch_size, clipping, secure, padding",
    [
        (2, 2, "auto", False, "full"),
        (3, 3, "ghost", False, "full"),
        (3, None, "per_example", False, "full"),
        (2, 3, "bk", True, "full"),
        (2, 4, "ghost", False, "pow2"),  # last batches of different widths on the two ranks
    ],
)
def test_ranks_agree_and_each_step_is_the_clipped_sum_over_all_ranks(
    world_size, physical_batch_size, clipping, secure, padding, tmp_path
):
    config = dict(
        padding=padding,
        secure=secure,
        n=26,
        batch_size=6,
        lr=0.5,
        sigma=0.0,
        max_grad_norm=0.8,
        physical_batch_size=physical_batch_size,
        clipping=clipping,
    )
    results = _spawn(world_size, tmp_path, config)
    steps = len(results[0]["steps"])
    assert steps == round(26 / 6)
    for other in results[1:]:
        assert other["batches"] == results[0]["batches"]  # the same number of physical batches
        assert other["accountant"] == results[0]["accountant"]
        for mine, theirs in zip(results[0]["steps"], other["steps"]):
            for p, q in zip(mine, theirs):
                assert torch.equal(p, q)
    x, y, _ = _dataset(26).tensors
    model = _model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), results[0]["start"]):
            p.copy_(value)
    for k in range(steps):
        rows = [r["rows"][k] for r in results]
        union = sorted(i for part in rows for i in part)
        assert len(union) == len(set(union))  # the ranks' samples are disjoint
        for rank, part in enumerate(rows):
            assert all(i % world_size == rank for i in part)  # each rank samples its shard
        summed = _clipped_sum(model, x[union], y[union], 0.8)
        with torch.no_grad():
            for p, s in zip(model.parameters(), summed):
                p -= 0.5 * s / 6.0  # expected batch size q N = 6 (global)
        for p, q in zip(model.parameters(), results[0]["steps"][k]):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # One all-reduce of the parameters per logical step, whatever the physical batch count.
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert results[0]["bytes"] == steps * param_bytes
    # Ghost clipping launches the all-reduces of finished layers during its second backward.
    assert (results[0]["overlapped"] > 0) == (clipping == "ghost")


@pytest.mark.parametrize("clipping", ["auto", "ghost"])  # ghost: noise added during backward
def test_noise_is_added_once_not_once_per_rank(clipping, tmp_path):
    sigma, max_norm, lr, n, batch = 2.0, 0.5, 1.0, 40, 10
    config = dict(
        clipping=clipping,
        n=n,
        batch_size=batch,
        lr=lr,
        sigma=sigma,
        max_grad_norm=max_norm,
        physical_batch_size=4,
        wide=True,
    )
    results = _spawn(2, tmp_path, config)
    trajectory = [results[0]["start"]] + results[0]["steps"]
    updates = torch.cat([(b[0] - a[0]).flatten() for a, b in zip(trajectory[:-1], trajectory[1:])])
    expected = lr * sigma * max_norm / batch
    # 4 steps x 1200 weights: the sample std is within 5% of the truth at about 5 sigma, while
    # noise from both ranks would make it sqrt(2) = 1.41 times larger.
    assert abs(updates.std().item() / expected - 1) < 0.05, updates.std().item() / expected
    assert not math.isclose(updates.std().item(), expected * math.sqrt(2), rel_tol=0.1)


def test_ranks_with_empty_samples_do_not_hang(tmp_path):
    config = dict(n=12, batch_size=1, lr=0.1, sigma=1.0, max_grad_norm=1.0, physical_batch_size=2)
    results = _spawn(3, tmp_path, config)
    assert all(len(r["steps"]) == 12 for r in results)
    empty = sum(not part for r in results for part in r["rows"])
    assert empty > 12  # most of the 36 rank-steps had no example
    for other in results[1:]:
        for mine, theirs in zip(results[0]["steps"], other["steps"]):
            assert all(torch.equal(p, q) for p, q in zip(mine, theirs))


def test_a_ddp_wrapped_model_is_refused_with_the_fix(tmp_path):
    results = _spawn(2, tmp_path, dict(ddp=True))
    assert all("ddp_model.module" in r["error"] for r in results)

"""Cross-example coupling that no clipping can bound is detected on the first forward (the
independence probe, torch_dpfast/coupling.py) and refused, naming where it happens."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import torch_dpfast as dpf
from tests.helpers import clipped_reference, private, train_epoch


class BatchCentred(nn.Module):
    """Two layers with a parameter-free ``h - h.mean(0)`` between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.first(x)
        return self.second(h - h.mean(0))


class SequenceFirst(nn.Module):
    """Feeds its Linear a (T, B, d) tensor: dim 0 is time, and T equals the batch here."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):  # x (B, T, 4)
        return self.proj(x.transpose(0, 1)).mean(0)  # (B, 3) by averaging over time


class Independent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(10, 4), nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        return self.proj(self.drop(self.embed(ids))).mean(1)


def _summed_clipped(model, x, y, probe):
    attachment = dpf.attach(model, clipping="bk", loss_reduction="sum", probe_coupling=probe)
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        attachment.clip_and_accumulate(1.0)
        return torch.cat([p.summed_grad.flatten() for p in attachment.parameters()])
    finally:
        for p in model.parameters():
            p.summed_grad = None
        attachment.detach()


def test_without_the_probe_one_example_moves_a_batch_centred_model_by_more_than_c(gen):
    """Why the probe exists: every norm is clipped, yet the sum moves by several C."""
    torch.manual_seed(0)
    model = BatchCentred()
    x = torch.randn(6, 4, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    x[-1] *= 1000  # the adversary: every other example's centred input now points its way
    moved = (
        _summed_clipped(model, x, y, probe=False) - _summed_clipped(model, x[:-1], y[:-1], False)
    ).norm()
    assert moved > 2.0


def test_a_batch_centred_model_is_refused_naming_the_layer(gen):
    model = BatchCentred()
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    with pytest.raises(RuntimeError, match=r"couples the examples.*'second'"):
        _summed_clipped(model, x, y, probe=True)


def test_a_sequence_first_layer_with_t_equal_to_the_batch_is_refused(gen):
    model = SequenceFirst()
    x, y = torch.randn(5, 5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    with pytest.raises(RuntimeError, match=r"'proj'.*another dimension than 0"):
        _summed_clipped(model, x, y, probe=True)


class _Centre(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


def test_coupling_in_the_models_last_operation_is_refused(gen):
    model = nn.Sequential(nn.Linear(4, 3), _Centre())
    attachment = dpf.attach(model)
    try:
        with pytest.raises(RuntimeError, match="after the last captured layer"):
            model(torch.randn(4, 4, generator=gen))
    finally:
        attachment.detach()


def test_independent_models_with_dropout_and_ids_pass_the_probe(gen):
    data = TensorDataset(torch.randint(0, 10, (20, 7), generator=gen), torch.randint(0, 3, (20,)))
    engine, model, optimizer, loader = private(Independent(), data, 5, physical_batch_size=4)
    train_epoch(model, optimizer, loader)
    assert len(engine.accountant) > 0


def test_a_make_private_loop_refuses_a_coupled_model_at_its_first_forward(gen):
    data = TensorDataset(torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,)))
    engine, model, optimizer, loader = private(BatchCentred(), data, 8, physical_batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="couples the examples"):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert len(engine.accountant) == 0


class SharedPositions(nn.Module):
    """Adds a position table looked up with arange(T), no batch dimension: with T equal to the
    batch size its rows pass dim-0 checks, but each row sums every example's gradient."""

    def __init__(self, batched: bool):
        super().__init__()
        self.embed, self.position = nn.Embedding(9, 4), nn.Embedding(6, 4)
        self.head, self.batched = nn.Linear(4, 2), batched

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])
        positions = positions[None] if self.batched else positions
        return self.head(torch.tanh(self.embed(ids) + self.position(positions))).sum(1)


def test_a_table_shared_across_the_batch_is_attributed_where_it_meets_the_batch(gen):
    """T == B: the position layer's rows pass dim-0 checks, but its input (arange(T)) does not
    move with the examples; the probe's first run finds it, the caller is traced, and the
    table's gradient is attributed per example where the shared rows are added to the batch."""
    ids = torch.randint(0, 9, (6, 6), generator=gen)  # T == B
    for batched in (False, True):  # (T,) shared, or (1, T): expanded to one row per example
        model = SharedPositions(batched).double()
        reference = copy.deepcopy(model)
        rows = []
        for i in range(6):
            reference.zero_grad()
            reference(ids[i : i + 1]).sin().sum().backward()
            rows.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
        expected, expected_sq = clipped_reference(torch.stack(rows), 0.5)
        att = dpf.attach(model, loss_reduction="sum")
        try:
            model(ids).sin().sum().backward()
            norm_sq = att.clip_and_accumulate(0.5)
        finally:
            att.detach()
        got = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(norm_sq, expected_sq)

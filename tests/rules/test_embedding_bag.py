"""nn.EmbeddingBag in every usage (a (B, L) input; flat ids with offsets, include_last_offset,
an empty bag; per_sample_weights; padding_idx; sum, mean, max) and every clipping mode, with a
padding row, against float64 per-example autograd (one bag per forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_dpfast as dpf
from tests.helpers import clipped_reference
from torch_dpfast.ghost import ghost_backward

MODES = ["auto", "bk", "per_example", "ghost"]
V, D, C = 11, 5, 0.4


class Bags(nn.Module):
    def __init__(self, mode, padding_idx=None, include_last_offset=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(
            V, D, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset
        )
        self.head = nn.Linear(D, 3)

    def forward(self, ids, offsets=None, weights=None):
        return self.head(self.bag(ids, offsets, per_sample_weights=weights))


def _bags(gen, batch, padding_idx):
    """Bag lengths 0..4 (bag 2 empty), ids with padding_idx among them."""
    lengths = torch.randint(1, 5, (batch,), generator=gen)
    lengths[2] = 0
    bags = [torch.randint(0, V, (int(n),), generator=gen) for n in lengths]
    if padding_idx is not None:
        bags[0][0] = padding_idx
    return bags


def _flat(bags, include_last_offset):
    ids = torch.cat(bags)
    starts = torch.cumsum(torch.tensor([0] + [len(b) for b in bags]), 0)
    offsets = starts if include_last_offset else starts[:-1]
    return ids, offsets


def _call(model, bags, layout, weights, include_last_offset):
    if layout == "2d":
        return model(torch.stack(bags), None, None if weights is None else torch.stack(weights))
    ids, offsets = _flat(bags, include_last_offset)
    return model(ids, offsets, None if weights is None else torch.cat(weights))


CASES = {
    "sum_offsets": dict(mode="sum", layout="flat"),
    "mean_offsets_padding_idx": dict(mode="mean", layout="flat", padding_idx=3),
    "max_last_offset": dict(mode="max", layout="flat", include_last_offset=True),
    "sum_weighted": dict(mode="sum", layout="flat", weighted=True),
    "mean_2d": dict(mode="mean", layout="2d"),
    "sum_2d_weighted_padding_idx": dict(mode="sum", layout="2d", weighted=True, padding_idx=0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_embedding_bag_matches_per_example_autograd(case, mode, gen):
    spec = CASES[case]
    batch, kept = 5, 4
    padding_idx = spec.get("padding_idx")
    last = spec.get("include_last_offset", False)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = Bags(spec["mode"], padding_idx, last).double()
    if spec["layout"] == "2d":
        bags = [torch.randint(0, V, (3,), generator=gen) for _ in range(batch)]
        if padding_idx is not None:
            bags[1][0] = padding_idx
    else:
        bags = _bags(gen, batch, padding_idx)
    weights = None
    if spec.get("weighted"):
        weights = [torch.randn(len(b), generator=gen, dtype=torch.float64) for b in bags]
    reference = copy.deepcopy(model)
    rows = []
    for i in range(kept):
        reference.zero_grad()
        w = None if weights is None else weights[i : i + 1]
        _call(reference, bags[i : i + 1], spec["layout"], w, last).sin().sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    expected, expected_sq = clipped_reference(torch.stack(rows), C)
    att = dpf.attach(model, clipping=mode, loss_reduction="sum")
    try:
        att.begin_batch(torch.arange(batch) < kept)
        losses = _call(model, bags, spec["layout"], weights, last).sin().sum(dim=1)
        if mode == "ghost":
            norm_sq = ghost_backward(att, losses, C)
        else:
            losses.sum().backward()
            norm_sq = att.clip_and_accumulate(C)
    finally:
        att.detach()
    got = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(norm_sq[:kept].double(), expected_sq)


def test_embedding_bag_forward_equals_torchs(gen):
    for spec in CASES.values():
        model = Bags(spec["mode"], spec.get("padding_idx"), spec.get("include_last_offset", False))
        model = model.double()
        bags = (
            _bags(gen, 5, spec.get("padding_idx"))
            if spec["layout"] == "flat"
            else [torch.randint(0, V, (3,), generator=gen) for _ in range(5)]
        )
        weights = None
        if spec.get("weighted"):
            weights = [torch.randn(len(b), generator=gen, dtype=torch.float64) for b in bags]
        last = spec.get("include_last_offset", False)
        expected = _call(model, bags, spec["layout"], weights, last)
        att = dpf.attach(model, probe_coupling=False)
        got = _call(model, bags, spec["layout"], weights, last)
        att.detach()
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("last", [False, True])
def test_flat_ids_as_many_as_the_bags_are_not_taken_for_the_batch(last):
    """Five bags holding five ids in all (lengths 2, 1, 0, 1, 1): the flat ids are as long as
    the batch, yet their rows are not the examples (id 1 is bag 0's); the independence probe
    once perturbed them as if they were and reported coupling."""
    model = Bags("sum", include_last_offset=last).double()
    ids = torch.tensor([3, 1, 4, 1, 5])  # not sorted from 0: no look of offsets
    bags = list(ids.split([2, 1, 0, 1, 1]))
    att = dpf.attach(model, loss_reduction="sum")
    try:
        att.begin_batch(torch.ones(5, dtype=torch.bool))
        _call(model, bags, "flat", None, last).sum().backward()
        assert att.clip_and_accumulate(C).shape == (5,)
    finally:
        att.detach()

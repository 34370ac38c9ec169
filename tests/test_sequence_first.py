"""batch_first=False (Opacus's sequence-first models): inputs (T, B), layers that see (T, B, ...)
against float64 per-example brute force in every clipping mode, with padding rows; and the
refusal of a sequence-first model declared batch-first."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import torch_dpfast as dpf
from tests.helpers import clipped_reference, private, train_epoch
from torch_dpfast.ghost import ghost_backward

MODES = ["auto", "auto_fast", "bk", "per_example", "ghost"]
T, B, V = 7, 5, 11


class SequenceFirstLM(nn.Module):
    """ids (T, B) -> per-example losses (B,): embedding, sequence-first attention and LSTM,
    LayerNorm and a head, all seeing the batch in dim 1."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.lstm = nn.LSTM(8, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        out, _ = self.lstm(h + a)
        return self.head(self.norm(out)).sin().sum(dim=(0, 2))


def _reference(model, ids, max_norm, kept):
    rows = []
    for i in range(kept):
        model.zero_grad()
        model(ids[:, i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return clipped_reference(torch.stack(rows), max_norm)


@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("mode", MODES)
def test_sequence_first_layers_match_brute_force(mode, padding, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = SequenceFirstLM().double()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, V, (T, B), generator=gen)
    kept = B - padding
    mask = torch.arange(B) < kept if padding else None
    for max_norm in (0.05, 1e6):
        expected, expected_sq = _reference(reference, ids, max_norm, kept)
        clipping = "auto" if mode == "auto_fast" else mode
        extra = dict(materialise_bytes=0) if mode == "auto_fast" else {}
        att = dpf.attach(model, clipping=clipping, loss_reduction="sum", batch_first=False, **extra)
        try:
            att.begin_batch(mask)
            if mode == "ghost":
                norm_sq = ghost_backward(att, model(ids), max_norm)
            else:
                model(ids).sum().backward()
                norm_sq = att.clip_and_accumulate(max_norm)
            got = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
        finally:
            att.detach()
            for p in model.parameters():
                p.summed_grad = None
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm_sq[:kept].double(), expected_sq, rtol=1e-9, atol=1e-12)


def _sequence_first(batch):
    """Collates (ids (T,), label) items into ids (T, B) and labels (B,)."""
    return torch.stack([item[0] for item in batch]).T, torch.stack([item[1] for item in batch])


def _private_text(model, gen, **kwargs):
    """make_private over 40 random (T,)-token examples, batched sequence-first (T, B)."""
    data = TensorDataset(
        torch.randint(0, V, (40, T), generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    return private(model, data, 8, collate_fn=_sequence_first, **kwargs)


def test_make_private_trains_a_sequence_first_model(gen):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(V, 8), nn.Linear(8, 3)

        def forward(self, ids):  # (T, B) -> (B, 3)
            return self.head(self.embed(ids)).mean(dim=0)

    engine, model, optimizer, loader = _private_text(
        Classifier(), gen, batch_first=False, physical_batch_size=4
    )
    train_epoch(model, optimizer, loader)
    assert len(engine.accountant) > 0


def test_sequence_first_data_declared_batch_first_is_refused(gen):
    """Opacus clips per time step when a (T, B) model is declared batch-first; here the
    layers' batch does not match the physical batch and the step says so."""
    model = nn.Sequential(nn.Embedding(V, 4), nn.Linear(4, 3))
    engine, model, optimizer, loader = _private_text(model, gen)
    with pytest.raises((ValueError, RuntimeError), match="batch"):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x).mean(0), y).backward()
            optimizer.step()

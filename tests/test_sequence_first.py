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


@pytest.mark.parametrize("physical_batch_size", [None, T])
def test_sequence_first_data_declared_batch_first_is_refused(physical_batch_size, gen):
    """Opacus clips per time step when (T, B) data is declared batch-first. With a physical
    batch of T rows (or a Poisson draw of T examples) the layers' dim 0 matches the mask and
    no shape tells the layouts apart: make_private refuses from the collate function's layout,
    before any step."""
    model = nn.Sequential(nn.Embedding(V, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"dim 1 of a tensor of shape \(7, B\).*batch_first=False"):
        _private_text(model, gen, physical_batch_size=physical_batch_size)


def test_batch_first_data_declared_sequence_first_is_refused(gen):
    """The converse: (B, T) batches with batch_first=False would clip each position of dim 1."""
    data = TensorDataset(
        torch.randint(0, V, (40, T), generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    model = nn.Sequential(nn.Embedding(V, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="puts it in dim 0"):
        private(model, data, 8, batch_first=False)


@pytest.mark.parametrize("turn", ["T", "contiguous", "float"])
def test_batch_turned_around_in_the_loop_is_refused(turn, gen):
    """A batch-first loader and a loop that feeds the model x.T (or a copy of it, or a cast):
    with a physical batch of T rows the layers' dim 0 matches the mask, so only the probe's
    comparison with the loader's batch tells; the first forward refuses."""
    data = TensorDataset(
        torch.randint(0, V, (40, T), generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    model = nn.Sequential(nn.Embedding(V, 4), nn.Linear(4, 3))
    if turn == "float":  # a model taking float features (T, B) -> (T, B, 3)
        model = nn.Sequential(nn.Unflatten(-1, (-1, 1)), nn.Linear(1, 3))
    turned = {
        "T": lambda x: x.T,
        "contiguous": lambda x: x.transpose(0, 1).contiguous(),
        "float": lambda x: x.T.float(),
    }[turn]
    engine, model, optimizer, loader = private(
        model, data, 8, physical_batch_size=T, padding="full"
    )
    with pytest.raises(ValueError, match=r"turned around.*moved from dim 0 to dim 1"):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(turned(x)).mean(0), y).backward()
            optimizer.step()


def test_batch_as_the_loader_gives_it_trains_when_t_equals_the_batch(gen):
    """The check does not refuse the right loop: (B, T) batches with T = B, and a second
    argument equal to its own transpose (an all-ones attention mask)."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(V, 4), nn.Linear(4, 3)

        def forward(self, ids, mask):
            return (self.head(self.embed(ids)) * mask[..., None]).mean(1)

    data = TensorDataset(
        torch.randint(0, V, (40, T), generator=gen),
        torch.ones(40, T),
        torch.randint(0, 3, (40,), generator=gen),
    )
    engine, model, optimizer, loader = private(
        Masked(), data, 8, physical_batch_size=T, padding="full"
    )
    for x, mask, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x, mask), y).backward()
        optimizer.step()
    assert len(engine.accountant) > 0


@pytest.mark.parametrize("physical_batch_size", [None, 8])
def test_batch_sorted_in_the_loop_is_refused_where_the_loader_pads(physical_batch_size, gen):
    """Sorting the batch by length in the loop (for pack_padded_sequence) moves the padding
    rows, copies of the batch's first example, among the real ones: that example would be
    clipped several times, others dropped. Refused on the first forward where the loader pads;
    harmless (every row real) and allowed without a physical batch size."""
    data = TensorDataset(
        torch.randn(40, T, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    model = nn.Sequential(nn.Linear(T, 3))
    extra = {} if physical_batch_size is None else dict(physical_batch_size=8, padding="full")
    engine, model, optimizer, loader = private(model, data, 8, **extra)

    def epoch():
        for x, y in loader:
            order = x[:, 0].argsort()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[order]), y[order]).backward()
            optimizer.step()

    if physical_batch_size is None:
        epoch()
    else:
        with pytest.raises(ValueError, match="another row order"):
            epoch()


@pytest.mark.parametrize("read", ["in_the_forward", "at_the_clip"])
def test_batch_sorted_from_the_second_step_on_is_refused(read, gen, monkeypatch):
    """Every loader batch's first forward is compared, not only the probe's: on CPU decided in
    the forward; on a GPU (here: the engine told to read the flags later, as it does on a
    device) when the batch is clipped, before any of it is added to the sums."""
    from torch_dpfast import engine as engine_module

    if read == "at_the_clip":
        monkeypatch.setattr(engine_module, "_decided_now", lambda findings: False)
    data = TensorDataset(
        torch.randn(40, T, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    engine, model, optimizer, loader = private(
        nn.Sequential(nn.Linear(T, 3)), data, 8, physical_batch_size=8, padding="full"
    )
    steps, before, phase = 0, None, None
    with pytest.raises(ValueError, match="another row order"):
        for x, y in loader:
            order = x[:, 0].argsort() if steps else torch.arange(x.shape[0])
            optimizer.zero_grad()
            before = [p.detach().clone() for p in model.parameters()]
            phase = "forward"
            loss = nn.functional.cross_entropy(model(x[order]), y[order])
            phase = "backward and step"
            loss.backward()
            optimizer.step()
            steps += 1
    assert steps >= 1
    assert phase == ("forward" if read == "in_the_forward" else "backward and step")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("sort", [False, True])
def test_loader_batches_compared_on_every_device(sort, device, gen):
    """The usual loop with the batch moved to the model's device: left alone it trains (the
    loader's tensors are compared after a copy to the device, no false refusal); sorted from
    the second step on, it is refused (on CPU in the forward, on a GPU at the clip)."""
    data = TensorDataset(
        torch.randn(40, T, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    )
    engine, model, optimizer, loader = private(
        nn.Sequential(nn.Linear(T, 3)).to(device), data, 8, physical_batch_size=8, padding="full"
    )

    def epoch():
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            order = x[:, 0].argsort() if sort and step else torch.arange(8, device=device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[order]), y[order]).backward()
            optimizer.step()

    if sort:
        with pytest.raises(ValueError, match="another row order"):
            epoch()
    else:
        epoch()
        assert optimizer.steps_taken >= 1

"""Recurrent layers and cells (rules/recurrent.py, recurrent_cell.py) against float64 brute
force: each example run alone through an unattached copy, its gradient clipped by hand. Every
clipping mode, every usage: batch_first or not, layers, bidirectional, proj_size, dropout, an
explicit h0 / (h0, c0), PackedSequence inputs, reading output, h_n or c_n; padding rows."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import torch_dpfast as dpf
from tests.helpers import clipped_reference, watch_ghost_kernel, watch_normed_materialising
from torch_dpfast.ghost import ghost_backward
from torch_dpfast.rules import recurrent as recurrent_rule
from torch_dpfast.rules.fallback import FALLBACK

MODES = ["auto", "auto_fast", "bk", "per_example", "ghost"]
B, T, D, H = 5, 6, 3, 4


class Net(nn.Module):
    """Per-example losses (B,) of a recurrent layer read through ``read`` (a subset of
    "output", "h_n", "c_n"); inputs batch-first: x (B, T, D), lengths (B,), h0 / c0
    (B, layers * dirs, .)."""

    def __init__(self, rnn, read=("output",), packed=False, state=False):
        super().__init__()
        self.rnn, self.read, self.packed, self.state = rnn, read, packed, state
        self.head = nn.Linear(rnn.hidden_size * (1 + rnn.bidirectional), 2)

    def forward(self, x, lengths, h0, c0):
        rnn = self.rnn
        first = rnn.batch_first
        inp = x if first else x.transpose(0, 1)
        if self.packed:
            inp = pack_padded_sequence(inp, lengths, batch_first=first, enforce_sorted=False)
        hx = None
        if self.state:
            hx = (h0.transpose(0, 1), c0.transpose(0, 1)) if c0.numel() else h0.transpose(0, 1)
        out, state = rnn(inp, hx)
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        elif not first:
            out = out.transpose(0, 1)
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        losses = torch.zeros(x.shape[0], dtype=x.dtype)
        if "output" in self.read:
            losses = losses + self.head(out).sin().sum(dim=(1, 2))
        if "h_n" in self.read:
            losses = losses + h_n.transpose(0, 1).mul(1.7).cos().sum(dim=(1, 2))
        if "c_n" in self.read and c_n is not None:
            losses = losses + c_n.transpose(0, 1).square().sum(dim=(1, 2))
        return losses


def _rnn(kind, **kwargs):
    if kind == "rnn_relu":
        return nn.RNN(D, H, nonlinearity="relu", **kwargs)
    return {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](D, H, **kwargs)


CONFIGS = {
    "plain": dict(),
    "seq_first": dict(batch_first=False),
    "deep_bidirectional": dict(num_layers=2, bidirectional=True),
    "no_bias": dict(bias=False, num_layers=2),
}
READS = {"output": ("output",), "h_n": ("h_n",), "all": ("output", "h_n", "c_n")}


def _inputs(net, gen):
    rnn = net.rnn
    states = rnn.num_layers * (1 + rnn.bidirectional)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([T, 2, 5, 1, 4])[:B]
    h_out = getattr(rnn, "proj_size", 0) or H
    h0 = torch.randn(B, states, h_out, generator=gen, dtype=torch.float64)
    lstm = isinstance(rnn, nn.LSTM) or type(rnn).__name__ == "DPLSTM"
    c0 = torch.randn(B, states, H, generator=gen, dtype=torch.float64) if lstm else x.new_zeros(0)
    return x, lengths, h0, c0


def _example(args, i):
    return tuple(a[i : i + 1] if a.numel() else a for a in args)


def _flat(net, grads):
    """{name: gradient} of the trainable parameters flattened in name order (zeros where a
    parameter got none: a head the loss skips)."""
    named = sorted((n, p) for n, p in net.named_parameters() if p.requires_grad)
    return torch.cat(
        [
            (grads.get(n, None) if grads.get(n) is not None else torch.zeros_like(p)).flatten()
            for n, p in named
        ]
    )


def _reference(net, args, max_norm, kept):
    """(clipped sum over the first ``kept`` examples, their squared norms), by a loop."""
    rows = []
    for i in range(kept):
        net.zero_grad()
        net(*_example(args, i)).sum().backward()
        rows.append(_flat(net, {n: p.grad for n, p in net.named_parameters()}))
    return clipped_reference(torch.stack(rows), max_norm)


def _attached(net, args, mode, max_norm, mask=None):
    if mode == "auto_fast":
        att = dpf.attach(net, clipping="auto", loss_reduction="sum", materialise_bytes=0)
    else:
        att = dpf.attach(net, clipping=mode, loss_reduction="sum")
    try:
        att.begin_batch(mask)
        if mode == "ghost":
            norm_sq = ghost_backward(att, net(*args), max_norm)
        else:
            net(*args).sum().backward()
            norm_sq = att.clip_and_accumulate(max_norm)
        assert all(p.grad is None for p in net.parameters())
        return _flat(
            net, {n: getattr(p, "summed_grad", None) for n, p in net.named_parameters()}
        ), norm_sq
    finally:
        att.detach()
        for p in net.parameters():
            p.summed_grad = None


def _check(net, args, mode, gen, padding=0, reference=None):
    """The attached net's clipped sums and norms equal a per-example loop over ``reference``
    (an unattached copy of the net by default)."""
    reference = copy.deepcopy(net) if reference is None else reference
    kept = B - padding
    mask = torch.arange(B) < kept if padding else None
    for max_norm in (0.05, 1e6):
        expected, expected_sq = _reference(reference, args, max_norm, kept)
        got, norm_sq = _attached(net, args, mode, max_norm, mask)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm_sq[:kept].double(), expected_sq, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "rnn_relu"])
@pytest.mark.parametrize("config", CONFIGS)
def test_layers_match_brute_force(kind, config, mode, gen):
    net = Net(_rnn(kind, **{"batch_first": True, **CONFIGS[config]}), read=READS["all"]).double()
    _check(net, _inputs(net, gen), mode, gen)


def _force_path(path, monkeypatch):
    """Makes LSTM and RNN layers run their recurrence by ``path``: "compiled" (csrc/cpu/
    recurrence.cpp), "native" (torch's fused kernel with the identity input weight) or "steps"
    (PyTorch ops per step); returns the list each call of the chosen path appends to."""
    calls = []
    if path != "compiled":
        monkeypatch.setattr(recurrent_rule.fused, "available", lambda *a: False)
    if path != "native":
        monkeypatch.setattr(recurrent_rule, "NATIVE_MAX_MACS_PER_STEP", 0)
    method = {"compiled": "_fused", "native": "_native", "steps": "_steps"}[path]
    original = getattr(recurrent_rule._Recurrence, method)
    monkeypatch.setattr(
        recurrent_rule._Recurrence, method, lambda *a: calls.append(1) or original(*a)
    )
    return calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "rnn_relu"])
@pytest.mark.parametrize("path", ["compiled", "native", "steps"])
def test_every_recurrence_path_matches_brute_force(kind, path, mode, gen, monkeypatch):
    """Recurrent layers run compiled on CPU, else (LSTM and RNN cells) by torch's fused kernel
    at small batch * gates^2, else step by step: each path, every mode, several layers both
    ways."""
    if kind == "gru" and path == "native":
        pytest.skip("a GRU's gates are not gi + gh: torch's fused kernel cannot give dgh")
    calls = _force_path(path, monkeypatch)
    rnn = _rnn(kind, batch_first=True, num_layers=2, bidirectional=True)
    net = Net(rnn, read=READS["all"], state=True).double()
    _check(net, _inputs(net, gen), mode, gen)
    assert calls, f"the {path} recurrence was not taken"


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("frozen", [None, "weight_hh_l0", "bias_ih_l1"])
@pytest.mark.parametrize("path", ["compiled", "native"])
def test_auto_materialises_layers_with_their_norms_in_one_pass(
    kind, frozen, path, gen, monkeypatch
):
    """``auto`` on CPU materialises the layers by linear_uses_grads (csrc/cpu/linear_uses.cpp):
    the uses sharing a gate gradient (LSTM and RNN cells on the compiled recurrence: W_ih, W_hh
    and both biases) in one call, its norms the clip's; frozen weights and biases left out."""
    if kind == "gru" and path == "native":
        pytest.skip("a GRU's gates are not gi + gh: torch's fused kernel cannot give dgh")
    _force_path(path, monkeypatch)
    normed = watch_normed_materialising(monkeypatch)
    net = Net(_rnn(kind, batch_first=True, num_layers=2), read=READS["all"]).double()
    if frozen:
        net.rnn.get_parameter(frozen).requires_grad_(False)
    _check(net, _inputs(net, gen), "auto", gen)
    assert normed and all(normed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("path", ["compiled", "steps"])
def test_initial_state_packed_sequences_and_what_is_read(
    kind, read, packed, path, mode, gen, monkeypatch
):
    """Packed sequences (padded steps carry the state) on the compiled recurrence and step by
    step."""
    _force_path(path, monkeypatch)
    rnn = _rnn(kind, batch_first=True, num_layers=2, bidirectional=True)
    net = Net(rnn, read=READS[read], packed=packed, state=True).double()
    _check(net, _inputs(net, gen), mode, gen)


@pytest.mark.parametrize("mode", MODES)
def test_lstm_with_projections(mode, gen):
    rnn = nn.LSTM(D, H, proj_size=2, num_layers=2, bidirectional=True, batch_first=True)
    net = Net(rnn, read=READS["all"], state=True).double()
    net.head = nn.Linear(4, 2).double()
    _check(net, _inputs(net, gen), mode, gen)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [1, B - 1])
@pytest.mark.parametrize("path", ["compiled", "steps"])
def test_padding_rows_contribute_nothing(mode, padding, path, gen, monkeypatch):
    _force_path(path, monkeypatch)
    net = Net(nn.LSTM(D, H, num_layers=2, batch_first=True), read=READS["all"], state=True)
    net = net.double()
    _check(net, _inputs(net, gen), mode, gen, padding=padding)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_the_forward_equals_torch(kind, packed, first, gen):
    rnn = _rnn(kind, batch_first=first, num_layers=2, bidirectional=True)
    net = Net(rnn, read=READS["all"], packed=packed, state=True).double()
    args = _inputs(net, gen)
    expected = net(*args)
    att = dpf.attach(net)
    try:
        got = net(*args)
    finally:
        att.detach()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_layers_get_the_recurrent_rule_not_the_fallback(kind):
    net = Net(_rnn(kind, num_layers=2)).double()
    rows = dpf.explain(net, _inputs(net, torch.Generator().manual_seed(0))).rows
    rules = {r["parameter"].split(".")[0]: r["rule"] for r in rows}
    assert rules["rnn"] == "RecurrentRule"
    assert all(r["rule"] != type(FALLBACK).__name__ for r in rows)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_between_layers_is_clipped_with_the_masks_of_the_forward(mode, gen, monkeypatch):
    """Dropout draws its masks once, in the batched forward; the per-example gradients are
    those of that very forward. Checked with a deterministic dropout (a fixed mask per step
    and feature, the same for every example) against a per-example loop through the rule's
    own recurrence on real parameters."""
    mask = (torch.rand(T, 2 * H, generator=gen) > 0.4).double() / 0.6

    def fixed_dropout(x, p, training=True):
        return x * mask[: x.shape[1]]

    monkeypatch.setattr(recurrent_rule.F, "dropout", fixed_dropout)
    rnn = nn.LSTM(D, H, num_layers=3, dropout=0.4, bidirectional=True, batch_first=True)
    net = Net(rnn, read=READS["all"]).double()
    args = _inputs(net, gen)

    class Reference(nn.Module):  # the same computation, unattached: the rule's recurrence
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args):
            rule = recurrent_rule.RecurrentRule()
            saved = self.net.rnn.forward

            def plain(inp, hx=None):
                # step by step: the compiled recurrence gives no weight gradients (only probes')
                with monkeypatch.context() as patch:
                    patch.setattr(recurrent_rule.fused, "available", lambda *a: False)
                    return rule.forward(self.net.rnn, lambda ins, call: call(*ins)[0], inp, hx)

            self.net.rnn.forward = plain
            try:
                return self.net(*args)
            finally:
                self.net.rnn.forward = saved

    reference = Reference(copy.deepcopy(net))
    for max_norm in (0.05, 1e6):
        expected, expected_sq = _reference(reference, args, max_norm, B)
        got, norm_sq = _attached(net, args, mode, max_norm)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm_sq.double(), expected_sq, rtol=1e-9, atol=1e-12)


class CellLoop(nn.Module):
    """A cell run over the steps by a Python loop, then a head on the last state."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.head = cell, nn.Linear(H, 2)

    def forward(self, x, lengths, h0, c0):
        lstm = isinstance(self.cell, nn.LSTMCell)
        state = (h0[:, 0], c0[:, 0]) if lstm else h0[:, 0]
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if lstm else state
        return self.head(h).sin().sum(dim=1) + (state[1].square().sum(dim=1) if lstm else 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_called_in_a_loop_match_brute_force(cell, mode, gen):
    net = CellLoop(cell(D, H)).double()
    args = _inputs(Net(nn.LSTM(D, H) if cell is nn.LSTMCell else nn.GRU(D, H)), gen)
    _check(net, args, mode, gen)


def test_cell_calls_are_joined_into_one_fast_path_record(gen, monkeypatch):
    """The T calls of a cell are clipped as one record (no materialised per-example
    gradients): the rule's per_example_grads is never called in auto_fast."""
    net = CellLoop(nn.LSTMCell(D, H)).double()
    args = _inputs(Net(nn.LSTM(D, H)), gen)
    rule = type(dpf.rules.rule_for(net.cell))

    def refuse(*a, **k):
        raise AssertionError("materialised")

    monkeypatch.setattr(rule, "per_example_grads", refuse)
    net.head.weight.requires_grad_(False)
    net.head.bias.requires_grad_(False)
    att = dpf.attach(net, clipping="auto", materialise_bytes=0)
    try:
        net(*args).sum().backward()
        att.clip_and_accumulate(1.0)
        assert net.cell.weight_hh.summed_grad is not None
    finally:
        att.detach()


def test_unbatched_inputs_are_refused_with_the_reason():
    rnn = nn.LSTM(D, H)
    att = dpf.attach(rnn, probe_coupling=False)
    try:
        with pytest.raises(ValueError, match="batched"):
            rnn(torch.randn(T, D))
    finally:
        att.detach()


def test_sequence_first_model_passes_the_independence_probe_when_the_batch_is_known(gen):
    """Sequence-first (T, B, D) inputs: with the physical batch size known (make_private's
    loaders call begin_batch), the probe perturbs dim 1 and accepts h_n's (layers, B, H)."""
    rnn = nn.GRU(D, H, num_layers=2, bidirectional=True).double()  # layers * dirs = 4
    att = dpf.attach(rnn, loss_reduction="sum")
    try:
        att.begin_batch(torch.ones(4, dtype=torch.bool))
        out, h_n = rnn(torch.randn(T, 4, D, generator=gen, dtype=torch.float64))
        (out.sum() + h_n.sum()).backward()
        att.clip_and_accumulate(1.0)
    finally:
        att.detach()


def test_coupling_through_the_recurrence_is_still_detected(gen):
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(D, H, batch_first=True)

        def forward(self, x):
            return self.rnn(x - x.mean(0))[0].sum(dim=(1, 2))

    net = Mixing().double()
    att = dpf.attach(net)
    try:
        with pytest.raises(RuntimeError, match="couples the examples"):
            net(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    finally:
        att.detach()


def test_loss_through_h_n_only_trains_the_layer_and_everything_before_it(gen):
    """The old fallback left an LSTM (and what fed it) with noise only when h_n was read."""
    embed = nn.Embedding(7, D)
    rnn = nn.LSTM(D, H, batch_first=True)
    net = nn.ModuleDict(dict(embed=embed, rnn=rnn)).double()
    att = dpf.attach(net)
    try:
        ids = torch.randint(0, 7, (B, T), generator=gen)
        _, (h_n, _) = rnn(embed(ids))
        F.mse_loss(h_n[0], torch.ones(B, H, dtype=torch.float64)).backward()
        att.clip_and_accumulate(1.0)
        for p in net.parameters():
            assert p.summed_grad is not None and p.summed_grad.abs().sum() > 0
    finally:
        att.detach()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["DPLSTM", "DPGRU", "DPRNN"])
@pytest.mark.parametrize("packed", [False, True])
def test_opacus_dp_layers_take_the_recurrent_rule(kind, packed, mode, gen):
    layers = pytest.importorskip("opacus.layers")
    rnn = getattr(layers, kind)(D, H, num_layers=2, bidirectional=True, batch_first=True)
    net = Net(rnn, read=READS["all"], packed=packed, state=True).double()
    rules = {r["layer"]: r["rule"] for r in dpf.explain(net, _inputs(net, gen)).rows}
    assert rules["rnn"] == "OpacusRecurrentRule" and "rnn.l0.ih" not in rules
    # Reference: torch's layer with the same weights (Opacus's own packed path rounds h_n
    # through float32, ~1e-8 off in float64).
    twin = {"DPLSTM": nn.LSTM, "DPGRU": nn.GRU, "DPRNN": nn.RNN}[kind]
    reference = copy.deepcopy(net)
    reference.rnn = twin(D, H, num_layers=2, bidirectional=True, batch_first=True).double()
    reference.rnn.load_state_dict(rnn.state_dict())
    _check(net, _inputs(net, gen), mode, gen, reference=reference)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("frozen", [None, "weight_hh_l0", "bias_hh_l1", "weight_ih_l1"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_weights_sharing_a_gate_gradient_are_one_map_on_the_fast_path(
    kind, frozen, mode, gen, monkeypatch
):
    """On the compiled recurrence, W_ih and W_hh of an LSTM / RNN layer share the gate
    gradient: their norm is one ghost norm and their clipped sum one GEMM of the joined input
    [x_t, h_t-1], which the forward stored side by side (no copy); with ``bk`` the norm and its
    certification bound come from one compiled pass (uses_ghost.cpp); exact against brute
    force, frozen weights and biases left out."""
    from torch_dpfast import ops
    from torch_dpfast.rules import _linear_uses

    _force_path("compiled", monkeypatch)
    net = Net(_rnn(kind, batch_first=True, num_layers=2), read=READS["all"]).double()
    seen = []
    for owner, name in ((ops, "linear_norm_sq"), (_linear_uses, "joined_clipped_sums")):
        original = getattr(owner, name)

        def watched(a, g, *args, _original=original, _name=name, **kwargs):
            if g.shape[-1] != net.head.out_features:  # the layer's uses, not the head's
                seen.append((_name, a.shape[-1], a._is_view()))
            return _original(a, g, *args, **kwargs)

        monkeypatch.setattr(owner, name, watched)
    compiled = watch_ghost_kernel(monkeypatch)
    if frozen:
        net.rnn.get_parameter(frozen).requires_grad_(False)
    _check(net, _inputs(net, gen), mode, gen)
    assert (compiled and all(compiled)) if mode == "bk" else not compiled
    joined = {D + H, H + H}  # layer 0: [x, h], layer 1: [h of layer 0, h]
    expected = {"weight_hh_l0": {D, H + H}, "weight_ih_l1": {D + H, H}}.get(frozen, joined)
    assert {w for _, w, _ in seen} == expected
    # the joined inputs are views of the saved (B, T, D + H) tensor, not copies
    assert all(view for _, w, view in seen if w in joined)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("frozen", [None, "weight_ih_l0", "bias_ih_l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_ghost_norm_and_bound_equal_the_rules_own(kind, frozen, dtype, gen):
    """norm_sq_and_bound (one kernel pass) gives what norm_sq and norm_bound compute
    separately: the norm certify.py trusts is checked against the same bound (a smaller bound
    would let a cancelling example's rounding through)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    rnn = _rnn(kind, batch_first=True, num_layers=2).to(dtype)
    if frozen:
        rnn.get_parameter(frozen).requires_grad_(False)
    attachment = dpf.attach(rnn, clipping="bk", loss_reduction="sum")
    try:
        x = torch.randn(B, 3, D, generator=gen, dtype=torch.float64).to(dtype)
        rnn(x)[0].square().sum().backward()
        (record,) = attachment._records
        found = record.rule.norm_sq_and_bound(record.module, record.x, record.g, "ghost")
        assert found is not None
        norm_sq, bound = found
        expected_sq = record.rule.norm_sq(record.module, record.x, record.g, "ghost")
        expected_bound = record.rule.norm_bound(record.module, record.x, record.g)
        assert norm_sq.dtype == dtype and bound.dtype == torch.float64
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(norm_sq, expected_sq, rtol=rtol, atol=0.0)
        torch.testing.assert_close(bound, expected_bound, rtol=rtol, atol=0.0)
    finally:
        attachment.detach()

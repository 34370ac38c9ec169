"""The parameter-use tracer (torch_dpfast/tracing.py), one use at a time: modules without a rule
whose parameters enter the computation in every way the tracer knows, each checked against
float64 per-example autograd (one example per forward) in every clipping mode, with and
without a padding row; and the ways it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dpfast as dpf
from tests.helpers import clipped_reference
from torch_dpfast import tracing
from torch_dpfast.ghost import ghost_backward

MODES = ["auto", "bk", "per_example", "ghost"]
B, C = 4, 0.7


class Tokens(nn.Module):
    """A class token concatenated after expand, a position table added, a layer scale."""

    def __init__(self, d=6):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 4, d))
        self.gamma = nn.Parameter(torch.randn(d))
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return x + self.gamma * self.fc(x)


class GatheredBias(nn.Module):
    """A relative-position table gathered by a fixed index into a bias added to scores that
    hold k = 2 windows per example (folded into dim 0)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.randint(0, 7, (9,)))

    def forward(self, x):  # x (B, 2, 3, 3)
        bias = self.table[self.index].view(3, 3, 2).permute(2, 0, 1)  # (2, 3, 3)
        scores = x.repeat_interleave(2, dim=0)  # (2 B, 2, 3, 3), example-major
        return (scores + bias.unsqueeze(0)).reshape(x.shape[0], -1)


class RawWeights(nn.Module):
    """F.linear on a raw weight (the linear rule), the same weight used twice, a derived weight
    (vmap), a functional norm with a derived weight and a conv on a raw kernel (vmap)."""

    def __init__(self, d=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / 3)
        self.bias = nn.Parameter(torch.randn(d))
        self.mask = nn.Parameter(torch.randn(d, d))
        self.norm = nn.Parameter(torch.randn(d))
        self.kernel = nn.Parameter(torch.randn(1, 1, 3))

    def forward(self, x):  # x (B, T, d)
        h = F.linear(x, self.weight, self.bias)
        h = F.linear(h.tanh(), self.weight)  # a second use of the weight
        h = F.linear(h, self.weight * self.mask.sigmoid())  # derived
        h = F.layer_norm(h, h.shape[-1:], self.norm.exp())
        return F.conv1d(h.reshape(-1, 1, h.shape[-1]), self.kernel).reshape(x.shape[0], -1)


class ConstantMLP(nn.Module):
    """A bias computed by a child layer from a buffer (Swin v2's continuous position bias):
    the child runs on constants, as part of a derivation."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
        self.register_buffer("coords", torch.randn(5, 2))

    def forward(self, x):  # x (B, 5, 3)
        return x * self.scale + self.mlp(self.coords)


class Nested(nn.Module):
    """A traced module inside another: one trace; its outer parameter is used twice."""

    def __init__(self):
        super().__init__()
        self.outer = nn.Parameter(torch.randn(6))
        self.inner = Tokens()

    def forward(self, x):
        return self.inner(x * self.outer) * self.outer


class LearnedPositions(nn.Embedding):
    """An nn.Embedding subclass with its own forward (OPT's learned positions): positions
    counted from a mask, looked up with F.embedding on the table; padding_idx=-1."""

    def __init__(self):
        super().__init__(9, 6, padding_idx=-1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):  # x (B, T, 6); the positions from where x is non-zero
        positions = (x[..., 0] != 0).long().cumsum(dim=1)
        return self.fc(x + F.embedding(positions, self.weight, self.padding_idx))


def _inputs(name, gen):
    if name == "gathered_bias":
        return torch.randn(B, 2, 3, 3, generator=gen, dtype=torch.float64)
    if name == "constant_mlp":
        return torch.randn(B, 5, 3, generator=gen, dtype=torch.float64)
    if name == "raw_weights":
        return torch.randn(B, 3, 5, generator=gen, dtype=torch.float64)
    return torch.randn(B, 3, 6, generator=gen, dtype=torch.float64)


MODELS = {
    "tokens": Tokens,
    "gathered_bias": GatheredBias,
    "raw_weights": RawWeights,
    "constant_mlp": ConstantMLP,
    "nested": Nested,
    "learned_positions": LearnedPositions,
}


def _losses(model, x):
    return model(x).sin().flatten(1).sum(dim=1)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_traced_uses_match_per_example_autograd(name, mode, padding, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = MODELS[name]().double()
    x = _inputs(name, gen)
    kept = B - padding
    reference = copy.deepcopy(model)
    rows = []
    for i in range(kept):
        reference.zero_grad()
        _losses(reference, x[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in _params(reference)]))
    expected, expected_sq = clipped_reference(torch.stack(rows), C)
    att = dpf.attach(model, clipping=mode, loss_reduction="sum")
    try:
        att.begin_batch(torch.arange(B) < kept if padding else None)
        if mode == "ghost":
            norm_sq = ghost_backward(att, _losses(model, x), C)
        else:
            _losses(model, x).sum().backward()
            norm_sq = att.clip_and_accumulate(C)
    finally:
        att.detach()
    got = torch.cat([p.summed_grad.flatten() for p in _params(model)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(norm_sq[:kept], expected_sq, rtol=1e-9, atol=1e-12)


def test_a_raw_weight_in_f_linear_or_f_embedding_takes_the_layer_rule():
    model = RawWeights().double()
    att = dpf.attach(model, loss_reduction="sum")
    _losses(model, torch.randn(B, 3, 5, dtype=torch.float64)).sum().backward()
    rules = {type(r.rule).__name__: r for r in att._records}
    att.detach()
    assert "LinearRule" in rules and type(rules["LinearRule"].module).__name__ == "FunctionalLinear"
    model = LearnedPositions().double()
    att = dpf.attach(model, loss_reduction="sum")
    _losses(model, torch.randn(B, 3, 6, dtype=torch.float64)).sum().backward()
    modules = {type(r.module).__name__ for r in att._records}
    att.detach()
    assert "FunctionalEmbedding" in modules


def test_explain_names_each_use_and_the_vmap_fallback():
    rows = {
        r["parameter"]: r["method"] for r in dpf.explain(RawWeights(), torch.randn(2, 3, 5)).rows
    }
    assert rows["weight"] == "F.linear (linear rule), fallback: vmap (linear)"
    assert rows["mask"] == "fallback: vmap (linear)"
    assert rows["kernel"] == "fallback: vmap (conv1d)"
    rows = {r["parameter"]: r["method"] for r in dpf.explain(Tokens(), torch.randn(2, 3, 6)).rows}
    assert rows["cls"] == "per-example copies (expand)"
    assert rows["pos"] == "per-example copies (add)"
    assert rows["gamma"] == "per-example copies (mul)"


class _Box:
    def __init__(self, tensor):
        self.tensor = tensor


class _Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return _Box(self.table * 2)  # an object the tracer cannot look into


class _Reader(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = _Hidden()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x + self.hidden(x).tensor)


def test_a_derived_tensor_that_escapes_the_trace_is_refused():
    model = _Reader()
    att = dpf.attach(model)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"computed from \['hidden.table'\] left its traced"):
        att.clip_and_accumulate(1.0)
    att.detach()


class _RandomUse(nn.Module):
    """Samples with a parameter as the spread: vmap refuses random ops per example."""

    def __init__(self):
        super().__init__()
        self.spread = nn.Parameter(torch.ones(3, 4))

    def forward(self, x):
        return torch.normal(x, self.spread.exp())


def test_a_use_vmap_cannot_run_per_example_is_refused_with_the_fix():
    model = _RandomUse()
    att = dpf.attach(model, probe_coupling=False)
    with pytest.raises(NotImplementedError, match="Register a rule for the module"):
        model(torch.randn(3, 4))
    att.detach()


class _Misaligned(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(3))

    def forward(self, x):  # (B, T, d) -> (T, B, d): the batch leaves dim 0
        return (x.transpose(0, 1) * self.gamma).transpose(0, 1)


def test_a_parameter_meeting_the_batch_outside_dim_0_is_refused():
    model = _Misaligned()
    att = dpf.attach(model, probe_coupling=False)
    with pytest.raises(NotImplementedError, match="not a multiple of the batch"):
        model(torch.randn(4, 5, 3))  # T = 5: no multiple of B = 4
    att.detach()
    att = dpf.attach(model)  # T = 8, a multiple of B: the probe sees rows of several examples
    with pytest.raises(RuntimeError, match="couples the examples"):
        model(torch.randn(4, 8, 3))
    att.detach()


def test_a_constant_with_as_many_rows_as_the_batch_stays_a_constant(gen):
    """The buffer fed to the child layers has exactly B rows: they are still constants (a
    derivation), not examples."""
    model = ConstantMLP().double()
    x = torch.randn(5, 5, 3, generator=gen, dtype=torch.float64)  # B = 5 = the buffer's rows
    reference = copy.deepcopy(model)
    rows = []
    for i in range(5):
        reference.zero_grad()
        _losses(reference, x[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in _params(reference)]))
    expected, _ = clipped_reference(torch.stack(rows), C)
    att = dpf.attach(model, loss_reduction="sum")
    _losses(model, x).sum().backward()
    att.clip_and_accumulate(C)
    att.detach()
    got = torch.cat([p.summed_grad.flatten() for p in _params(model)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_captured_layer_inside_a_traced_module_runs_without_the_tracer(monkeypatch):
    """The tracer's mode is off inside the captured layers of the module it traces (their calls
    would only pass through it): it sees the module's own calls, here the layer scale's use, and
    none of the linear layer's."""
    seen = []
    call = tracing.UseTracer.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return call(self, func, types, args, kwargs)

    monkeypatch.setattr(tracing.UseTracer, "__torch_function__", spy)
    model = nn.Sequential(Tokens(), nn.Flatten(), nn.Linear(24, 3))
    dpf.attach(model, probe_coupling=False)
    seen.clear()
    model(torch.randn(B, 3, 6)).sum().backward()
    assert "mul" in seen or "__mul__" in seen  # the layer scale, traced
    assert "linear" not in seen  # Tokens.fc's own call, captured with the tracer off

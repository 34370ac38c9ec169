"""The compiled group-norm affine gradients (csrc/cpu/group_norm.cpp) against per-example
autograd through F.group_norm (and a ReLU), float64 and float32, odd shapes, a mean far larger
than the spread, no weight or bias; and the rules' PyTorch path with the kernel switched off."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_dpfast import _ext
from torch_dpfast.rules import group_norm as group_norm_rule

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("group_norm_affine_grads", "CPU"), reason="torch_dpfast._C is not built"
)


def _autograd(x, g, groups, eps, weight, bias, relu):
    """(B, C) per-example weight and bias gradients by autograd, one example at a time."""
    rows_w, rows_b = [], []
    for i in range(x.shape[0]):
        w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else weight.clone()
        b = torch.zeros(x.shape[1], dtype=x.dtype) if bias is None else bias.clone()
        w.requires_grad_(), b.requires_grad_()
        y = F.group_norm(x[i : i + 1], groups, w, b, eps)
        out = torch.relu(y) if relu else y
        dw, db = torch.autograd.grad(out, (w, b), g[i : i + 1])
        rows_w.append(dw)
        rows_b.append(db)
    return torch.stack(rows_w), torch.stack(rows_b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    "shape, groups",
    [((3, 6, 5, 7), 3), ((2, 4, 9), 4), ((4, 6), 2), ((2, 8, 3, 2, 3), 1), ((5, 12, 17, 13), 4)],
)
@pytest.mark.parametrize("affine", ["both", "none", "weight"])
def test_matches_per_example_autograd(shape, groups, relu, dtype, affine, gen):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    weight = torch.randn(c, generator=gen, dtype=torch.float64) if affine != "none" else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if affine == "both" else None
    expected = _autograd(x, g, groups, 1e-5, weight, bias, relu)
    cast = [None if t is None else t.to(dtype) for t in (x, g, weight, bias)]
    got = torch.ops.dpfast_C.group_norm_affine_grads(
        cast[0], cast[1], groups, 1e-5, cast[2], cast[3], relu
    )
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)


def test_a_mean_far_above_the_spread_is_exact(gen):
    """Inputs 1e6 + N(0, 1): a one-pass E[x^2] - E[x]^2 variance would lose every digit."""
    x = 1e6 + torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    expected = _autograd(x, g, 2, 1e-5, weight, bias, relu=True)
    got = torch.ops.dpfast_C.group_norm_affine_grads(x, g, 2, 1e-5, weight, bias, True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_bad_groups_are_refused_with_the_counts():
    with pytest.raises(RuntimeError, match="6 channels do not split into 4 groups"):
        torch.ops.dpfast_C.group_norm_affine_grads(
            torch.zeros(2, 6, 3), torch.zeros(2, 6, 3), 4, 1e-5, None, None, False
        )


@pytest.mark.parametrize("relu", [False, True])
def test_the_rules_give_the_same_with_the_kernel_off(relu, gen, monkeypatch):
    """GroupNorm and timm's GroupNormAct: the compiled and the PyTorch path agree."""
    timm_layers = pytest.importorskip("timm.layers")
    from torch_dpfast.rules import timm_layers as timm_rules

    module = (
        timm_layers.GroupNormAct(6, num_groups=3)
        if relu
        else nn.GroupNorm(3, 6)
    ).double()  # fmt: skip
    with torch.no_grad():
        module.weight.normal_(generator=gen)
        module.bias.normal_(generator=gen)
    x = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    rule = timm_rules.GroupNormActRule() if relu else group_norm_rule.GroupNormRule()
    compiled = rule.per_example_grads(module, x, g)
    assert not any(t.requires_grad for t in compiled.values())  # norms built on them neither
    monkeypatch.setattr(group_norm_rule, "compiled_grads_apply", lambda *a: False)
    monkeypatch.setattr(timm_rules, "compiled_grads_apply", lambda *a: False)
    reference = rule.per_example_grads(module, x, g)
    assert compiled.keys() == reference.keys() == {"weight", "bias"}
    for name in compiled:
        torch.testing.assert_close(compiled[name], reference[name], rtol=1e-10, atol=1e-12)

"""Every layer rule against brute-force per-example autograd in float64: materialised gradients,
norms (every method) and clipped sums (zero scales with non-finite examples included)."""

import pytest
import torch
from torch import nn

from torch_dpfast.rules import rule_for

timm_layers = pytest.importorskip("timm.layers")
hf_utils = pytest.importorskip("transformers.pytorch_utils")


def _brute_force(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: autograd of <module(x_i), g_i> one example at a time."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    grads = {n: [] for n in params}
    for i in range(x.shape[0]):
        module.zero_grad()
        (module(x[i : i + 1]) * g[i : i + 1]).sum().backward()
        for n, p in params.items():
            grads[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in grads.items()}


def _output_grad(module, x, gen):
    with torch.no_grad():
        out = module(x)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


# (name, module factory, input factory(gen)) -- modules in float64, inputs (B, ...)
def _floats(*shape):
    return lambda gen: torch.randn(*shape, generator=gen, dtype=torch.float64)


def _ids(vocab, *shape):
    return lambda gen: torch.randint(0, vocab, shape, generator=gen)


CASES = [
    ("linear-2d", lambda: nn.Linear(7, 5), _floats(4, 7)),
    ("linear-seq", lambda: nn.Linear(6, 9), _floats(3, 11, 6)),
    ("linear-no-bias-4d", lambda: nn.Linear(4, 3, bias=False), _floats(2, 3, 5, 4)),
    (
        "conv1d-reflect",
        lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"),
        _floats(3, 3, 9),
    ),
    (
        "conv2d-strided",
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        _floats(2, 4, 9, 8),
    ),
    (
        "conv2d-same-circular",
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="circular"),
        _floats(2, 2, 6, 5),
    ),
    (
        "conv2d-depthwise",
        lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False),
        _floats(3, 3, 5, 5),
    ),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 1)), _floats(2, 2, 4, 5, 3)),
    # >= 512 output positions: on CPU, one weight-gradient convolution per example
    ("conv2d-high-res", lambda: nn.Conv2d(2, 3, 3, padding=1), _floats(2, 2, 23, 25)),
    (
        "conv1d-high-res-dilated",
        lambda: nn.Conv1d(2, 3, 5, stride=2, padding=4, dilation=2, bias=False),
        _floats(3, 2, 1100),
    ),
    (
        "conv2d-high-res-same-reflect",
        lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
        _floats(2, 2, 24, 23),
    ),
    ("conv3d-high-res", lambda: nn.Conv3d(1, 2, 3, padding=1), _floats(2, 1, 8, 9, 8)),
    ("hf-conv1d", lambda: hf_utils.Conv1D(5, 7), _floats(3, 4, 7)),
    ("hf-conv1d-2d", lambda: hf_utils.Conv1D(3, 6), _floats(4, 6)),
    ("embedding", lambda: nn.Embedding(6, 4), _ids(6, 3, 9)),
    ("embedding-padding", lambda: nn.Embedding(5, 3, padding_idx=1), _ids(5, 4, 7)),
    ("layernorm", lambda: nn.LayerNorm(6), _floats(3, 5, 6)),
    ("layernorm-2d-shape", lambda: nn.LayerNorm((4, 3)), _floats(2, 4, 3)),
    ("layernorm-no-bias", lambda: nn.LayerNorm(5, bias=False), _floats(3, 5)),
    ("rmsnorm", lambda: nn.RMSNorm(6), _floats(3, 4, 6)),
    ("rmsnorm-eps", lambda: nn.RMSNorm((2, 3), eps=1e-3), _floats(2, 5, 2, 3)),
    ("groupnorm", lambda: nn.GroupNorm(2, 6), _floats(3, 6, 4, 3)),
    ("groupnorm-flat", lambda: nn.GroupNorm(3, 6), _floats(4, 6)),
    ("instancenorm", lambda: nn.InstanceNorm2d(3, affine=True), _floats(2, 3, 4, 5)),
    (
        "instancenorm-eval",
        lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True).eval(),
        _floats(2, 3, 7),
    ),
    ("timm-layernorm", lambda: timm_layers.LayerNorm(5), _floats(2, 3, 5)),
    ("timm-layernorm2d", lambda: timm_layers.LayerNorm2d(4), _floats(2, 4, 3, 5)),
    ("timm-groupnorm1", lambda: timm_layers.GroupNorm1(4), _floats(3, 4, 2, 3)),
    (
        "timm-groupnormact",
        lambda: timm_layers.GroupNormAct(6, num_groups=3, act_layer=nn.SiLU),
        _floats(3, 6, 4, 4),
    ),
    (
        "timm-groupnormact-inplace-relu",
        lambda: timm_layers.GroupNormAct(4, num_groups=2),
        _floats(2, 4, 3, 3),
    ),
    ("timm-stdconv", lambda: timm_layers.StdConv2d(3, 4, 3), _floats(2, 3, 6, 5)),
    (
        "timm-stdconv-high-res",
        lambda: timm_layers.StdConv2d(2, 3, 3, padding=1),
        _floats(2, 2, 24, 24),
    ),
    (
        "timm-stdconv-bias-groups",
        lambda: timm_layers.StdConv2d(4, 6, 3, stride=2, groups=2, bias=True),
        _floats(3, 4, 7, 6),
    ),
    (
        "timm-stdconv-same",
        lambda: timm_layers.StdConv2dSame(2, 3, 4, stride=2),
        _floats(2, 2, 7, 9),
    ),
    (
        "timm-scaled-stdconv",
        lambda: timm_layers.ScaledStdConv2d(3, 5, 3, padding=1),
        _floats(2, 3, 5, 5),
    ),
]


def _module(factory):
    module = factory().double()
    with torch.no_grad():  # non-trivial affine parameters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    if isinstance(module, nn.InstanceNorm1d) and module.track_running_stats:
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("name,factory,make_input", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_per_example_autograd(name, factory, make_input, gen):
    module = _module(factory)
    x = make_input(gen)
    g = _output_grad(module, x, gen)
    rule = rule_for(module)
    assert rule is not None, name
    expected = _brute_force(module, x, g)
    got = rule.per_example_grads(module, x, g)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-10)

    norms = sum(v.flatten(1).square().sum(dim=1) for v in expected.values())
    for method in ("ghost", "direct", "auto"):
        torch.testing.assert_close(rule.norm_sq(module, x, g, method), norms, rtol=1e-9, atol=1e-10)

    scale = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
    scale[0] = 0.0
    if x.is_floating_point():
        x = x.clone()
        x[0] = float("nan")  # example 0 has scale 0: its NaNs must not reach the sums
    else:
        g = g.clone()
        g[0] = float("nan")
    sums = rule.clipped_sums(module, x, g, scale)
    assert sums.keys() == expected.keys()
    for n, per_example in expected.items():
        want = torch.einsum("b,b...->...", scale[1:], per_example[1:])
        assert sums[n].shape == getattr(module, n).shape
        torch.testing.assert_close(sums[n], want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "conv,x,by_example",
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 23, 25), True),  # 575 output positions
        (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 22, 23), False),  # 506
        (nn.Conv2d(2, 3, 1), (2, 2, 30, 30), False),  # 1x1: the GEMM needs no unfolding
        (nn.Conv2d(2, 4, 3, padding=1, groups=2), (2, 2, 30, 30), False),
        (nn.Conv2d(2, 3, 2, padding="same"), (2, 2, 30, 30), False),  # (0, 1) padding
    ],
)
def test_conv_per_example_gradients_by_example_only_at_high_resolution(
    conv, x, by_example, gen, monkeypatch
):
    from torch_dpfast.rules import conv as conv_rule

    calls = []
    original = conv_rule._weight_grads_by_example
    monkeypatch.setattr(
        conv_rule, "_weight_grads_by_example", lambda *a: calls.append(1) or original(*a)
    )
    module = conv.double()
    inputs = torch.randn(*x, generator=gen, dtype=torch.float64)
    g = _output_grad(module, inputs, gen)
    got = rule_for(module).per_example_grads(module, inputs, g)["weight"]
    torch.testing.assert_close(got, _brute_force(module, inputs, g)["weight"])
    assert bool(calls) == by_example


def test_frozen_parameters_are_skipped(gen):
    module = nn.Linear(4, 3).double()
    module.bias.requires_grad_(False)
    x, g = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    rule = rule_for(module)
    assert set(rule.per_example_grads(module, x, g)) == {"weight"}
    assert set(rule.clipped_sums(module, x, g, torch.ones(2))) == {"weight"}
    assert set(rule.parameters(module)) == {"weight"}


def test_subclass_overriding_forward_gets_no_inherited_rule():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Renamed(nn.Linear):
        pass

    assert rule_for(Scaled(2, 2)) is None
    assert rule_for(Renamed(2, 2)) is rule_for(nn.Linear(2, 2))


def test_registration_is_once_unless_forced():
    from torch_dpfast.rules import Rule, register_rule

    with pytest.raises(RuntimeError, match="Linear already has the rule LinearRule"):

        @register_rule(nn.Linear)
        class Other(Rule):
            pass


def test_rules_refuse_what_they_cannot_do_exactly(gen):
    emb = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        rule_for(emb).norm_sq(emb, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 3))
    gna = timm_layers.GroupNormAct(4, num_groups=2, drop_layer=nn.Dropout).train()
    with pytest.raises(ValueError, match="dropout between its norm and activation"):
        rule_for(gna).per_example_grads(gna, torch.randn(2, 4, 3), torch.randn(2, 4, 3))

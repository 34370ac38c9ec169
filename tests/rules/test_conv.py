"""rules/conv.py: nn.Conv1d/2d/3d, every padding mode, strides, dilation, groups (depthwise
included), and the CPU paths for high resolution (one weight-gradient convolution per example)."""

import pytest
import torch
from torch import nn

from tests.rules.harness import brute_force, check_rule, float64_module, floats, output_grad
from torch_dpfast.rules import rule_for

CASES = {
    "conv1d-reflect": (
        lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"),
        floats(3, 3, 9),
    ),
    "conv2d-strided-groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        floats(2, 4, 9, 8),
    ),
    "conv2d-same-circular": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="circular"),
        floats(2, 2, 6, 5),
    ),
    "conv2d-depthwise": (
        lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False),
        floats(3, 3, 5, 5),
    ),
    # >= 512 output positions: channels-last grouped weight gradient on CPU
    "conv2d-depthwise-high-res-same": (
        lambda: nn.Conv2d(3, 3, 4, padding="same", groups=3),
        floats(2, 3, 23, 25),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 1)), floats(2, 2, 4, 5, 3)),
    # >= 512 output positions: on CPU, one weight-gradient convolution per example
    "conv2d-high-res": (lambda: nn.Conv2d(2, 3, 3, padding=1), floats(2, 2, 23, 25)),
    "conv1d-high-res-dilated": (
        lambda: nn.Conv1d(2, 3, 5, stride=2, padding=4, dilation=2, bias=False),
        floats(3, 2, 1100),
    ),
    "conv2d-high-res-same-reflect": (
        lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
        floats(2, 2, 24, 23),
    ),
    "conv3d-high-res": (lambda: nn.Conv3d(1, 2, 3, padding=1), floats(2, 1, 8, 9, 8)),
}


@pytest.mark.parametrize("case", CASES)
def test_conv_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)


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
    g = output_grad(module, inputs, gen)
    got = rule_for(module).per_example_grads(module, inputs, g)["weight"]
    torch.testing.assert_close(got, brute_force(module, inputs, g)["weight"])
    assert bool(calls) == by_example

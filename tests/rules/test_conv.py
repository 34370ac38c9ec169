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
    "conv,x,path",
    [
        (nn.Conv2d(6, 3, 3, padding=1), (2, 6, 5, 6), "folded"),  # narrow: batch into groups
        (nn.Conv2d(3, 4, 7, stride=2, padding=3), (2, 3, 11, 10), "by_example"),  # a stem
        (nn.Conv2d(200, 3, 3, padding=1), (2, 200, 5, 4), "by_example"),
        (nn.Conv2d(200, 3, 2, padding="same"), (2, 200, 5, 4), "gemm"),  # (0, 1) padding
        (nn.Conv2d(2, 3, 1), (2, 2, 7, 5), "gemm"),  # 1x1: a transposed view, no unfolding
        (nn.Conv2d(2, 3, 1, stride=2), (2, 2, 7, 5), "gemm"),
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 5, 5), "folded"),
        (nn.Conv2d(3, 3, 5, padding=2, groups=3), (2, 3, 6, 7), "correlated"),  # depthwise
        (
            nn.Conv2d(2, 4, (5, 2), stride=(2, 3), dilation=(2, 1), groups=2),
            (2, 2, 13, 8),
            "correlated",
        ),
        (nn.Conv2d(2, 2, 3, stride=2, padding=1, groups=2), (2, 2, 7, 6), "folded"),
        (nn.Conv3d(2, 2, 2, padding=1, groups=2), (2, 2, 5, 4, 5), "correlated"),
        (nn.Conv1d(300, 5, 3, padding=2, dilation=2), (2, 300, 9), "by_example"),
        # depthwise with >= DEPTHWISE_KERNEL_MIN_INPUT input values: the faster of oneDNN's path
        # and the compiled kernel
        (nn.Conv2d(8, 16, 4, padding="same", groups=8), (2, 8, 257, 257), "depthwise_fastest"),
        (nn.Conv1d(5, 5, 3, stride=3, padding=4, groups=5), (2, 5, 104_858), "depthwise_fastest"),
    ],
)
def test_conv_per_example_gradient_paths(conv, x, path, gen, monkeypatch):
    """Each way of computing the per-example weight gradients against brute force, and the
    choice among them on CPU (_gradient_path)."""
    from torch_dpfast.rules import conv as conv_rule

    module = conv.double()
    assert conv_rule._gradient_path(module, torch.empty(x), conv_geometry(module, x)) == path
    inputs = torch.randn(*x, generator=gen, dtype=torch.float64)
    g = output_grad(module, inputs, gen)
    expected = brute_force(module, inputs, g)["weight"]
    depthwise = module.groups == module.in_channels and module.weight.dim() < 5
    ways = ("correlated", "folded", "by_example", "gemm", "depthwise_kernel", "depthwise_fastest")
    for forced in ways:
        if forced == "by_example" and module.padding == "same":
            continue  # asymmetric padding: the convolution backward cannot take it
        if forced == "gemm" and module.groups > 1:
            continue  # grouped convs are always folded
        if forced.startswith("depthwise") and not depthwise:
            continue  # depthwise 1-d and 2-d convs only
        monkeypatch.setattr(conv_rule, "_gradient_path", lambda *a, forced=forced: forced)
        got = rule_for(module).per_example_grads(module, inputs, g)["weight"]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def conv_geometry(module, shape):
    """The geometry the conv rule computes for ``module`` on an input of ``shape``."""
    from torch_dpfast.ops.conv import conv_geometry as geometry
    from torch_dpfast.rules.conv import _conv_args

    x = torch.empty(shape, dtype=torch.float64)
    with torch.no_grad():
        g = module(x)
    x, kwargs = _conv_args(module, x)
    return geometry("test", x, g, **kwargs)

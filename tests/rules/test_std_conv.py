"""rules/std_conv.py: timm's weight-standardised convolutions (BiT's StdConv2d, NFNet's
ScaledStdConv2d with its gain, the 'same'-padded variants), materialised into buffers too."""

import pytest

from tests.rules.harness import check_rule, float64_module, floats

timm_layers = pytest.importorskip("timm.layers")

CASES = {
    "stdconv": (lambda: timm_layers.StdConv2d(3, 4, 3), floats(2, 3, 6, 5)),
    # >= 512 output positions: one weight-gradient convolution per example on CPU
    "stdconv-high-res": (lambda: timm_layers.StdConv2d(2, 3, 3, padding=1), floats(2, 2, 24, 24)),
    "stdconv-bias-groups": (
        lambda: timm_layers.StdConv2d(4, 6, 3, stride=2, groups=2, bias=True),
        floats(3, 4, 7, 6),
    ),
    "stdconv-same": (lambda: timm_layers.StdConv2dSame(2, 3, 4, stride=2), floats(2, 2, 7, 9)),
    "scaled-stdconv": (
        lambda: timm_layers.ScaledStdConv2d(3, 5, 3, padding=1),
        floats(2, 3, 5, 5),
    ),
    "scaled-stdconv-same-1x1": (
        lambda: timm_layers.ScaledStdConv2dSame(4, 3, 1),
        floats(3, 4, 5, 4),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_std_conv_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)

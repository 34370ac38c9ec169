"""rules/timm_layers.py: timm's LayerNorm, LayerNorm2d, GroupNorm1 and GroupNormAct."""

import pytest
import torch
from torch import nn

from tests.rules.harness import check_rule, float64_module, floats
from torch_dpfast.rules import rule_for

timm_layers = pytest.importorskip("timm.layers")

CASES = {
    "layernorm": (lambda: timm_layers.LayerNorm(5), floats(2, 3, 5)),
    "layernorm2d": (lambda: timm_layers.LayerNorm2d(4), floats(2, 4, 3, 5)),
    "groupnorm1": (lambda: timm_layers.GroupNorm1(4), floats(3, 4, 2, 3)),
    "groupnormact": (
        lambda: timm_layers.GroupNormAct(6, num_groups=3, act_layer=nn.SiLU),
        floats(3, 6, 4, 4),
    ),
    "groupnormact-no-act": (
        lambda: timm_layers.GroupNormAct(4, num_groups=2, apply_act=False),
        floats(2, 4, 3, 3),
    ),
    "groupnormact-gelu-1d": (
        lambda: timm_layers.GroupNormAct(6, num_groups=2, act_layer=nn.GELU),
        floats(3, 6, 5),
    ),
    "groupnormact-inplace-relu": (
        lambda: timm_layers.GroupNormAct(4, num_groups=2),
        floats(2, 4, 3, 3),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_timm_norm_rules_match_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)


def test_dropout_inside_groupnormact_is_refused():
    gna = timm_layers.GroupNormAct(4, num_groups=2, drop_layer=nn.Dropout).train()
    with pytest.raises(ValueError, match="dropout between its norm and activation"):
        rule_for(gna).per_example_grads(gna, torch.randn(2, 4, 3), torch.randn(2, 4, 3))

"""rules/layer_norm.py, rms_norm.py, group_norm.py, instance_norm.py: torch's affine
normalisation layers on every input rank they take."""

import pytest
from torch import nn

from tests.rules.harness import check_rule, float64_module, floats


def _instance_norm_eval():
    module = nn.InstanceNorm1d(3, affine=True, track_running_stats=True).eval()
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    return module


CASES = {
    "layernorm": (lambda: nn.LayerNorm(6), floats(3, 5, 6)),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((4, 3)), floats(2, 4, 3)),
    "layernorm-no-bias": (lambda: nn.LayerNorm(5, bias=False), floats(3, 5)),
    "rmsnorm": (lambda: nn.RMSNorm(6), floats(3, 4, 6)),
    "rmsnorm-eps": (lambda: nn.RMSNorm((2, 3), eps=1e-3), floats(2, 5, 2, 3)),
    "groupnorm": (lambda: nn.GroupNorm(2, 6), floats(3, 6, 4, 3)),
    "groupnorm-flat": (lambda: nn.GroupNorm(3, 6), floats(4, 6)),
    "instancenorm": (lambda: nn.InstanceNorm2d(3, affine=True), floats(2, 3, 4, 5)),
    "instancenorm-eval": (_instance_norm_eval, floats(2, 3, 7)),
}


@pytest.mark.parametrize("case", CASES)
def test_norm_rules_match_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)

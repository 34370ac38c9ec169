"""rules/linear.py: nn.Linear on inputs (B, d), (B, T, d) and (B, ..., d)."""

import pytest
import torch
from torch import nn

from tests.rules.harness import check_rule, float64_module, floats
from torch_dpfast.rules import rule_for

CASES = {
    "2d": (lambda: nn.Linear(7, 5), floats(4, 7)),
    "sequence": (lambda: nn.Linear(6, 9), floats(3, 11, 6)),
    "no-bias-4d": (lambda: nn.Linear(4, 3, bias=False), floats(2, 3, 5, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_linear_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)


def test_frozen_parameters_are_skipped(gen):
    module = nn.Linear(4, 3).double()
    module.bias.requires_grad_(False)
    x, g = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    rule = rule_for(module)
    assert set(rule.per_example_grads(module, x, g)) == {"weight"}
    assert set(rule.clipped_sums(module, x, g, torch.ones(2))) == {"weight"}
    assert set(rule.parameters(module)) == {"weight"}

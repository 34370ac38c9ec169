"""rules/_registry.py: which module types get which rule, and registration."""

import pytest
from torch import nn

from torch_dpfast.rules import rule_for


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


def test_only_rule_subclasses_register():
    from torch_dpfast.rules import register_rule

    class NotARule:
        def per_example_grads(self, module, x, g):
            return {}

    with pytest.raises(TypeError, match="subclass of torch_dpfast.rules.Rule"):
        register_rule(nn.Identity)(NotARule)

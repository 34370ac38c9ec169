"""rules/hf_conv1d.py: HuggingFace's Conv1D (GPT-2's transposed linear layer)."""

import pytest

from tests.rules.harness import check_rule, float64_module, floats

hf_utils = pytest.importorskip("transformers.pytorch_utils")

CASES = {
    "sequence": (lambda: hf_utils.Conv1D(5, 7), floats(3, 4, 7)),
    "2d": (lambda: hf_utils.Conv1D(3, 6), floats(4, 6)),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_conv1d_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)

"""rules/embedding.py: nn.Embedding, with and without padding_idx; max_norm refused."""

import pytest
import torch
from torch import nn

from tests.rules.harness import check_rule, float64_module, ids
from torch_dpfast.rules import rule_for

CASES = {
    "plain": (lambda: nn.Embedding(6, 4), ids(6, 3, 9)),
    "padding-idx": (lambda: nn.Embedding(5, 3, padding_idx=1), ids(5, 4, 7)),
    "one-id-per-example": (lambda: nn.Embedding(4, 2), ids(4, 5)),
}


@pytest.mark.parametrize("case", CASES)
def test_embedding_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)


def test_max_norm_is_refused():
    emb = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        rule_for(emb).norm_sq(emb, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 3))

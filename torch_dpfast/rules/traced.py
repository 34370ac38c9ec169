"""The rule of a module that owns trainable parameters but has no rule of its own: its forward
runs under the parameter-use tracer (``torch_dpfast/tracing.py``), which gives each use of a
parameter an exact per-example rule. The record's ``x`` is the :class:`~torch_dpfast.tracing.Trace`
of one call; the per-example gradients are materialised from it, (B, *p.shape) per parameter.

``F.linear(x, W, b)`` with a parameter W (a subclass of nn.Linear with its own forward, a head
that reuses an embedding's weight) becomes a linear layer of its own, :class:`FunctionalLinear`,
with the linear rule's fast norms and book-keeping; ``F.embedding(ids, W)`` an embedding layer,
:class:`FunctionalEmbedding` (OPT's learned positions, an nn.Embedding subclass)."""

from __future__ import annotations

from torch import nn

from ._registry import Rule
from .embedding import EmbeddingRule
from .linear import LinearRule


class TracedRule(Rule):
    """Per-example gradients of the parameters a traced forward used (module docstring)."""

    capture = "uses"

    def per_example_grads(self, module, trace, g=None):
        return trace.per_example_grads()

    def reset(self, trace) -> None:
        """Drops the per-example leaves' gradients (between ghost clipping's two passes)."""
        trace.reset()

    def plan(self, module, x, out, clipping):
        return "traced uses (per-example copies)", None


class FunctionalLinear:
    """``F.linear(x, weight, bias)`` called on parameters, presented to :class:`LinearRule` as
    the nn.Linear it computes. One per (weight, bias) pair, so that its calls in one forward
    are joined (engine.merge_repeated)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        self.weight, self.bias = weight, bias

    def named_parameters(self, recurse: bool = False):
        yield "weight", self.weight
        if self.bias is not None:
            yield "bias", self.bias


class FunctionalEmbedding:
    """``F.embedding(ids, weight, padding_idx)`` on a parameter, presented to
    :class:`EmbeddingRule` as the nn.Embedding it computes (no max_norm)."""

    max_norm = None

    def __init__(self, weight: nn.Parameter, padding_idx: int | None):
        self.num_embeddings, self.embedding_dim = weight.shape
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings  # as F.embedding reads it
        self.weight, self.padding_idx = weight, padding_idx

    def named_parameters(self, recurse: bool = False):
        yield "weight", self.weight


TRACED = TracedRule()
FUNCTIONAL_LINEAR = LinearRule()
FUNCTIONAL_EMBEDDING = EmbeddingRule()

"""nn.Embedding: x = ids (B, *), g (B, *, d). Example i's table gradient scatters its rows g_it
into rows ids_it (positions sharing an id add up; padding_idx gets nothing)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ._registry import Rule, register_rule, row_norms


def _check(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise ValueError(
            "nn.Embedding(max_norm=...) rescales table rows in place during the forward, a change "
            "to the parameters outside the DP mechanism that depends on the batch's ids; "
            "construct the embedding without max_norm to train it privately"
        )


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    position_wise = True  # rows folded into dim 0 (k B, example-major) are taken apart

    def per_example_grads(self, module, ids: Tensor, g: Tensor, out=None):
        """{"weight": (B, V, d)}: example i's rows g_it added into rows ids_it of its table (one
        index_add over the batch; row padding_idx then zeroed: it gets nothing), written into
        ``out["weight"]`` where given."""
        _check(module)
        if not module.weight.requires_grad:
            return {}
        batch, vocab, dim = ids.shape[0], module.num_embeddings, module.embedding_dim
        positions = math.prod(ids.shape[1:])
        keys = torch.arange(batch, device=ids.device)[:, None] * vocab + ids.reshape(batch, -1)
        table = (out or {}).get("weight")
        table = g.new_zeros(batch, vocab, dim) if table is None else table.zero_()
        rows = g.reshape(batch * positions, dim).to(table.dtype)
        table.view(batch * vocab, dim).index_add_(0, keys.flatten(), rows)
        if module.padding_idx is not None:
            table[:, module.padding_idx] = 0
        return {"weight": table}

    def materialise_saving(self, module, ids, g):
        """The norm reads every position's gradient (T d per example); the tables hold V d
        values per example, so only small vocabularies are worth it (with the fast path's
        fixed cost, materialise_plan.py)."""
        if not module.weight.requires_grad:
            return None
        positions = math.prod(ids.shape[1:])
        return positions * module.embedding_dim, module.num_embeddings * module.embedding_dim

    def plan(self, module, ids, out, clipping):
        if clipping == "per_example":
            return "materialised", out[0].numel()
        return "segment sum", out[0].numel()

    def norm_sq(self, module, ids, g, method="auto"):
        _check(module)
        if not module.weight.requires_grad:
            return g.new_zeros(g.shape[0], dtype=torch.float32)
        return ops.embedding_norm_sq(ids, g, module.num_embeddings, module.padding_idx)

    def norm_bound(self, module, ids, g):
        """sum_t ||g_t|| over the positions whose id is not padding_idx."""
        _check(module)
        norms = row_norms(g.reshape(g.shape[0], -1, g.shape[-1]))
        if not module.weight.requires_grad:
            return norms.new_zeros(g.shape[0])
        ids = ids.reshape(ids.shape[0], -1)
        valid = ids != module.padding_idx if module.padding_idx is not None else ids >= 0
        return (norms * valid).sum(dim=1)

    def clipped_sums(self, module, ids, g, scale):
        _check(module)
        if not module.weight.requires_grad:
            return {}
        summed = ops.embedding_clipped_sum(ids, g, scale, module.num_embeddings, module.padding_idx)
        return {"weight": summed.to(module.weight.dtype)}

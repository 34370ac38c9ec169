"""nn.EmbeddingBag: one bag of ids per example, reduced by sum, mean or max. Bags given as a
(B, L) tensor, or as flat ids (N,) with offsets (B,) (or (B + 1,) with include_last_offset), and
optional per_sample_weights.

The rule re-implements the bag as an embedding lookup of the bags padded to (B, L_max) followed
by the reduction: the lookup is captured (x = the padded ids, g = the gradient of each looked-up
row: the bag's output gradient times the id's weight in the bag, 0 at padding), so example i's
table gradient is the embedding rule's, rows g_it scattered to ids_it, with its fast norms and
clipped sums. Ids equal to padding_idx are left out of the bag (and of a mean's count), as
torch does; an empty bag is zeros."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_rule
from .embedding import EmbeddingRule


def padded_bags(module: nn.EmbeddingBag, ids: Tensor, offsets, per_sample_weights):
    """(ids (B, L), weights (B, L)): each bag's ids, padded with id 0 of weight 0; an id's
    weight is its per-sample weight (1 without), 0 for padding_idx."""
    if ids.dim() == 2:
        if offsets is not None:
            raise ValueError("EmbeddingBag: offsets must be None when the input is 2-D")
        weights = torch.ones(ids.shape, dtype=torch.get_default_dtype(), device=ids.device)
        if per_sample_weights is not None:
            weights = per_sample_weights
        padded = ids
    else:
        if offsets is None:
            raise ValueError("EmbeddingBag: a 1-D input needs offsets")
        if module.include_last_offset:
            starts, ends = offsets[:-1], offsets[1:]
        else:
            starts, ends = offsets, torch.cat([offsets[1:], offsets.new_tensor([ids.shape[0]])])
        lengths = ends - starts
        width = int(lengths.max()) if lengths.numel() else 0
        positions = torch.arange(width, device=ids.device)
        inside = positions[None, :] < lengths[:, None]  # (B, L)
        index = (starts[:, None] + positions[None, :]).clamp(max=max(ids.shape[0] - 1, 0))
        padded = torch.where(inside, ids[index], torch.zeros_like(index))
        weights = inside.to(torch.get_default_dtype())
        if per_sample_weights is not None:
            weights = torch.where(inside, per_sample_weights[index], 0.0)
    if module.padding_idx is not None:
        weights = weights * (padded != module.padding_idx)
    return padded, weights


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    """The embedding rule on the padded bags (module docstring)."""

    capture = "projections"
    position_wise = False

    def forward(self, module, capture, input, offsets=None, per_sample_weights=None):
        if module.mode != "sum" and per_sample_weights is not None:
            raise ValueError("EmbeddingBag: per_sample_weights needs mode='sum'")
        ids, weights = padded_bags(module, input, offsets, per_sample_weights)

        def lookup(bag_ids):
            return (F.embedding(bag_ids, module.weight, module.padding_idx),)

        (rows,) = capture((ids,), lookup)  # (B, L, d)
        weights = weights.to(rows.dtype)[..., None]
        if module.mode == "max":
            present = weights > 0
            best = rows.masked_fill(~present, float("-inf")).amax(dim=1)
            return torch.where(present.any(dim=1), best, torch.zeros_like(best))
        summed = (rows * weights).sum(dim=1)
        if module.mode == "mean":
            return summed / (weights > 0).sum(dim=1).clamp_min(1).to(summed.dtype)
        return summed

    def per_example_grads(self, module, x, g, out=None):
        return super().per_example_grads(module, x[0], g[0], out)

    def materialise_saving(self, module, x, g):
        return super().materialise_saving(module, x[0], g[0])

    def norm_sq(self, module, x, g, method="auto"):
        return super().norm_sq(module, x[0], g[0], method)

    def norm_bound(self, module, x, g):
        return super().norm_bound(module, x[0], g[0])

    def clipped_sums(self, module, x, g, scale):
        return super().clipped_sums(module, x[0], g[0], scale)

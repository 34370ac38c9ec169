"""``clipping="per_example"``: every per-example gradient materialised (the Opacus-equivalent
baseline): G_i of each parameter, ||g_i||^2 = sum over parameters of ||G_i||^2, then
sum_i c_i G_i in one fused clip-and-accumulate."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..records import mask_on, materialise, warn_non_finite
from ._base import Clipper


class PerExample(Clipper):
    def clip(self, attachment, max_grad_norm: float) -> Tensor:
        batch = attachment.take_batch()
        if batch is None:
            return torch.zeros(0)
        per_example = materialise(batch.records)
        params = [p for p, _ in per_example.values()]
        for p in params:
            if p.summed_grad is None:
                p.summed_grad = torch.zeros_like(p)
        grads = [(g * batch.loss_scale).to(p.dtype) for p, g in per_example.values()]
        norm_sq = ops.clip_accumulate_(
            grads,
            [p.summed_grad for p in params],
            max_grad_norm,
            mask_on(batch.mask, grads[0].device),
        )
        warn_non_finite(norm_sq, batch.mask)
        return norm_sq

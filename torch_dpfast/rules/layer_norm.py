"""nn.LayerNorm: x (B, *, *normalized_shape). With xhat the normalised input (recomputed from x),
example i's gradients are weight_i = sum_t g_it * xhat_it and bias_i = sum_t g_it over the
positions t in front of the normalised dims."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._affine import affine_grads
from ._registry import Rule, register_rule


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    position_wise = True  # rows folded into dim 0 (k B, example-major) are taken apart

    def per_example_grads(self, module, x, g):
        shape = module.normalized_shape
        xhat = F.layer_norm(x, shape, None, None, module.eps)
        return affine_grads(module, xhat, g, tuple(range(1, x.dim() - len(shape))))

"""nn.RMSNorm: x (B, *, *normalized_shape), xhat = x / sqrt(mean(x^2) + eps) over the normalised
dims; example i's weight gradient is sum_t g_it * xhat_it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._affine import affine_grads
from ._registry import Rule, register_rule


@register_rule(nn.RMSNorm)
class RMSNormRule(Rule):
    position_wise = True  # rows folded into dim 0 (k B, example-major) are taken apart

    def per_example_grads(self, module, x, g):
        shape = module.normalized_shape
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        xhat = F.rms_norm(x, shape, None, eps)
        return affine_grads(module, xhat, g, tuple(range(1, x.dim() - len(shape))))

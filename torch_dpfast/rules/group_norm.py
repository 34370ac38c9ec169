"""nn.GroupNorm: x (B, C, *S). With xhat the group-normalised input, example i's gradients are
weight_i[c] = sum_s g_ics * xhat_ics and bias_i[c] = sum_s g_ics."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._affine import affine_grads
from ._registry import Rule, register_rule


def group_norm_grads(module: nn.GroupNorm, x, g):
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return affine_grads(module, xhat, g, tuple(range(2, x.dim())))


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def per_example_grads(self, module, x, g):
        return group_norm_grads(module, x, g)

"""nn.InstanceNorm1d/2d/3d with affine=True: x (B, C, *S) normalised per example and channel
(running statistics in eval mode when tracked); gradients as for GroupNorm with C groups."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._affine import affine_grads
from ._registry import Rule, register_rule


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(Rule):
    def per_example_grads(self, module, x, g):
        use_input_stats = module.training or not module.track_running_stats
        # With input statistics the running buffers are not passed, so nothing is updated here.
        running = (None, None) if use_input_stats else (module.running_mean, module.running_var)
        xhat = F.instance_norm(x, *running, None, None, use_input_stats, 0.0, module.eps)
        return affine_grads(module, xhat, g, tuple(range(2, x.dim())))

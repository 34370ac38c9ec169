"""Rules for timm's normalisation layers that override ``forward`` (registered when timm is
installed): LayerNorm and GroupNorm (same maths, fast kernels), LayerNorm2d (channels-first:
normalised over C of (B, C, H, W)), GroupNorm1, and GroupNormAct (norm, then dropout and an
activation, whose Jacobian is applied to g before the GroupNorm maths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._affine import affine_grads
from ._registry import Rule, input_and_output, register_rule
from .group_norm import group_norm_grads
from .layer_norm import LayerNormRule

try:
    from timm import layers as timm_layers
except ImportError:  # timm is optional
    timm_layers = None


def _group_norm_act_grads(module: nn.Module, x, g):
    """GroupNormAct: y = xhat * weight + bias, out = act(drop(y)); the GroupNorm rule's
    per-example gradients with g mapped back through the activation. For ReLU that is a
    threshold on the layer's kept output (out > 0 exactly where y > 0), else on y recomputed;
    other activations through autograd."""
    x, out = input_and_output(x)
    if module.training and not isinstance(module.drop, nn.Identity):
        raise ValueError(
            f"{type(module).__name__} applies dropout between its norm and activation; its "
            "per-example gradients cannot be recomputed exactly in training mode. Use "
            "drop_layer=None for private training"
        )
    if isinstance(module.act, nn.Identity):
        return group_norm_grads(module, x, g)
    relu = isinstance(module.act, nn.ReLU)
    if relu and out is not None and out.shape == g.shape:
        return group_norm_grads(module, x, g, relu_out=out)
    weight, bias = _detached(module.weight), _detached(module.bias)
    y = F.group_norm(x, module.num_groups, weight, bias, module.eps)
    if relu:
        pre = torch.ops.aten.threshold_backward(g, y, 0)
    else:
        with torch.enable_grad():
            y = y.requires_grad_(True)
            act_out = module.act(y.clone())  # clone: the activation may be in place
            (pre,) = torch.autograd.grad(act_out, y, g)
    return group_norm_grads(module, x, pre)


def _detached(p):
    return None if p is None else p.detach()


if timm_layers is not None:

    @register_rule(timm_layers.LayerNorm, timm_layers.GroupNorm, timm_layers.GroupNorm1)
    class TimmNormRule(Rule):
        """timm's LayerNorm/GroupNorm/GroupNorm1: nn.LayerNorm/nn.GroupNorm with fast kernels."""

        def per_example_grads(self, module, x, g):
            if isinstance(module, nn.LayerNorm):
                return LayerNormRule().per_example_grads(module, x, g)
            return group_norm_grads(module, x, g)

    @register_rule(timm_layers.LayerNorm2d)
    class LayerNorm2dRule(Rule):
        def per_example_grads(self, module, x, g):
            xhat = F.layer_norm(
                x.permute(0, 2, 3, 1), module.normalized_shape, None, None, module.eps
            )
            return affine_grads(module, xhat, g.permute(0, 2, 3, 1), (1, 2))

    @register_rule(timm_layers.GroupNormAct)
    class GroupNormActRule(Rule):
        def kept_output(self, module, x, out, g):
            """The output itself, behind a ReLU, whose mask it gives (usually the next layer's
            input: no memory of its own); nothing for other activations."""
            return out if isinstance(module.act, nn.ReLU) else None

        def per_example_grads(self, module, x, g):
            return _group_norm_act_grads(module, x, g)

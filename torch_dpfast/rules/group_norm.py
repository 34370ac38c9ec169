"""nn.GroupNorm: x (B, C, *S). With xhat the group-normalised input, example i's gradients are
weight_i[c] = sum_s g_ics * xhat_ics and bias_i[c] = sum_s g_ics. On CPU one compiled pass per
(example, group) (csrc/cpu/group_norm.cpp), else xhat recomputed and multiplied in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from ._affine import affine_grads
from ._registry import Rule, register_rule


def compiled_grads_apply(x: Tensor, g: Tensor) -> bool:
    """Whether the compiled kernel computes a group norm's affine gradients for x, g."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dtype == g.dtype
        and x.dim() >= 2
        and _ext.has_kernel("group_norm_affine_grads", "CPU")
    )


def compiled_grads(module: nn.Module, x: Tensor, g: Tensor, relu: bool) -> dict[str, Tensor]:
    """The compiled kernel's (B, C) weight and bias gradients, g' = g [y > 0] with ``relu``
    (y = weight xhat + bias), for the parameters that train."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    dweight, dbias = torch.ops.dpfast_C.group_norm_affine_grads(
        x, g, module.num_groups, module.eps, _values(weight), _values(bias), relu
    )
    out = {}
    if weight is not None and weight.requires_grad:
        out["weight"] = dweight
    if bias is not None and bias.requires_grad:
        out["bias"] = dbias
    return out


def _values(p: Tensor | None) -> Tensor | None:
    """A parameter's values without its autograd history (the op has no derivative: a
    parameter that requires grad would make its outputs, and every norm after, require one)."""
    return None if p is None else p.detach()


def group_norm_grads(module: nn.GroupNorm, x, g):
    if compiled_grads_apply(x, g):
        return compiled_grads(module, x, g, relu=False)
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return affine_grads(module, xhat, g, tuple(range(2, x.dim())))


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def per_example_grads(self, module, x, g):
        return group_norm_grads(module, x, g)

"""nn.GroupNorm: x (B, C, *S). With xhat the group-normalised input, example i's gradients are
weight_i[c] = sum_s g_ics * xhat_ics and bias_i[c] = sum_s g_ics.

xhat is never formed: with mu_ik and rstd_ik the statistics of example i's group k (c in k),
weight_i[c] = rstd_ik (sum_s g_ics x_ics - mu_ik sum_s g_ics), two reductions of g against x
(the factorisation ATen's own group-norm backward uses). On CPU the two sums and the statistics
come from one float64 pass over g and x (_affine.row_dots)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._affine import group_statistics, product_sum, row_dots
from ._registry import Rule, register_rule


def group_norm_grads(
    module: nn.Module, x: Tensor, g: Tensor, relu_out: Tensor | None = None
) -> dict[str, Tensor]:
    """{"weight", "bias"}: (B, C) per-example gradients of a group norm's affine parameters
    (those that are trainable) for input x and gradient g of its affine output, (B, C, *S); with
    ``relu_out``, g is the gradient of a ReLU's output relu_out on the affine output (timm's
    GroupNormAct), taken back through it as autograd does (0 where relu_out <= 0)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    need_weight = weight is not None and weight.requires_grad
    batch, channels = x.shape[:2]
    flat = [t.reshape(batch, channels, -1) for t in (g, x)]
    flat_relu = None if relu_out is None else relu_out.reshape(batch, channels, -1)
    products, sums, mean, rstd = _reductions(module, *flat, flat_relu, need_weight)
    out = {}
    if need_weight:
        per_group = channels // module.num_groups
        mean, rstd = mean.repeat_interleave(per_group, 1), rstd.repeat_interleave(per_group, 1)
        out["weight"] = ((products - mean * sums) * rstd).to(g.dtype)
    if bias is not None and bias.requires_grad:
        out["bias"] = sums.to(g.dtype)
    return out


def _reductions(module, g: Tensor, x: Tensor, relu_out: Tensor | None, statistics: bool):
    """(sum_s g x, sum_s g) (B, C) of g, x (B, C, n), g masked by the ReLU's output, and with
    ``statistics`` each group's (mean, rstd) (B, G), else None for those three but the sums.
    On CPU one float64 pass (_affine.row_dots); else PyTorch ops in at least float32, the
    statistics ATen's (Welford, vectorised: torch.var_mean is 5x slower on CPU)."""
    groups = module.num_groups
    fused = row_dots(g, x, relu_out, moments=statistics)
    if fused is not None:
        if not statistics:
            return None, fused[..., 1], None, None
        moments = fused[..., 2:].reshape(*fused.shape[:1], groups, -1, 3)
        return (fused[..., 0], fused[..., 1], *group_statistics(moments, x.shape[2], module.eps))
    if relu_out is not None:
        g = torch.ops.aten.threshold_backward(g, relu_out, 0)
    dtype = torch.promote_types(x.dtype, torch.float32)
    sums = g.sum(dim=2, dtype=dtype)
    if not statistics:
        return None, sums, None, None
    batch, channels, n = x.shape
    _, mean, rstd = torch.native_group_norm(x, None, None, batch, channels, n, groups, module.eps)
    return product_sum(g, x, (2,)).to(dtype), sums, mean.to(dtype), rstd.to(dtype)


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def per_example_grads(self, module, x, g):
        return group_norm_grads(module, x, g)

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
    batch, channels = x.shape[:2]
    groups = module.num_groups
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    need_weight = weight is not None and weight.requires_grad
    flat_x, flat_g = x.reshape(batch, channels, -1), g.reshape(batch, channels, -1)
    flat_relu = None if relu_out is None else relu_out.reshape(batch, channels, -1)
    positions = flat_x.shape[2]
    per_group = channels // groups
    # On CPU one pass: sum g x, sum g and, for the weight, the group statistics (float64)
    fused = row_dots(flat_g, flat_x, flat_relu, moments=need_weight)
    if fused is not None:
        products, sums = fused[..., 0], fused[..., 1]
        if need_weight:
            moments = fused[..., 2:].reshape(batch, groups, per_group, 3)
            mean, rstd = group_statistics(moments, positions, module.eps)
    else:
        if flat_relu is not None:
            flat_g = torch.ops.aten.threshold_backward(flat_g, flat_relu, 0)
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics at least in float32
        sums = flat_g.sum(dim=2, dtype=dtype)
        if need_weight:
            products = product_sum(flat_g, flat_x, (2,)).to(dtype)
            # ATen's statistics (Welford, vectorised): torch.var_mean is 5x slower on CPU
            _, mean, rstd = torch.native_group_norm(
                x, None, None, batch, channels, positions, groups, module.eps
            )
    out = {}
    if need_weight:
        mean = mean.to(products.dtype).repeat_interleave(per_group, 1)
        rstd = rstd.to(products.dtype).repeat_interleave(per_group, 1)
        out["weight"] = ((products - mean * sums.to(products.dtype)) * rstd).to(g.dtype)
    if bias is not None and bias.requires_grad:
        out["bias"] = sums.to(g.dtype)
    return out


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def per_example_grads(self, module, x, g):
        return group_norm_grads(module, x, g)

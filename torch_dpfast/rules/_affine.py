"""Per-example gradients of an element-wise affine map y = xhat * weight + bias, shared by the
normalisation rules: weight_i = sum over positions of g_i * xhat_i, bias_i = sum of g_i."""

from __future__ import annotations

from torch import Tensor, nn


def affine_grads(
    module: nn.Module,
    xhat: Tensor,
    g: Tensor,
    position_dims: tuple[int, ...],
    to_param_shape=lambda t: t,
) -> dict[str, Tensor]:
    """xhat, g (B, ...); ``position_dims`` are summed out (none: no sum); ``to_param_shape`` maps
    the (B, ...) result onto (B, *param.shape)."""

    def reduce(t: Tensor) -> Tensor:
        return to_param_shape(t.sum(dim=position_dims) if position_dims else t)

    out = {}
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None and weight.requires_grad:
        out["weight"] = reduce(g * xhat)
    if bias is not None and bias.requires_grad:
        out["bias"] = reduce(g)
    return out

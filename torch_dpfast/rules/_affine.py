"""Per-example gradients of an element-wise affine map y = xhat * weight + bias, shared by the
normalisation rules: weight_i = sum over positions of g_i * xhat_i, bias_i = sum of g_i."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _ext


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
        out["weight"] = to_param_shape(product_sum(g, xhat, position_dims))
    if bias is not None and bias.requires_grad:
        out["bias"] = reduce(g)
    return out


def product_sum(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(a * b) summed over ``dims``; over trailing dims of same-shaped contiguous tensors as one
    dot product per row without a full-size temporary: on CPU by the compiled :func:`row_dots`
    (2-4x einsum's batched dot products), else einsum."""
    n = a.dim()
    trailing = dims and sorted(d % n for d in dims) == list(range(n - len(dims), n))
    same = a.shape == b.shape and a.dtype == b.dtype
    if not trailing or not same or not (a.is_contiguous() and b.is_contiguous()):
        return (a * b).sum(dim=dims) if dims else a * b
    kept = a.shape[: n - len(dims)]
    flat_a, flat_b = a.reshape(*kept, -1), b.reshape(*kept, -1)
    fused = row_dots(flat_a, flat_b)
    if fused is not None:
        return fused[..., 0].to(a.dtype)
    return torch.einsum("...s,...s->...", flat_a, flat_b)


def row_dots(
    g: Tensor, x: Tensor, relu_out: Tensor | None = None, moments: bool = False
) -> Tensor | None:
    """Over the last dim of same-shaped g and x, (..., n) -> (..., 2) float64:
    (sum_s m g x, sum_s m g) with m = not [relu_out <= 0] (ReLU's backward as autograd's:
    masked elements contribute exactly nothing, a NaN output passes its gradient) or 1; with
    ``moments`` (..., 5), also (s, sum_s (x - s), sum_s (x - s)^2) for the shift s = x[..., 0]
    (see :func:`group_statistics`). One pass of the compiled kernel (csrc/cpu/row_dots.cpp);
    None where it does not run (not CPU float32 or float64, a tensor requiring grad, no built
    kernel)."""
    tensors = (g, x) if relu_out is None else (g, x, relu_out)
    if not (
        g.device.type == "cpu"
        and g.dtype in (torch.float32, torch.float64)
        and all(t.shape == g.shape and t.dtype == g.dtype for t in tensors)
        and not any(t.requires_grad for t in tensors)
        and g.dim() > 0
        and _ext.has_kernel("row_dots", "CPU")
    ):
        return None
    kept, n = g.shape[:-1], g.shape[-1]
    rows = [t.reshape(math.prod(kept), n) for t in tensors]
    out = torch.ops.dpfast_C.row_dots(
        rows[0], rows[1], rows[2] if relu_out is not None else None, moments
    )
    return out.view(*kept, out.shape[-1])


def group_statistics(moments: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of each group, (B, G) float64, from the (B, G, C/G, 3) shifted moments
    (s, sum (x - s), sum (x - s)^2) of its C/G rows of n values (:func:`row_dots`): each row's
    mean and sum of squared deviations, pooled over the group (Chan et al.'s parallel
    variance: no cancellation of E[x^2] against E[x]^2); the biased variance, as the norms'."""
    shift, first, second = moments.unbind(-1)
    row_mean = shift + first / n
    row_m2 = second - first * first / n
    mean = row_mean.mean(dim=-1)
    m2 = row_m2.sum(dim=-1) + n * (row_mean - mean.unsqueeze(-1)).square().sum(dim=-1)
    var = (m2 / (n * moments.shape[-2])).clamp_min(0.0)
    return mean, (var + eps).rsqrt()

"""nn.Linear: x (B, *, d_in), g (B, *, d_out). Weight through the ghost/direct norm and the
book-keeping clipped sum of ``ops``; bias gradient of example i is sum_t g_it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import norm_method
from ._normed import compiled, grads_with_norms
from ._registry import Rule, register_rule, row_norms, scaled_sum, zero_norms


def plan_linear(clipping: str, t: int, d_in: int, d_out: int) -> tuple[str, int]:
    """Norm method and its multiply-adds per example for a (T x d_in) -> (T x d_out) map."""
    if clipping == "per_example":
        return "materialised", t * d_in * d_out
    method = norm_method("ghost" if clipping == "bk" else "auto", t, d_in, d_out)
    return method, t * t * (d_in + d_out) if method == "ghost" else t * d_in * d_out


def linear_bound_sq(x: Tensor, g: Tensor, weight: bool = True, bias: bool = False) -> Tensor:
    """(B,) float64 squared upper bound of an example's weight and bias gradient norms:
    (sum_t ||g_t|| ||x_t||)^2 + (sum_t ||g_t||)^2 for x (B, T, d_in), g (B, T, d_out)."""
    g_norms = row_norms(g)
    total = g_norms.new_zeros(g.shape[0])
    if weight:
        total = total + (row_norms(x) * g_norms).sum(dim=1).square()
    if bias:
        total = total + g_norms.sum(dim=1).square()
    return total


def _rows(t: Tensor) -> Tensor:
    """(B, *, d) -> (B, T, d)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


@register_rule(nn.Linear)
class LinearRule(Rule):
    mergeable = True  # a layer called several times per forward: its calls joined (engine)
    position_wise = True  # rows folded into dim 0 (k B, example-major) are taken apart

    def weight_operands(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(d, a) of (B, T, .) rows whose d_i^T a_i is example i's weight gradient in the
        weight's layout: (g, x), (d_out, d_in)."""
        return g, x

    def per_example_grads(self, module, x, g, out=None):
        normed = self.normed_per_example_grads(module, x, g, out)
        if normed is not None:
            return normed[0]
        dtype = torch.promote_types(x.dtype, g.dtype)  # autocast: float32 x, bfloat16 g
        x, g = _rows(x).to(dtype), _rows(g).to(dtype)
        out = {} if out is None else out
        grads = {}
        if module.weight.requires_grad:
            d, a = self.weight_operands(x, g)
            grads["weight"] = torch.bmm(d.mT, a, out=out.get("weight"))
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = torch.sum(g, dim=1, out=out.get("bias"))
        return grads

    def normed_per_example_grads(self, module, x, g, out=None):
        """(per_example_grads, (B,) their squared norms) by the compiled CPU kernel
        (_normed.py), or None where it does not run (see ``compiled``)."""
        x, g = _rows(x), _rows(g)
        d, a = self.weight_operands(x, g)
        if not compiled(a, d):
            return None
        weight = module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        calls = []  # (d, weights, biases): the bias is sum_t g_t, with the weight where d is g
        if weight:
            calls.append((d, [("weight", a)], ["bias"] if bias and d is g else []))
        if bias and not (weight and d is g):
            calls.append((g, [], ["bias"]))
        grads, total = {}, None
        for d_k, weights, biases in calls:
            found, norm_sq = grads_with_norms(d_k, weights, biases, out or {})
            grads.update(found)
            total = norm_sq if total is None else total + norm_sq
        return None if total is None else (grads, total)

    def plan(self, module, x, out, clipping):
        t, d_in, d_out = math.prod(x.shape[1:-1]), x.shape[-1], out.shape[-1]
        return plan_linear(clipping, t, d_in, d_out)

    def materialise_saving(self, module, x, g):
        if not module.weight.requires_grad:
            return None
        t, d_in, d_out = math.prod(x.shape[1:-1]), x.shape[-1], g.shape[-1]
        trainable_bias = module.bias is not None and module.bias.requires_grad
        return plan_linear("auto", t, d_in, d_out)[1], d_out * (d_in + trainable_bias)

    def norm_sq(self, module, x, g, method="auto"):
        x, g = _rows(x), _rows(g)
        total = zero_norms(g)
        if module.weight.requires_grad:
            total = total + ops.linear_norm_sq(x, g, method)
        if module.bias is not None and module.bias.requires_grad:
            total = total + g.to(total.dtype).sum(dim=1).square().sum(dim=1)
        return total

    def norm_bound(self, module, x, g):
        bias = module.bias is not None and module.bias.requires_grad
        return linear_bound_sq(_rows(x), _rows(g), module.weight.requires_grad, bias).sqrt()

    def clipped_sums(self, module, x, g, scale):
        x, g = _rows(x), _rows(g)
        out = {}
        if module.weight.requires_grad:
            out["weight"] = ops.linear_clipped_sum(x, g, scale).to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = scaled_sum(g.sum(dim=1), scale).to(module.bias.dtype)
        return out

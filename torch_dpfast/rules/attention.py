"""nn.MultiheadAttention: its q/k/v projections through the linear maths, attention itself on
the fused scaled_dot_product_attention path.

Under ``attach`` the module's forward is re-implemented from its parts: the three input
projections run inside one capture (x = (query, key, value), g = the gradients of the projected
q, k and v, with bias_k / bias_v appended as the last key/value row), masks are merged into one
additive float mask, attention runs through ``F.scaled_dot_product_attention`` (or explicitly,
when the attention weights are asked for), and ``out_proj`` is called as a module, so the
Linear rule captures it. Per example i, with a_* the projection inputs and g_* their output
gradients:

    in_proj_weight (packed) = [g_q,i^T a_q,i ; g_k,i^T a_k,i ; g_v,i^T a_v,i]  (disjoint row
    blocks, so the squared norm is the sum of three ghost/direct linear norms), or
    q_proj_weight / k_proj_weight / v_proj_weight separately;
    in_proj_bias = [sum_t g_q ; sum_s g_k ; sum_s g_v];  bias_k = g_k at the appended row
    (likewise bias_v).

Exact; no per-example recomputation (the generic fallback ran the module once per example).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._registry import (
    Rule,
    batch_first_calls,
    register_rule,
    row_norms,
    scaled_sum,
    zero_norms,
)
from .linear import linear_bound_sq, plan_linear

_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _additive(mask: Tensor | None, dtype) -> Tensor | None:
    """A bool mask (True = masked out) or a float mask, as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    """See the module docstring."""

    capture = "projections"

    # ------------------------------------------------------------------ the forward

    def project(self, module: nn.MultiheadAttention, query, key, value):
        """q (B, L, E), k and v (B, S (+1 with bias_k/v), E): the captured part."""
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            w_q, w_k, w_v = module.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        b_q = b_k = b_v = None
        if module.in_proj_bias is not None:
            b_q, b_k, b_v = module.in_proj_bias.split(e)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if module.bias_k is not None:
            batch = q.shape[0]
            k = torch.cat([k, module.bias_k.expand(batch, 1, e)], dim=1)
            v = torch.cat([v, module.bias_v.expand(batch, 1, e)], dim=1)
        return q, k, v

    def forward(
        self,
        module: nn.MultiheadAttention,
        capture,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if query.dim() != 3:
            raise ValueError(
                "torch_dpfast: nn.MultiheadAttention must get batched (3-D) inputs under "
                f"per-example clipping, got a query of shape {tuple(query.shape)}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = capture((query, key, value), lambda *xs: self.project(module, *xs))
        batch, length, e = q.shape
        heads, head_dim = module.num_heads, e // module.num_heads
        kpm = _additive(key_padding_mask, q.dtype)
        mask = _additive(attn_mask, q.dtype)
        extra = int(module.bias_k is not None) + int(module.add_zero_attn)
        if module.add_zero_attn:
            zeros = q.new_zeros(batch, 1, e)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        if extra:
            kpm = F.pad(kpm, (0, extra)) if kpm is not None else None
            mask = F.pad(mask, (0, extra)) if mask is not None else None
        source = k.shape[1]
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, source, heads, head_dim).transpose(1, 2)
        v = v.view(batch, source, heads, head_dim).transpose(1, 2)
        if mask is not None:
            mask = mask.view(batch, heads, length, source) if mask.dim() == 3 else mask
        if kpm is not None:
            kpm = kpm.view(batch, 1, 1, source)
            mask = kpm if mask is None else mask + kpm
        dropout = module.dropout if module.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        with batch_first_calls():  # out_proj sees (B, L, E) whatever the model's layout
            out = module.out_proj(out.transpose(1, 2).reshape(batch, length, e))
        if not module.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    # ------------------------------------------------------------------ the maths

    def _parts(self, module, x, g):
        """[(input (B, T, d_in), output gradient (B, T, E))] for q, k, v, without the
        bias_k / bias_v row, and the appended rows' gradients (B, E) (or None)."""
        (a_q, a_k, a_v), (g_q, g_k, g_v) = x, g
        extra_k = extra_v = None
        if module.bias_k is not None:
            extra_k, extra_v = g_k[:, -1], g_v[:, -1]
            g_k, g_v = g_k[:, :-1], g_v[:, :-1]
        return [(a_q, g_q), (a_k, g_k), (a_v, g_v)], extra_k, extra_v

    def _weight_names(self, module):
        return ["in_proj_weight"] if module._qkv_same_embed_dim else list(_WEIGHTS)

    def per_example_grads(self, module, x, g):
        parts, extra_k, extra_v = self._parts(module, x, g)
        params = self.parameters(module)
        weights = [gi.mT @ ai for ai, gi in parts]
        out = {}
        if "in_proj_weight" in params:
            out["in_proj_weight"] = torch.cat(weights, dim=1)
        for name, grad in zip(_WEIGHTS, weights):
            if name in params:
                out[name] = grad
        if "in_proj_bias" in params:
            out["in_proj_bias"] = torch.cat([gi.sum(dim=1) for _, gi in parts], dim=1)
        if "bias_k" in params:
            out["bias_k"] = extra_k[:, None, None, :]
        if "bias_v" in params:
            out["bias_v"] = extra_v[:, None, None, :]
        return out

    def norm_sq(self, module, x, g, method="auto"):
        parts, extra_k, extra_v = self._parts(module, x, g)
        params = self.parameters(module)
        total = zero_norms(g[0])
        names = self._weight_names(module)
        for k, (ai, gi) in enumerate(parts):
            if (names[0] if len(names) == 1 else names[k]) in params:
                total = total + ops.linear_norm_sq(ai, gi, method)
            if "in_proj_bias" in params:
                total = total + gi.to(total.dtype).sum(dim=1).square().sum(dim=1)
        for name, extra in (("bias_k", extra_k), ("bias_v", extra_v)):
            if name in params:
                total = total + extra.to(total.dtype).square().sum(dim=1)
        return total

    def norm_bound(self, module, x, g):
        parts, extra_k, extra_v = self._parts(module, x, g)
        params = self.parameters(module)
        names = self._weight_names(module)
        total = torch.zeros(g[0].shape[0], dtype=torch.float64, device=g[0].device)
        for k, (ai, gi) in enumerate(parts):
            weight = (names[0] if len(names) == 1 else names[k]) in params
            total = total + linear_bound_sq(ai, gi, weight, "in_proj_bias" in params)
        for name, extra in (("bias_k", extra_k), ("bias_v", extra_v)):
            if name in params:
                total = total + row_norms(extra).square()
        return total.sqrt()

    def clipped_sums(self, module, x, g, scale):
        parts, extra_k, extra_v = self._parts(module, x, g)
        params = self.parameters(module)
        out = {}
        weights = [ops.linear_clipped_sum(ai, gi, scale) for ai, gi in parts]
        if "in_proj_weight" in params:
            out["in_proj_weight"] = torch.cat(weights, dim=0)
        for name, summed in zip(_WEIGHTS, weights):
            if name in params:
                out[name] = summed
        if "in_proj_bias" in params:
            out["in_proj_bias"] = torch.cat([scaled_sum(gi.sum(dim=1), scale) for _, gi in parts])
        if "bias_k" in params:
            out["bias_k"] = scaled_sum(extra_k, scale).view(1, 1, -1)
        if "bias_v" in params:
            out["bias_v"] = scaled_sum(extra_v, scale).view(1, 1, -1)
        return {name: t.to(params[name].dtype) for name, t in out.items()}

    def plan(self, module, x, out, clipping):
        t = x.shape[1] if module.batch_first else x.shape[0]
        e = module.embed_dim
        method, macs = plan_linear(clipping, t, e, e)
        return f"{method} (q, k, v projections; fused attention)", 3 * macs

"""Base of the rules whose parameters enter through linear maps only (recurrent layers and
cells): each ``use`` is a weight W (and bias b) applied at T positions, y_t = W a_t + b, so
example i's gradients are dW = sum_t d_it a_it^T and db = sum_t d_it, with d the gradient of
y. The norm is the linear layer's ghost/direct norm, the sum its book-keeping GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext, ops
from ..ops._checks import norm_method
from ._normed import compiled, grads_with_norms
from ._registry import Rule, row_norms, scaled_sum, zero_norms
from .linear import plan_linear


class LinearUsesRule(Rule):
    """Subclasses give ``uses(module, x, g)``: [(weight name, bias name or None, a (B, T, d_in),
    d (B, T, d_out))] from the captured x and g. Names not among the rule's trainable
    parameters (frozen, or no bias) are skipped."""

    def uses(self, module, x, g) -> list[tuple[str, str | None, Tensor, Tensor]]:
        raise NotImplementedError

    def per_example_grads(self, module, x, g, out=None):
        """{name: (B, *p.shape)}: d_i^T a_i per weight, written into ``out[name]`` where given
        (the engine's reused buffers); by :meth:`normed_per_example_grads` where it runs, else
        one batched GEMM per weight."""
        normed = self.normed_per_example_grads(module, x, g, out)
        if normed is not None:
            return normed[0]
        params, grads, out = self.parameters(module), {}, out or {}
        for weight, bias, a, d in self.uses(module, x, g):
            dtype = torch.promote_types(a.dtype, d.dtype)  # autocast: float32 a, bfloat16 d
            if weight in params:
                grads[weight] = torch.bmm(d.to(dtype).mT, a.to(dtype), out=out.get(weight))
            if bias in params:
                grads[bias] = torch.sum(d.to(dtype), dim=1, out=out.get(bias))
        return grads

    def normed_per_example_grads(self, module, x, g, out=None):
        """(per_example_grads, (B,) their squared norms summed) by the compiled CPU kernel
        (_normed.py): the uses sharing one output gradient d (a recurrent layer's input and
        recurrent weights, both biases) in one pass over each example. None where it does not
        run: not every use a (B, T, .) pair of one float32/float64 CPU dtype, or the extension
        not built."""
        uses = self.uses(module, x, g)
        if not uses or not all(compiled(a, d) for _, _, a, d in uses):
            return None
        grads, total = {}, None
        for d, weights, biases in self._groups(module, uses):
            found, norm_sq = grads_with_norms(d, weights, biases, out or {})
            grads.update(found)
            total = norm_sq if total is None else total + norm_sq
        return None if total is None else (grads, total)

    def _groups(self, module, uses) -> list[tuple[Tensor, list[tuple[str, Tensor]], list[str]]]:
        """[(d, [(weight name, a)], [bias names])]: the trainable uses grouped by their output
        gradient d (the same tensor: an LSTM layer's W_ih and W_hh with both biases, whose gate
        gradients are one). A group's weights act as one map [W_1 .. W_k] on the concatenated
        inputs [a_1 .. a_k]: their summed squared norms are that map's, their clipped sums its
        columns, so d's share of the work (its Gram, its rows in the GEMM) is done once."""
        params, groups = self.parameters(module), {}
        for weight, bias, a, d in uses:
            _, weights, biases = groups.setdefault(id(d), (d, [], []))
            if weight in params:
                weights.append((weight, a))
            if bias in params:
                biases.append(bias)
        return [group for group in groups.values() if group[1] or group[2]]

    def materialise_saving(self, module, x, g):
        """The groups' norm multiply-adds per example against their parameters' values: the
        batched GEMMs of per_example_grads cost what the clipped sums' GEMMs do. None (not
        materialised) where :meth:`norm_sq_and_bound`'s kernel computes every group's norm: its
        Grams cost about 3/4 of the ghost norm's multiply-adds and give the bias norms and the
        bound for free, while materialising pays per-example GEMMs of depth T (the char-LSTM
        at batch 64: clip 35.8 -> 30.4 ms; at batch 8 +0.7 ms of 22)."""
        params, macs = self.parameters(module), 0
        groups = self._groups(module, self.uses(module, x, g))
        if all(
            weights and _ghost_compiled(_joined(weights), d, "auto") for d, weights, _ in groups
        ):
            return None
        for d, weights, _ in groups:
            if weights:
                d_in = sum(a.shape[-1] for _, a in weights)
                macs += plan_linear("auto", d.shape[1], d_in, d.shape[-1])[1]
        values = sum(p.numel() for p in params.values())
        return (macs, values) if values else None

    def norm_sq(self, module, x, g, method="auto"):
        total = zero_norms(g)
        for d, weights, biases in self._groups(module, self.uses(module, x, g)):
            if weights:
                total = total + ops.linear_norm_sq(_joined(weights), d, method)
            if biases:
                total = total + len(biases) * d.to(total.dtype).sum(dim=1).square().sum(dim=1)
        return total

    def norm_sq_and_bound(self, module, x, g, method="auto"):
        """((B,) squared norms, (B,) float64 bounds) by the compiled CPU kernel
        (csrc/cpu/uses_ghost.cpp): per group, the ghost norm of the joined map with its biases
        and the bound certify.py checks it against (:meth:`norm_bound`'s), in one pass over each
        example. None where it does not run: a group without trainable weights, the direct norm
        cheaper (``method``), not CPU tensors of one float32/float64 dtype, T^2 over
        :data:`GRAM_MAX_VALUES`, or the extension not built."""
        groups = self._groups(module, self.uses(module, x, g))
        joined = [(_joined(weights), d, len(biases)) for d, weights, biases in groups if weights]
        if not joined or len(joined) != len(groups):
            return None
        if not all(_ghost_compiled(a, d, method) for a, d, _ in joined):
            return None
        norm_sq = bound_sq = None
        for a, d, biases in joined:
            n, bound = torch.ops.dpfast_C.linear_uses_ghost(a, d, biases)
            norm_sq = n if norm_sq is None else norm_sq + n
            bound_sq = bound.square() if bound_sq is None else bound_sq + bound.square()
        return norm_sq, bound_sq.sqrt()

    def norm_bound(self, module, x, g):
        """sqrt of sum over groups (sum_t ||d_t|| ||[a_1,t .. a_k,t]||)^2 + biases
        (sum_t ||d_t||)^2 each: the bound of the joined map the norm and the sum compute."""
        total = zero_norms(g).to(torch.float64)
        for d, weights, biases in self._groups(module, self.uses(module, x, g)):
            d_norms = row_norms(d)
            if weights:
                a_norms = sum(row_norms(a).square() for _, a in weights).sqrt()
                total = total + (a_norms * d_norms).sum(dim=1).square()
            total = total + len(biases) * d_norms.sum(dim=1).square()
        return total.sqrt()

    def clipped_sums(self, module, x, g, scale):
        params, out = self.parameters(module), {}
        for d, weights, biases in self._groups(module, self.uses(module, x, g)):
            if weights:
                joined, widths = _joined(weights), [a.shape[-1] for _, a in weights]
                parts, summed = joined_clipped_sums(joined, d, scale, widths, bool(biases))
                for (name, _), part in zip(weights, parts):
                    out[name] = part.to(params[name].dtype).contiguous()
            else:
                summed = scaled_sum(d.sum(dim=1), scale)
            for name in biases:
                out[name] = summed.to(params[name].dtype)
        return out


def joined_clipped_sums(
    a: Tensor, d: Tensor, scale: Tensor, widths: list[int], biased: bool
) -> tuple[list[Tensor], Tensor | None]:
    """([(G, w) for w in widths], the (G,) bias sum or None unless ``biased``): the clipped sum
    sum_i scale_i d_i^T a_i of one map on the joined input ``a`` (B, T, sum widths) split into
    its weights' columns, and sum_i scale_i sum_t d_it. On CPU in one call of the compiled
    kernel (one GEMM, the bias its column of a's rows extended by a 1: no pass of its own over
    d), else by ops.linear_clipped_sum and a scaled sum of d."""
    if (
        a.device.type == d.device.type == "cpu"
        and a.dtype == d.dtype
        and a.dtype in (torch.float32, torch.float64)
        and _ext.has_kernel("linear_uses_clipped_sum", "CPU")
    ):
        sums = torch.ops.dpfast_C.linear_uses_clipped_sum(a, d, scale, widths, biased)
        return sums[: len(widths)], sums[-1] if biased else None
    parts = ops.linear_clipped_sum(a, d, scale).split(widths, dim=1)
    return parts, scaled_sum(d.sum(dim=1), scale) if biased else None


# Largest T^2 of the compiled ghost kernel: it holds two T x T Grams per thread (2 x 16 MiB
# of float32 at the limit).
GRAM_MAX_VALUES = 1 << 22


def _ghost_compiled(a: Tensor, d: Tensor, method: str) -> bool:
    """Whether linear_uses_ghost computes the norm of input ``a`` (B, T, D) and output gradient
    ``d`` (B, T, G): the ghost norm by ``method``, CPU tensors of one float32/float64 dtype."""
    steps = a.shape[1]
    return (
        norm_method(method, steps, a.shape[-1], d.shape[-1]) == "ghost"
        and steps * steps <= GRAM_MAX_VALUES
        and a.device.type == d.device.type == "cpu"
        and a.dtype == d.dtype
        and a.dtype in (torch.float32, torch.float64)
        and _ext.has_kernel("linear_uses_ghost", "CPU")
    )


def _joined(weights: list[tuple[str, Tensor]]) -> Tensor:
    """The inputs of a group's weights side by side, (B, T, sum of d_k): one map's input. Inputs
    the forward stored side by side already (views of one tensor's adjacent columns, as the
    recurrent rule saves x_t and h_t-1) are that tensor's columns, not a copy."""
    inputs = [a for _, a in weights]
    if len(inputs) == 1:
        return inputs[0]
    first = inputs[0]
    width, offset = 0, first.storage_offset()
    for a in inputs:
        if (
            a.dtype != first.dtype
            or a.stride() != first.stride()
            or a.stride(-1) != 1
            or a.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or a.storage_offset() != offset + width
        ):
            break
        width += a.shape[-1]
    else:
        return first.as_strided((*first.shape[:-1], width), first.stride())
    dtype = first.dtype
    for a in inputs[1:]:
        dtype = torch.promote_types(dtype, a.dtype)
    return torch.cat([a.to(dtype) for a in inputs], dim=-1)

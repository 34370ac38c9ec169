"""Base of the rules whose parameters enter through linear maps only (recurrent layers and
cells): each ``use`` is a weight W (and bias b) applied at T positions, y_t = W a_t + b, so
example i's gradients are dW = sum_t d_it a_it^T and db = sum_t d_it, with d the gradient of
y. The norm is the linear layer's ghost/direct norm, the sum its book-keeping GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ._normed import compiled, grads_with_norms
from ._registry import Rule, scaled_sum, zero_norms
from .linear import linear_bound_sq, plan_linear


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
        params, out = self.parameters(module), out or {}
        groups: dict[int, tuple[Tensor, list]] = {}
        for weight, bias, a, d in uses:
            groups.setdefault(id(d), (d, []))[1].append((weight, bias, a))
        grads, total = {}, None
        for d, members in groups.values():
            weights = [(w, a) for w, _, a in members if w in params]
            biases = [b for _, b, _ in members if b in params]
            if weights or biases:
                found, norm_sq = grads_with_norms(d, weights, biases, out)
                grads.update(found)
                total = norm_sq if total is None else total + norm_sq
        return None if total is None else (grads, total)

    def materialise_saving(self, module, x, g):
        """The uses' norm multiply-adds per example against their parameters' values: the
        batched GEMMs of per_example_grads cost what the clipped sums' GEMMs do."""
        params, macs, values = self.parameters(module), 0, 0
        for weight, bias, a, d in self.uses(module, x, g):
            if weight in params:
                macs += plan_linear("auto", a.shape[1], a.shape[-1], d.shape[-1])[1]
                values += params[weight].numel()
            if bias in params:
                values += params[bias].numel()
        return (macs, values) if values else None

    def norm_sq(self, module, x, g, method="auto"):
        params, total = self.parameters(module), zero_norms(g)
        for weight, bias, a, d in self.uses(module, x, g):
            if weight in params:
                total = total + ops.linear_norm_sq(a, d, method)
            if bias in params:
                total = total + d.to(total.dtype).sum(dim=1).square().sum(dim=1)
        return total

    def norm_bound(self, module, x, g):
        params = self.parameters(module)
        total = zero_norms(g).to(torch.float64)
        for weight, bias, a, d in self.uses(module, x, g):
            total = total + linear_bound_sq(a, d, weight in params, bias in params)
        return total.sqrt()

    def clipped_sums(self, module, x, g, scale):
        params, out = self.parameters(module), {}
        for weight, bias, a, d in self.uses(module, x, g):
            if weight in params:
                out[weight] = ops.linear_clipped_sum(a, d, scale).to(params[weight].dtype)
            if bias in params:
                out[bias] = scaled_sum(d.sum(dim=1), scale).to(params[bias].dtype)
        return out

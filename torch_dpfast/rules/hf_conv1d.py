"""transformers' Conv1D (GPT-1/GPT-2's projections): y = x W + b with W (d_in, d_out), a linear
map whose weight is stored transposed. Example i's gradient is dW_i = sum_t x_it^T g_it (the
linear layer's, transposed) and db_i = sum_t g_it: the linear ghost/direct norm and
book-keeping sum, transposed into W's layout."""

from __future__ import annotations

import math

from torch import Tensor

from ._registry import register_rule
from .linear import LinearRule, plan_linear

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional
    Conv1D = None


def _transposed(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Linear-layout weight sums (d_out, d_in) -> Conv1D's (d_in, d_out)."""
    return {n: g.mT.contiguous() if n == "weight" else g for n, g in grads.items()}


if Conv1D is not None:

    @register_rule(Conv1D)
    class HFConv1DRule(LinearRule):
        def weight_operands(self, x, g):
            """(x, g): Conv1D's layout (d_in, d_out), x_i^T g_i."""
            return x, g

        def plan(self, module, x, out, clipping):
            return plan_linear(clipping, math.prod(x.shape[1:-1]), module.nx, module.nf)

        def clipped_sums(self, module, x, g, scale):
            return _transposed(super().clipped_sums(module, x, g, scale))

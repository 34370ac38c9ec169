"""Recurrent cells: nn.RNNCell, nn.LSTMCell, nn.GRUCell, one step per call:

    gi = W_ih x + b_ih,   gh = W_hh h + b_hh,   (h', c') = cell(gi, gh, h, c)

Under ``attach`` the two projections run inside one capture (x = (input, h), g = (dgi, dgh));
the gates are applied outside it. Example i's gradients are the linear layer's: dW_ih = dgi_i
x_i^T, dW_hh = dgh_i h_i^T, db_ih = dgi_i, db_hh = dgh_i. A cell called once per step of a
loop has its calls joined along time before clipping (``mergeable``; engine.merge_repeated):
one ghost/direct norm and one GEMM per weight over all steps, as for nn.LSTM.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._linear_uses import LinearUsesRule
from ._registry import register_rule
from .linear import plan_linear
from .recurrent import cell_step

_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}


def _mode(module: nn.Module) -> str:
    for cls, mode in _MODES.items():
        if isinstance(module, cls):
            return mode
    return "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"


def _rows(t):
    """(B, d) -> (B, 1, d); (B, T, d) (calls joined by merge_repeated) as is."""
    return t[:, None] if t.dim() == 2 else t


@register_rule(nn.RNNCell, nn.LSTMCell, nn.GRUCell)
class RecurrentCellRule(LinearUsesRule):
    """See the module docstring."""

    capture = "projections"
    mergeable = True

    def forward(self, module, capture, input, hx=None):
        if input.dim() != 2:
            raise ValueError(
                f"torch_dpfast: {type(module).__name__} must get a batched (2-D) input under "
                f"per-example clipping, got shape {tuple(input.shape)}"
            )
        mode = _mode(module)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], module.hidden_size)
            hx = (zeros, zeros) if mode == "LSTM" else zeros
        h, c = hx if mode == "LSTM" else (hx, None)

        def project(x, h):
            return (
                F.linear(x, module.weight_ih, module.bias_ih),
                F.linear(h, module.weight_hh, module.bias_hh),
            )

        gi, gh = capture((input, h), project)
        h, c = cell_step(mode, gi, gh, h, c)
        return (h, c) if mode == "LSTM" else h

    def uses(self, module, x, g):
        return [
            ("weight_ih", "bias_ih", _rows(x[0]), _rows(g[0])),
            ("weight_hh", "bias_hh", _rows(x[1]), _rows(g[1])),
        ]

    def plan(self, module, x, out, clipping):
        gates = module.weight_ih.shape[0]
        method, ih = plan_linear(clipping, 1, module.input_size, gates)
        _, hh = plan_linear(clipping, 1, module.hidden_size, gates)
        return f"{method} (per call; a loop's calls joined over time)", ih + hh

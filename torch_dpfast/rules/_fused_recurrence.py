"""The recurrence of one LSTM, GRU or RNN layer and direction in one compiled call (csrc/cpu/
recurrence.cpp), forward and backward, as an autograd function of the gate inputs gi: its
gradient is every step's gate pre-activation gradient, which for LSTM and RNN cells (gates =
gi + gh) is also the gradient of gh; a GRU's gh gets its own (zero) probe. The recurrent rule
uses it on CPU where the extension is built; the maths is rules/recurrent.py's ``cell_step``.

Shapes: gi (B, T, G H) with G = 4 (LSTM), 3 (GRU) or 1 (RNN), h0 / c0 (B, H), w_hh (G H, H), b_hh
(G H,) or None, valid (B, T) bool or None (padded steps carry the state). Returns the state
after every step, h (B, T, H), and for the LSTM the last cell state c_T (B, H).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext

OPS = {  # the compiled op of each cell
    "LSTM": "lstm_sequence",
    "GRU": "gru_sequence",
    "RNN_TANH": "rnn_sequence",
    "RNN_RELU": "rnn_sequence",
}


def available(mode: str, gi: Tensor, h0: Tensor, w_hh: Tensor) -> bool:
    """Whether the compiled recurrence runs this layer: an LSTM, GRU or RNN cell on CPU, float32 or
    float64 throughout (autocast's mixed dtypes take the PyTorch steps)."""
    return (
        mode in OPS
        and gi.device.type == "cpu"
        and gi.dtype in (torch.float32, torch.float64)
        and gi.dtype == h0.dtype == w_hh.dtype
        and _ext.has_kernel(OPS[mode], "CPU")
    )


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, h0, c0, w_hh, b_hh, valid):
        ctx.set_materialize_grads(False)
        hs, gates, cells, tanh_cells = torch.ops.dpfast_C.lstm_sequence(
            gi, h0, c0, w_hh, b_hh, valid
        )
        ctx.save_for_backward(gates, cells, tanh_cells, c0, w_hh, valid)
        return hs, cells[-1].clone()  # gates, cells, tanh_cells: time-major (T, B, .)

    @staticmethod
    def backward(ctx, d_hs, dc_n):
        gates, cells, tanh_cells, c0, w_hh, valid = ctx.saved_tensors
        dgates, dh0, dc0 = torch.ops.dpfast_C.lstm_sequence_backward(
            d_hs, dc_n, gates, cells, tanh_cells, c0, w_hh, valid
        )
        return dgates, dh0, dc0, None, None, None


class _RNNSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, relu, valid):
        ctx.set_materialize_grads(False)
        hs = torch.ops.dpfast_C.rnn_sequence(gi, h0, w_hh, b_hh, relu, valid)
        ctx.save_for_backward(hs, w_hh, valid)
        ctx.relu = relu
        return hs

    @staticmethod
    def backward(ctx, d_hs):
        hs, w_hh, valid = ctx.saved_tensors
        dpre, dh0 = torch.ops.dpfast_C.rnn_sequence_backward(d_hs, hs, w_hh, ctx.relu, valid)
        return dpre, dh0, None, None, None, None


class _GRUSequence(torch.autograd.Function):
    """gh_probe: a zero (B, T, 3H) tensor standing for every step's W_hh h + b_hh; its gradient
    is dgh, which differs from dgi in the candidate block (dgh_n = r dgi_n)."""

    @staticmethod
    def forward(ctx, gi, gh_probe, h0, w_hh, b_hh, valid):
        ctx.set_materialize_grads(False)
        hs, gates, gh = torch.ops.dpfast_C.gru_sequence(gi, h0, w_hh, b_hh, valid)
        ctx.save_for_backward(hs, gates, gh, h0, w_hh, valid)
        return hs

    @staticmethod
    def backward(ctx, d_hs):
        hs, gates, gh, h0, w_hh, valid = ctx.saved_tensors
        dgi, dgh, dh0 = torch.ops.dpfast_C.gru_sequence_backward(
            d_hs, hs, gates, gh, h0, w_hh, valid
        )
        return dgi, dgh, dh0, None, None, None


def gh_probe(gi: Tensor) -> Tensor:
    """A GRU's gh probe for :func:`run`: zeros shaped as gi (one value, expanded), requiring
    grad."""
    return gi.new_zeros(()).expand(gi.shape).requires_grad_()


def run(
    mode: str,
    gi: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    valid: Tensor | None,
    probe: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h of every step (B, T, H), c_T (B, H) or None); differentiable in gi, h0 and c0, and
    for a GRU in ``probe`` (:func:`gh_probe`), whose gradient is dgh. Not in the weights: the
    rule's are detached copies, their gradients come from the probes."""
    w_hh, b_hh = w_hh.detach(), None if b_hh is None else b_hh.detach()
    if mode == "LSTM":
        return _LSTMSequence.apply(gi, h0, c0, w_hh, b_hh, valid)
    if mode == "GRU":
        return _GRUSequence.apply(gi, probe, h0, w_hh, b_hh, valid), None
    return _RNNSequence.apply(gi, h0, w_hh, b_hh, mode == "RNN_RELU", valid), None

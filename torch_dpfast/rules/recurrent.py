"""Recurrent layers: nn.RNN, nn.LSTM, nn.GRU (and Opacus's DPRNN / DPLSTM / DPGRU, which hold
the same weights in per-layer cells), through the linear maths summed over time.

Each layer and direction k computes, at every step t,

    gi_t = W_ih x_t + b_ih,    gh_t = W_hh h_{t-1} + b_hh     (gate pre-activations, G*H each)

and mixes them into h_t (and c_t) by the cell's gates (G = 1 RNN, 3 GRU, 4 LSTM); an LSTM with
``proj_size`` also projects h_t = W_hr (o_t * tanh(c_t)). So example i's gradients are sums over
its steps of outer products, the linear layer's with T = the sequence length:

    dW_ih = sum_t dgi_it x_it^T,  dW_hh = sum_t dgh_it h_i,t-1^T,  db_ih = sum_t dgi_it,
    db_hh = sum_t dgh_it,         dW_hr = sum_t dh_it (o_it * tanh(c_it))^T.

Under ``attach`` the rule re-implements the layer's forward (the input projection of all steps
in one GEMM, then the recurrence) inside one capture whose backward hands back the gradients of
the *probes* gi, gh_t (and the projections). How the recurrence runs: on CPU, LSTM, GRU and
RNN layers without a projection, in one compiled call per layer and direction
(_fused_recurrence.py, csrc/cpu/recurrence.cpp); else LSTM and RNN cells, whose gates are gi +
gh, by torch's fused kernel on gi + z (an identity input weight, z a zero probe: dz_t = dgi_t =
dgh_t) where there is no projection and no PackedSequence and the identity GEMM is small enough
to pay (small batches); the rest step by step in PyTorch ops. The record holds x = (x, h_prev[,
o*tanh(c)]) and g = (dgi, dgh[, dh]) per layer and direction, each (B, T, .). Norms are
ghost/direct linear norms, sums book-keeping GEMMs, or with ``auto`` on CPU the per-example
gradients materialised (with their norms, every weight sharing a gate gradient in one compiled
call: _linear_uses.py): exact either way. Padded steps of a
PackedSequence keep the state (h, c) unchanged and get zero probe gradients, so they add
nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import _ext
from ..ops._checks import norm_method
from . import _fused_recurrence as fused
from ._linear_uses import GRAM_MAX_VALUES, LinearUsesRule
from ._registry import register_rule
from .linear import plan_linear

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _mode(module: nn.Module) -> str:
    """ "LSTM", "GRU", "RNN_TANH" or "RNN_RELU" for torch's and Opacus's recurrent modules."""
    mode = getattr(module, "mode", None)
    if mode in _GATES:
        return mode
    cell = type(module).__name__  # Opacus: DPLSTM / DPGRU / DPRNN
    if "LSTM" in cell:
        return "LSTM"
    if "GRU" in cell:
        return "GRU"
    nonlinearity = getattr(module, "cell_params", {}).get("nonlinearity", "tanh")
    return "RNN_RELU" if nonlinearity == "relu" else "RNN_TANH"


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _input_projection(seq: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """gi (B, T, G*H) of every step in one GEMM; on CPU stored time-major (a (B, T, .) view of
    (T, B, .) memory): the compiled recurrence's time-major buffers and gi's gradient then pass
    without a transposing copy of (B, T, G*H) each way (the input's smaller one is made
    instead), and each step's gi[:, t] is contiguous."""
    if seq.device.type != "cpu" or seq.dtype != weight.dtype:  # GPU, or autocast's dtypes
        return F.linear(seq, weight, bias)
    batch, steps = seq.shape[:2]
    rows = seq.transpose(0, 1).reshape(steps * batch, seq.shape[-1])  # (T B, D)
    # addmm on the (T B, D) rows, not F.linear on the non-contiguous 3-D view (char-LSTM first
    # layer, batch 64, standalone: 2.7-3.5 ms -> 2.0-2.5 ms).
    out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
    return out.view(steps, batch, -1).transpose(0, 1)


def _layer_parameters(module: nn.Module, layer: int, direction: int) -> dict[str, Tensor | None]:
    """{role: tensor or None} of one layer and direction; roles weight_ih, weight_hh, bias_ih,
    bias_hh, weight_hr. torch keeps them as attributes ``weight_ih_l0``; Opacus in a cell
    ``l0`` with RNNLinear children ``ih`` and ``hh``."""
    sfx = _suffix(layer, direction)
    cell = getattr(module, sfx[1:], None)
    if isinstance(cell, nn.Module) and hasattr(cell, "ih"):
        return {
            "weight_ih": cell.ih.weight,
            "weight_hh": cell.hh.weight,
            "bias_ih": cell.ih.bias,
            "bias_hh": cell.hh.bias,
            "weight_hr": None,
        }
    return {
        role: getattr(module, role + sfx, None)
        for role in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    }


def _directions(module: nn.Module) -> int:
    return 2 if module.bidirectional else 1


def _reversed(seq: Tensor, lengths: Tensor | None) -> Tensor:
    """(B, T, .) with each example's first lengths_i steps in reverse order (the rest kept)."""
    if lengths is None:
        return seq.flip(1)
    steps = torch.arange(seq.shape[1], device=seq.device)
    lengths = lengths.to(seq.device)[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return seq.gather(1, index[..., None].expand(seq.shape))


def cell_step(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None):
    """One step of the cell from its pre-activations: (new h before projection, new c)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.relu(pre) if mode == "RNN_RELU" else torch.tanh(pre)), None


class _Recurrence:
    """The layer's forward on batch-first tensors with detached parameters, collecting the
    probes (tensors whose gradients the rule needs) and the inputs paired with them."""

    def __init__(self, module: nn.Module, lengths: Tensor | None):
        self.module, self.mode, self.lengths = module, _mode(module), lengths
        self.saved: list[Tensor] = []  # per layer/direction: x, h_prev[, o * tanh(c)]
        self.probes: list[list[Tensor]] = []  # per layer/direction: [gi], [gh_t..][, [hr_t..]]

    def run(self, x: Tensor, h0: Tensor, c0: Tensor | None):
        """x (B, T, D), h0 / c0 (B, L * dirs, .) -> out (B, T, dirs * H_out), h_n, c_n."""
        module, dirs = self.module, _directions(self.module)
        h_last, c_last = [], []
        for layer in range(module.num_layers):
            outs = []
            for direction in range(dirs):
                k = layer * dirs + direction
                c = None if c0 is None else c0[:, k]
                out, h, c = self._direction(x, layer, direction, h0[:, k], c)
                outs.append(out)
                h_last.append(h)
                c_last.append(c)
            x = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
            if layer < module.num_layers - 1 and module.dropout and module.training:
                x = F.dropout(x, module.dropout)
        h_n = torch.stack(h_last, dim=1)
        return x, h_n, (torch.stack(c_last, dim=1) if c0 is not None else None)

    def _direction(self, x: Tensor, layer: int, direction: int, h: Tensor, c: Tensor | None):
        w = _layer_parameters(self.module, layer, direction)
        seq = _reversed(x, self.lengths) if direction else x
        gi = _input_projection(seq, w["weight_ih"], w["bias_ih"])
        steps = seq.shape[1]
        valid = None
        if self.lengths is not None:
            valid = (
                torch.arange(steps, device=x.device)[None, :] < self.lengths.to(x.device)[:, None]
            )
        if w["weight_hr"] is None and fused.available(self.mode, gi, h, w["weight_hh"]):
            return self._fused(seq, gi, w, h, c, valid, direction)
        if self._native_pays(gi) and w["weight_hr"] is None and self.lengths is None:
            return self._native(seq, gi, w, h, c, direction)
        return self._steps(seq, gi, w, h, c, valid, direction)

    def _steps(self, seq, gi, w, h, c, valid, direction):
        """The recurrence in PyTorch ops, step by step (any cell, projections, padding)."""
        steps = seq.shape[1]
        h_prev, gh_probes, hr_probes, hr_inputs, outs = [], [], [], [], []
        gi_steps = gi.unbind(1)  # one backward for all steps (a select per step would zero-fill
        # a full-size gradient each)
        for t in range(steps):
            h_prev.append(h)
            gh = F.linear(h[:, None], w["weight_hh"], w["bias_hh"])  # (B, 1, G*H), a probe
            gh_probes.append(gh)
            h_new, c_new = cell_step(self.mode, gi_steps[t], gh[:, 0], h, c)
            if w["weight_hr"] is not None:
                hr_inputs.append(h_new)
                projected = F.linear(h_new[:, None], w["weight_hr"])
                hr_probes.append(projected)
                h_new = projected[:, 0]
            if valid is not None:  # padded steps keep the state
                keep = valid[:, t, None]
                h_new = torch.where(keep, h_new, h)
                c_new = None if c is None else torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        out = torch.stack(outs, dim=1)
        if valid is not None:
            out = out * valid[..., None]  # zeros after each sequence, as pad_packed_sequence
        self.saved += [seq, torch.stack(h_prev, dim=1)]
        self.probes += [[gi], gh_probes]
        if w["weight_hr"] is not None:
            self.saved.append(torch.stack(hr_inputs, dim=1))
            self.probes.append(hr_probes)
        return (_reversed(out, self.lengths) if direction else out), h, c

    def _fused(self, seq, gi, w, h, c, valid, direction):
        """The recurrence in one compiled call (rules/_fused_recurrence.py): the gradient of
        gi is every step's gate gradient; for LSTM and RNN cells dgi_t = dgh_t, so gi is the
        probe of both, a GRU's gh has a probe of its own."""
        probe = fused.gh_probe(gi) if self.mode == "GRU" else gi
        hs, c = fused.run(self.mode, gi, h, c, w["weight_hh"], w["bias_hh"], valid, probe)
        # x_t and h_t-1 side by side in one (B, T, D + H) tensor, data only (no gradient flows
        # through saved inputs): the rule's norms and clipped sums take the columns of both
        # weights as one input without joining them (_linear_uses._joined).
        inputs = seq.new_empty(*seq.shape[:2], seq.shape[-1] + h.shape[-1])
        with torch.no_grad():
            inputs[..., : seq.shape[-1]] = seq
            inputs[:, :1, seq.shape[-1] :] = h[:, None]
            inputs[:, 1:, seq.shape[-1] :] = hs[:, :-1]
        out = hs if valid is None else hs * valid[..., None]
        self.saved += [inputs[..., : seq.shape[-1]], inputs[..., seq.shape[-1] :]]
        self.probes += [[gi], [probe]]
        return (_reversed(out, self.lengths) if direction else out), hs[:, -1], c

    def _native_pays(self, gi: Tensor) -> bool:
        """Whether the fused kernel is faster than the steps in PyTorch ops: it saves a dozen
        small ops per step but adds an identity GEMM of B (G H)^2 multiply-adds per step
        (:data:`NATIVE_MAX_MACS_PER_STEP`)."""
        batch, gates = gi.shape[0], gi.shape[-1]
        return self.mode in _NATIVE and batch * gates * gates <= NATIVE_MAX_MACS_PER_STEP

    def _native(self, seq: Tensor, gi: Tensor, w: dict, h: Tensor, c: Tensor | None, direction):
        """The recurrence by torch's fused kernel (one call for all steps instead of a dozen
        ops per step): the kernel's input is gi + z with an identity input weight, so its
        gates are gi_t + gh_t and the gradient of the zero tensor z is every step's gate
        gradient, which for LSTM and RNN cells is both dgi_t and dgh_t (gates = gi + gh)."""
        gates = gi.shape[-1]
        z = torch.zeros_like(gi, requires_grad=True)  # the gh probe of all steps
        eye = torch.eye(gates, dtype=gi.dtype, device=gi.device)
        params = [eye, w["weight_hh"]]
        if w["bias_hh"] is not None:
            params += [torch.zeros_like(w["bias_hh"]), w["bias_hh"]]
        biased, train = w["bias_hh"] is not None, self.module.training
        if self.mode == "LSTM":
            out, h_n, c_n = torch._VF.lstm(
                gi + z, (h[None], c[None]), params, biased, 1, 0.0, train, False, True
            )
            c = c_n[0]
        else:
            run = torch._VF.rnn_tanh if self.mode == "RNN_TANH" else torch._VF.rnn_relu
            out, h_n = run(gi + z, h[None], params, biased, 1, 0.0, train, False, True)
        h_prev = torch.cat([h[:, None], out[:, :-1]], dim=1)
        self.saved += [seq, h_prev]
        self.probes += [[gi], [z]]
        return (out.flip(1) if direction else out), h_n[0], c


# Cells whose gates are gi + gh (one gradient for both): run by torch's fused kernels
_NATIVE = ("LSTM", "RNN_TANH", "RNN_RELU")
# Up to this many multiply-adds per step of the identity GEMM (B (G H)^2) the fused kernel is
# faster: char-LSTM (G H = 512, T 64, 2 layers) on 2 CPU cores, a step at batch 8 36.5 ms
# against 43.1 ms step by step, at batch 64 195.8 ms against 170.7 ms.
NATIVE_MAX_MACS_PER_STEP = 1 << 22


def _unpack(packed: PackedSequence) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """PackedSequence -> (padded (B, T, D) in the original example order, lengths (B,), the
    (example, step) index of every packed row, to pack an output the same way)."""
    sizes = packed.batch_sizes
    steps = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    slot = torch.cat([torch.arange(int(n)) for n in sizes])
    order = packed.sorted_indices
    example = slot if order is None else order.cpu()[slot]
    batch = int(sizes[0])
    lengths = torch.bincount(example, minlength=batch)
    data = packed.data
    padded = data.new_zeros(batch, sizes.numel(), *data.shape[1:])
    index = (example.to(data.device), steps.to(data.device))
    padded = padded.index_put(index, data)
    return padded, lengths, index


def _check_input(module: nn.Module, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(
            f"torch_dpfast: {type(module).__name__} must get a batched (3-D) input or a "
            f"PackedSequence under per-example clipping, got shape {tuple(x.shape)}"
        )


def _state(module: nn.Module, hx, batch: int, x: Tensor, hidden: int) -> Tensor:
    """An initial state (L * dirs, B, H) as (B, L * dirs, H); zeros when not given."""
    if hx is None:
        return x.new_zeros(batch, module.num_layers * _directions(module), hidden)
    return hx.transpose(0, 1)


class RecurrentRule(LinearUsesRule):
    """See the module docstring."""

    capture = "probes"
    mergeable = True  # a layer called several times per forward: its steps joined

    def parameters(self, module):
        if not hasattr(getattr(module, "l0", None), "ih"):  # torch's layers: named by role
            return super().parameters(module)
        out = {}
        for layer in range(module.num_layers):
            for direction in range(_directions(module)):
                for role, p in _layer_parameters(module, layer, direction).items():
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        out[role + _suffix(layer, direction)] = p
        return out

    # ------------------------------------------------------------------ the forward

    def forward(self, module, capture, input, hx=None, state_init=None):
        hx = state_init if hx is None else hx  # Opacus's DPRNNBase names it state_init
        mode = _mode(module)
        packed = isinstance(input, PackedSequence)
        index = lengths = None
        if packed:
            x, lengths, index = _unpack(input)
        else:
            _check_input(module, input)
            x = input if module.batch_first else input.transpose(0, 1)
        batch = x.shape[0]
        h_out = getattr(module, "proj_size", 0) or module.hidden_size
        h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if mode == "LSTM" else (hx, None)
        h0 = _state(module, h0, batch, x, h_out)
        c0 = _state(module, c0, batch, x, module.hidden_size) if mode == "LSTM" else None
        inputs = [x, h0] + ([c0] if c0 is not None else [])
        if lengths is not None:
            inputs.append(lengths.to(x.device))
        has_cell, has_lengths = c0 is not None, lengths is not None

        def call(*ins):
            ins = iter(ins)
            x, h0 = next(ins), next(ins)
            c0 = next(ins) if has_cell else None
            recurrence = _Recurrence(module, next(ins) if has_lengths else None)
            outputs = tuple(o for o in recurrence.run(x, h0, c0) if o is not None)
            return outputs, recurrence.saved, recurrence.probes

        outputs = capture(inputs, call)
        out, h_n = outputs[0], outputs[1].transpose(0, 1).contiguous()
        state = (h_n, outputs[2].transpose(0, 1).contiguous()) if mode == "LSTM" else h_n
        if packed:
            out = PackedSequence(
                out[index], input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        elif not module.batch_first:
            out = out.transpose(0, 1)
        return out, state

    # ------------------------------------------------------------------ the maths

    def uses(self, module, x, g):
        """Every linear map of the layer, in the order the forward saved them."""
        out, k = [], 0
        for layer in range(module.num_layers):
            for direction in range(_directions(module)):
                sfx = _suffix(layer, direction)
                w = _layer_parameters(module, layer, direction)
                out.append((f"weight_ih{sfx}", f"bias_ih{sfx}", x[k], g[k]))
                out.append((f"weight_hh{sfx}", f"bias_hh{sfx}", x[k + 1], g[k + 1]))
                k += 2
                if w["weight_hr"] is not None:
                    out.append((f"weight_hr{sfx}", None, x[k], g[k]))
                    k += 1
        return out

    def _maps(self, module, x):
        """(steps, [(d_in, d_out, weight, bias)] of every linear map of the layer) for the
        forward's input x; weight / bias: the trainable parameters among them."""
        if isinstance(x, PackedSequence):
            steps = int(x.batch_sizes.numel())
        else:
            steps = x.shape[1] if module.batch_first or x.dim() == 2 else x.shape[0]
        gates, hidden = _GATES[_mode(module)], module.hidden_size
        h_out = getattr(module, "proj_size", 0) or hidden
        params, maps = self.parameters(module), []
        for layer in range(module.num_layers):
            d_in = module.input_size if layer == 0 else h_out * _directions(module)
            for direction in range(_directions(module)):
                sfx = _suffix(layer, direction)
                shapes = [(d_in, gates * hidden, "ih"), (h_out, gates * hidden, "hh")]
                if h_out != hidden:
                    shapes.append((hidden, h_out, "hr"))
                for d_i, d_o, role in shapes:
                    weight = params.get(f"weight_{role}{sfx}")
                    maps.append((d_i, d_o, weight, params.get(f"bias_{role}{sfx}")))
        return steps, maps

    def plan(self, module, x, out, clipping):
        steps, maps = self._maps(module, x)
        method, macs = None, 0
        for d_i, d_o, _, _ in maps:
            method, cost = plan_linear(clipping, steps, d_i, d_o)
            macs += cost
        return f"{method} (gate pre-activations over {steps} steps)", macs

    def call_saving(self, module, x, out):
        """As materialise_saving, from the shapes of the layer's linear maps: None where the
        compiled ghost kernel will compute the norms."""
        steps, maps = self._maps(module, x)
        if _ghost_kernel_runs(module, x, steps, maps):
            return None
        macs = values = 0
        for d_i, d_o, weight, bias in maps:
            if weight is not None:
                macs += plan_linear("auto", steps, d_i, d_o)[1]
                values += weight.numel()
            if bias is not None:
                values += bias.numel()
        return (macs, values) if values else None


def _ghost_kernel_runs(module: nn.Module, x, steps: int, maps: list) -> bool:
    """Whether a forward on ``x`` takes the compiled recurrence (LSTM or RNN cells without a
    projection, CPU, the input's float32/float64 dtype throughout) and the norms of every layer
    and direction the compiled ghost kernel (W_ih and W_hh sharing the gate gradient, a
    trainable weight among them, the ghost norm cheaper): LinearUsesRule.materialise_saving's
    condition, from shapes."""
    data = x.data if isinstance(x, PackedSequence) else x
    mode = _mode(module)
    if mode == "GRU" or getattr(module, "proj_size", 0) or not isinstance(data, Tensor):
        return False
    dtype = data.dtype
    if data.device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return False
    if any(p.dtype != dtype for p in module.parameters()) or steps * steps > GRAM_MAX_VALUES:
        return False
    if not (
        _ext.has_kernel(fused.OPS[mode], "CPU") and _ext.has_kernel("linear_uses_ghost", "CPU")
    ):
        return False
    for ih, hh in zip(maps[0::2], maps[1::2]):  # per layer and direction: (W_ih, W_hh)
        widths = [d_in for d_in, _, weight, _ in (ih, hh) if weight is not None]
        if not widths or norm_method("auto", steps, sum(widths), ih[1]) != "ghost":
            return False
    return True


register_rule(nn.RNN, nn.LSTM, nn.GRU)(RecurrentRule)

try:  # Opacus's DP recurrent layers: the same maths, parameters in per-layer cells
    from opacus.layers.dp_rnn import DPRNNBase
except ImportError:  # opacus is optional
    DPRNNBase = None

if DPRNNBase is not None:

    @register_rule(DPRNNBase)
    class OpacusRecurrentRule(RecurrentRule):
        """Opacus's DPRNN / DPLSTM / DPGRU: the rule covers the cells' parameters (its
        subtree); the module's forward(input, state_init) is nn.RNN's."""

        subtree = True

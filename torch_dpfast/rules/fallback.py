"""The generic fallback: exact per-example gradients for a module that has no rule, by running it
on one example at a time (torch.func.functional_call) against its captured output gradient.

It covers every trainable parameter in the module's subtree, so its children are not captured
separately. It is exact for any module that treats the examples of a batch independently; the
engine checks that on every step (the per-example gradients must add up to the batch gradient)
and raises for a module that couples examples. Slower than a dedicated rule: ``dpf.explain``
reports where it is used.

Window attention (timm's Swin) folds the windows of each image into dim 0: it sees B * W rows,
example-major (example i owns rows i W .. i W + W - 1). For the modules in
:data:`WINDOW_ATTENTION` the engine passes ``rows=W`` and example i is those W rows, called
together (the shifted-window attention mask indexes them by window).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ._registry import Rule

try:  # timm's window attention modules, whose dim 0 holds B * W windows, example-major
    from timm.models import swin_transformer, swin_transformer_v2

    WINDOW_ATTENTION: tuple[type, ...] = (
        swin_transformer.WindowAttention,
        swin_transformer_v2.WindowAttention,
    )
except ImportError:  # timm is optional
    WINDOW_ATTENTION = ()


def batch_dim(module: nn.Module, t: Tensor) -> int:
    """Where the batch sits in a tensor the module takes or returns: dim 1 for the 3-D inputs
    of sequence-first modules (``batch_first=False``, as nn.MultiheadAttention defaults to)."""
    return 1 if getattr(module, "batch_first", True) is False and t.dim() == 3 else 0


#: nn.MultiheadAttention.forward's positional arguments, to recognise attn_mask by position.
_MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def argument_name(module: nn.Module, position: int) -> str | None:
    """The name of positional argument ``position`` where the fallback needs to know it."""
    if isinstance(module, nn.MultiheadAttention) and position < len(_MHA_ARGUMENTS):
        return _MHA_ARGUMENTS[position]
    return None


def _example(module: nn.Module, value, i: int, batch: int, name=None, rows: int = 1):
    """Example i's slice of an argument: rows i * rows .. of tensors whose batch dim has size
    B * rows; others as is. nn.MultiheadAttention's attn_mask is per example only in its 3-D
    (B * H, L, S) form; the 2-D (L, S) form is shared, even when L happens to equal B."""
    if isinstance(module, nn.MultiheadAttention) and name == "attn_mask":
        if isinstance(value, Tensor) and value.dim() == 3:
            return value.narrow(0, i * module.num_heads, module.num_heads)
        return value
    if isinstance(value, Tensor) and value.dim() > 0:
        dim = batch_dim(module, value)
        if value.shape[dim] == batch * rows:
            return value.narrow(dim, i * rows, rows)
    return value


@contextlib.contextmanager
def _original_forward(module: nn.Module):
    """Temporarily removes the engine's capturing forward, so calls reach the module's own."""
    override = module.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if override is not None:
            module.forward = override


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class FallbackRule(Rule):
    """torch.func per-example gradients of a module's whole subtree (see module docstring)."""

    capture = "call"

    def parameters(self, module):
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def per_example_grads(self, module, x, g, rows: int = 1):
        """(B, *p.shape) per parameter; example i is ``rows`` consecutive rows of dim 0."""
        args, kwargs = x
        batch = g.shape[batch_dim(module, g)] // rows
        params = self.parameters(module)
        collected = {n: [] for n in params}
        with _original_forward(module), torch.enable_grad():
            for i in range(batch):
                leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                args_i = tuple(
                    _example(module, a, i, batch, argument_name(module, k), rows)
                    for k, a in enumerate(args)
                )
                kwargs_i = {k: _example(module, v, i, batch, k, rows) for k, v in kwargs.items()}
                out = first_output(torch.func.functional_call(module, leaves, args_i, kwargs_i))
                g_i = g.narrow(batch_dim(module, g), i * rows, rows)
                grads = torch.autograd.grad(out, list(leaves.values()), g_i, allow_unused=True)
                for (n, leaf), grad in zip(leaves.items(), grads):
                    collected[n].append(torch.zeros_like(leaf) if grad is None else grad)
        return {
            n: torch.stack(v) if v else params[n].new_zeros(0, *params[n].shape)
            for n, v in collected.items()
        }

    def plan(self, module, x, out, clipping):
        return "torch.func fallback (one example at a time)", None


FALLBACK = FallbackRule()

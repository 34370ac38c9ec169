"""Per-example gradients of linear maps with their squared norms in one pass, by the compiled
CPU kernel dpfast_C::linear_uses_grads (csrc/cpu/linear_uses.cpp): for an output gradient d
(B, T, G) shared by weights with inputs a_k (B, T, d_k), example b's gradients d_b^T a_k,b
(G, d_k) and, for biases, sum_t d_b,t (G), written where the engine asks (its reused buffers),
and the (B,) sum of their squared norms, taken from the values stored while they are in cache.
The engine then skips its separate pass over them for the norms (records.materialise)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext, ops


def compiled(*tensors: Tensor) -> bool:
    """Whether the kernel takes these operands: (B, T, .) CPU tensors of one dtype, float32 or
    float64, at least one example per thread (it runs one example per thread, where a batched
    GEMM of fewer examples still shares its work among them), and the extension built."""
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and tensors[0].shape[0] >= torch.get_num_threads()
        and all(t.dim() == 3 and t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and _ext.has_kernel("linear_uses_grads", "CPU")
    )


def grads_with_norms(
    d: Tensor, weights: list[tuple[str, Tensor]], biases: list[str], out: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """({name: (B, G, d_k) for each (name, a_k) of ``weights``, (B, G) for each bias name},
    (B,) squared norms of them all): every bias gets sum_t d_t (the same values, each counted
    in the norm); ``out[name]``, where given, is written into."""
    batch, gates = d.shape[0], d.shape[-1]
    grads = {}
    for name, a in weights:
        grads[name] = out.get(name)
        if grads[name] is None:
            grads[name] = d.new_empty(batch, gates, a.shape[-1])
    for name in biases:
        grads[name] = out.get(name)
        if grads[name] is None:
            grads[name] = d.new_empty(batch, gates)
    norm_sq = torch.ops.dpfast_C.linear_uses_grads(
        [a for _, a in weights],
        d,
        [grads[n] for n, _ in weights],
        grads[biases[0]] if biases else None,
    )
    for name in biases[1:]:
        grads[name].copy_(grads[biases[0]])
        norm_sq = norm_sq + ops.per_example_norm_sq([grads[name]])
    return grads, norm_sq

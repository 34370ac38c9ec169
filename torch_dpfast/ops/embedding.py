"""Per-example gradient norms and clipped sums of an embedding table (V x d).

Example i's weight gradient scatters its output-gradient rows g_it into the rows ids_it of the
table, so rows that share an id add up before the norm is taken; the row ``padding_idx`` gets no
gradient, as in ``torch.nn.Embedding``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from ._checks import (
    accumulation_dtype,
    check_floating,
    check_same_device,
    check_scale,
    drop_unscaled_rows,
    norm_dtype,
)


def _check(op: str, ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None):
    """Flattens ids (B, *) -> (B, T) and g (B, *, d) -> (B, T, d); normalises padding_idx."""
    check_floating(op, g=g)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{op}: ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() < 1 or g.shape[:-1] != ids.shape:
        raise ValueError(
            f"{op}: ids (B, *) and g (B, *, d) must agree, got ids {tuple(ids.shape)} and "
            f"g {tuple(g.shape)}"
        )
    if num_embeddings < 1:
        raise ValueError(f"{op}: num_embeddings must be >= 1, got {num_embeddings}")
    if padding_idx is not None:
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(
                f"{op}: padding_idx={padding_idx} is outside [-{num_embeddings}, {num_embeddings})"
            )
        padding_idx %= num_embeddings
    batch, positions = ids.shape[0], math.prod(ids.shape[1:])
    return ids.reshape(batch, positions), g.reshape(batch, positions, g.shape[-1]), padding_idx


def _valid_rows(ids: Tensor, num_embeddings: int, padding_idx: int | None) -> Tensor:
    """(B, T) bool: positions that give the table a gradient. Raises on out-of-range ids."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise IndexError(
            f"embedding ids must lie in [0, {num_embeddings}), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return ids != padding_idx if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)


# ---------------------------------------------------------------- embedding_norm_sq


@_backend.custom_op("torch_dpfast::embedding_norm_sq", mutates_args=())
def _embedding_norm_sq(
    ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None, backend: str
) -> Tensor:
    return _backend.run("embedding_norm_sq", backend, ids, g, num_embeddings, padding_idx)


@_embedding_norm_sq.register_fake
def _(ids, g, num_embeddings, padding_idx, backend) -> Tensor:
    return g.new_empty(g.shape[0], dtype=norm_dtype(g))


@_backend.register("embedding_norm_sq", "reference")
def embedding_norm_sq_reference(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx):
    """Reference: segment-sum the rows of each (example, id) pair, then sum their squares."""
    batch, dtype = ids.shape[0], norm_dtype(g)
    valid = _valid_rows(ids, num_embeddings, padding_idx)
    example = torch.arange(batch, device=ids.device)[:, None].expand_as(ids)
    keys = (example * num_embeddings + ids.long())[valid]
    unique_keys, segment = torch.unique(keys, return_inverse=True)
    rows = g.to(dtype)[valid]
    summed = rows.new_zeros(unique_keys.shape[0], g.shape[-1]).index_add_(0, segment, rows)
    per_key = summed.square().sum(dim=1)
    return per_key.new_zeros(batch).index_add_(0, unique_keys // num_embeddings, per_key)


_backend.register_compiled("embedding_norm_sq", "cpp", "CPU")
# The CUDA segmented reduction has not run on a GPU yet: auto leaves it to the reference.
_backend.register_compiled("embedding_norm_sq", "cuda", "CUDA", prefer=_backend.never)


def embedding_norm_sq(
    ids: Tensor,
    g: Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Squared norm of each example's embedding-table gradient.

    Args:
        ids: token ids, (B, *) integer.
        g: gradient of the embedding output, (B, *, d).
        num_embeddings: V, the number of table rows.
        padding_idx: the row that receives no gradient (negative counts from the end), or None.
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B,) float32 (float64 for float64 ``g``).
    """
    op = "embedding_norm_sq"
    ids, g, padding_idx = _check(op, ids, g, num_embeddings, padding_idx)
    device = check_same_device(op, ids=ids, g=g)
    backend = _backend.resolve(op, backend, device, ids, g, num_embeddings, padding_idx)
    return _embedding_norm_sq(ids, g, num_embeddings, padding_idx, backend)


# ---------------------------------------------------------------- embedding_clipped_sum


@_backend.custom_op("torch_dpfast::embedding_clipped_sum", mutates_args=())
def _embedding_clipped_sum(
    ids: Tensor,
    g: Tensor,
    scale: Tensor,
    num_embeddings: int,
    padding_idx: int | None,
    backend: str,
) -> Tensor:
    return _backend.run(
        "embedding_clipped_sum", backend, ids, g, scale, num_embeddings, padding_idx
    )


@_embedding_clipped_sum.register_fake
def _(ids, g, scale, num_embeddings, padding_idx, backend) -> Tensor:
    return g.new_empty(num_embeddings, g.shape[-1])


@_backend.register("embedding_clipped_sum", "reference")
def embedding_clipped_sum_reference(ids, g, scale, num_embeddings: int, padding_idx):
    """Reference: index_add of scale_i g_it into row ids_it over all valid positions."""
    out_dtype, acc = g.dtype, accumulation_dtype(g)
    scale = scale.to(acc)
    valid = _valid_rows(ids, num_embeddings, padding_idx) & (scale != 0)[:, None]
    rows = (drop_unscaled_rows(g.to(acc), scale) * scale[:, None, None])[valid]
    out = rows.new_zeros(num_embeddings, g.shape[-1]).index_add_(0, ids[valid].long(), rows)
    return out.to(out_dtype)


def embedding_clipped_sum(
    ids: Tensor,
    g: Tensor,
    scale: Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Book-keeping clipped sum of embedding-table gradients, sum_i scale_i G_i.

    Examples with ``scale_i == 0`` contribute exactly nothing, even with non-finite g_i.

    Args:
        ids, g, num_embeddings, padding_idx: as in :func:`embedding_norm_sq`.
        scale: per-example factors, (B,).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (num_embeddings, d) in the dtype of ``g``.
    """
    op = "embedding_clipped_sum"
    ids, g, padding_idx = _check(op, ids, g, num_embeddings, padding_idx)
    check_scale(op, scale, ids.shape[0])
    device = check_same_device(op, ids=ids, g=g, scale=scale)
    args = (ids, g, scale, num_embeddings, padding_idx)
    backend = _backend.resolve(op, backend, device, *args)
    return _embedding_clipped_sum(ids, g, scale, num_embeddings, padding_idx, backend)

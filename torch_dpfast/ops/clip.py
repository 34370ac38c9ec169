"""Clip factors and multi-tensor clip-and-accumulate of materialised per-example gradients
(factors from their own norms, or given: scaled_accumulate_).

The clip factor of example i is c_i = min(1, C / (||g_i|| + 1e-6)), computed in float64 with
IEEE sqrt and division; a non-finite squared norm (a NaN or Inf anywhere in the example's
gradient), a negative one (cancellation in a ghost norm: it says nothing of the size) or a
masked-out example gets c_i = 0, and examples with c_i = 0 are left out of every
sum exactly, so 0 * Inf = NaN never reaches a parameter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..validation import check_positive
from . import _backend
from ._checks import (
    accumulation_dtype,
    check_floating,
    check_mask,
    check_scale,
    drop_unscaled_rows,
)

CLIP_EPS = 1e-6


def _one_device(op: str, tensors: list[Tensor]) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    return devices.pop()


def _check_max_norm(op: str, max_norm: float) -> float:
    return check_positive("max_norm", max_norm, where=f"{op}: ")


# ---------------------------------------------------------------- clip_factors


@_backend.custom_op("torch_dpfast::clip_factors", mutates_args=())
def _clip_factors(norm_sq: Tensor, max_norm: float, mask: Tensor | None, backend: str) -> Tensor:
    return _backend.run("clip_factors", backend, norm_sq, max_norm, mask)


@_clip_factors.register_fake
def _(norm_sq: Tensor, max_norm: float, mask: Tensor | None, backend: str) -> Tensor:
    return torch.empty_like(norm_sq)


@_backend.register("clip_factors", "reference")
def clip_factors_reference(norm_sq: Tensor, max_norm: float, mask: Tensor | None) -> Tensor:
    """Reference: min(1, C / (sqrt(n) + 1e-6)) in float64; 0 if n is non-finite, negative or
    masked."""
    n = norm_sq.to(torch.float64)
    c = (max_norm / (n.clamp_min(0).sqrt() + CLIP_EPS)).clamp(max=1.0)
    keep = torch.isfinite(n) & (n >= 0)
    if mask is not None:
        keep &= mask.to(device=n.device, dtype=torch.bool)
    return torch.where(keep, c, torch.zeros((), dtype=c.dtype, device=c.device)).to(norm_sq.dtype)


_backend.register_compiled("clip_factors", "cpp", "CPU")
_backend.register_compiled("clip_factors", "cuda", "CUDA")


def clip_factors(
    norm_sq: Tensor, max_norm: float, mask: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """Per-example clip factors c_i = min(1, C / (sqrt(norm_sq_i) + 1e-6)).

    Args:
        norm_sq: squared per-example gradient norms, (B,) float32 or float64.
        max_norm: the clipping bound C > 0.
        mask: optional (B,) tensor; examples where it is False (0) get factor 0 (padding rows).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        (B,) in the dtype of ``norm_sq``; 0 where ``norm_sq`` is NaN, Inf or negative.
    """
    op = "clip_factors"
    max_norm = _check_max_norm(op, max_norm)
    if norm_sq.dim() != 1 or norm_sq.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{op}: norm_sq must be a (B,) float32 or float64 tensor, got "
            f"{tuple(norm_sq.shape)} {norm_sq.dtype}"
        )
    check_mask(op, mask, norm_sq.shape[0])
    if mask is not None and mask.device != norm_sq.device:
        raise ValueError(f"{op}: mask is on {mask.device} but norm_sq on {norm_sq.device}")
    backend = _backend.resolve(op, backend, norm_sq.device, norm_sq, max_norm, mask)
    return _clip_factors(norm_sq, max_norm, mask, backend)


# ---------------------------------------------------------------- total_clip_factors


@_backend.custom_op("torch_dpfast::total_clip_factors", mutates_args=())
def _total_clip_factors(
    norm_sqs: list[Tensor], max_norm: float, mask: Tensor | None, norm_scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    return _backend.run("total_clip_factors", backend, norm_sqs, max_norm, mask, norm_scale)


def _norms_dtype(tensors: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@_total_clip_factors.register_fake
def _(norm_sqs, max_norm, mask, norm_scale, backend) -> tuple[Tensor, Tensor]:
    out = norm_sqs[0].new_empty(norm_sqs[0].shape[0], dtype=_norms_dtype(norm_sqs))
    return out, torch.empty_like(out)


@_backend.register("total_clip_factors", "reference")
def total_clip_factors_reference(
    norm_sqs: list[Tensor], max_norm: float, mask: Tensor | None, norm_scale: float
) -> tuple[Tensor, Tensor]:
    """Reference: n = norm_scale * sum_k norm_sqs[k] in float64, then clip_factors(n)."""
    total = torch.stack([n.to(torch.float64) for n in norm_sqs]).sum(dim=0) * norm_scale
    factors = clip_factors_reference(total, max_norm, mask)
    dtype = _norms_dtype(norm_sqs)
    return total.to(dtype), factors.to(dtype)


_backend.register_compiled("total_clip_factors", "cpp", "CPU")
_backend.register_compiled("total_clip_factors", "cuda", "CUDA")


def total_clip_factors(
    norm_sqs: list[Tensor],
    max_norm: float,
    mask: Tensor | None = None,
    norm_scale: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-example squared norms summed over layers, and their clip factors, in one call.

    n_i = norm_scale * sum_k norm_sqs[k][i] (accumulated in float64) and
    c_i = min(1, C / (sqrt(n_i) + 1e-6)), 0 where n_i is NaN or Inf or ``mask`` is False.

    Args:
        norm_sqs: one (B,) tensor per layer (or parameter): its part of each example's squared
            gradient norm.
        max_norm: the clipping bound C > 0.
        mask: optional (B,) tensor; examples where it is False (0) get factor 0.
        norm_scale: a factor applied to the sum (the square of a loss scaling).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        ``(n, c)``, both (B,) float32 (float64 if any input is float64).
    """
    op = "total_clip_factors"
    max_norm = _check_max_norm(op, max_norm)
    norm_sqs = list(norm_sqs)
    if not norm_sqs:
        raise ValueError(f"{op}: needs one or more (B,) tensors of squared norms, got none")
    check_floating(op, **{f"norm_sqs[{k}]": n for k, n in enumerate(norm_sqs)})
    batch = norm_sqs[0].shape[0] if norm_sqs[0].dim() == 1 else -1
    for k, n in enumerate(norm_sqs):
        if n.dim() != 1 or n.shape[0] != batch:
            raise ValueError(
                f"{op}: norm_sqs[{k}] must have shape (B,) like norm_sqs[0], got "
                f"{tuple(n.shape)} against {tuple(norm_sqs[0].shape)}"
            )
    if not isinstance(norm_scale, (int, float)) or not math.isfinite(norm_scale) or norm_scale <= 0:
        raise ValueError(f"{op}: norm_scale must be a finite number > 0, got {norm_scale!r}")
    check_mask(op, mask, batch)
    device = _one_device(op, norm_sqs + ([mask] if mask is not None else []))
    args = (norm_sqs, max_norm, mask, float(norm_scale))
    backend = _backend.resolve(op, backend, device, *args)
    return _total_clip_factors(*args, backend)


# ---------------------------------------------------------------- per_example_norm_sq


@_backend.custom_op("torch_dpfast::per_example_norm_sq", mutates_args=())
def _per_example_norm_sq(per_example: list[Tensor], backend: str) -> Tensor:
    return _backend.run("per_example_norm_sq", backend, per_example)


@_per_example_norm_sq.register_fake
def _(per_example: list[Tensor], backend: str) -> Tensor:
    return per_example[0].new_empty(per_example[0].shape[0], dtype=_norms_dtype(per_example))


def _norms_dtype(per_example: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in per_example) else torch.float32


@_backend.register("per_example_norm_sq", "reference")
def per_example_norm_sq_reference(per_example: list[Tensor]) -> Tensor:
    """Reference: sum over the tensors of (B, n_k) sums of squares, each accumulated in float32
    (float64 for float64 tensors)."""
    dtype, batch = _norms_dtype(per_example), per_example[0].shape[0]
    total = torch.zeros(batch, dtype=dtype, device=per_example[0].device)
    for g in per_example:
        acc = accumulation_dtype(g)
        total += g.reshape(batch, math.prod(g.shape[1:])).to(acc).square().sum(dim=1).to(dtype)
    return total


_backend.register_compiled("per_example_norm_sq", "cpp", "CPU")


def per_example_norm_sq(per_example: list[Tensor], backend: str = "auto") -> Tensor:
    """Squared per-example norms of materialised gradients spread over many tensors.

    n_i = sum_k ||per_example[k][i]||^2. The cpp kernel accumulates in float64 in one pass over
    each tensor, without temporaries; the reference in float32 (float64 for float64 inputs).

    Args:
        per_example: tensors of shape (B, *shape_k).
        backend: ``"auto"``, ``"reference"`` or ``"cpp"``.

    Returns:
        (B,) float32 (float64 if any input is float64).
    """
    op = "per_example_norm_sq"
    per_example = list(per_example)
    if not per_example:
        raise ValueError(f"{op}: needs one or more per-example tensors")
    batch = per_example[0].shape[0] if per_example[0].dim() else -1
    for k, g in enumerate(per_example):
        check_floating(op, **{f"per_example[{k}]": g})
        if g.dim() < 1 or g.shape[0] != batch:
            raise ValueError(
                f"{op}: every tensor must be (B, ...) with B = {batch}, got per_example[{k}] of "
                f"shape {tuple(g.shape)}"
            )
    device = _one_device(op, per_example)
    return _per_example_norm_sq(per_example, _backend.resolve(op, backend, device, per_example))


def _check_accumulators(op: str, per_example: list[Tensor], summed: list[Tensor]) -> int:
    """Checks per_example[k] (B, *summed[k].shape), floating, for every k; returns B."""
    if not per_example or len(per_example) != len(summed):
        raise ValueError(
            f"{op}: needs one or more per-example tensors and as many summed tensors, got "
            f"{len(per_example)} and {len(summed)}"
        )
    batch = per_example[0].shape[0] if per_example[0].dim() else -1
    for k, (g, out) in enumerate(zip(per_example, summed)):
        check_floating(op, **{f"per_example[{k}]": g, f"summed[{k}]": out})
        if g.dim() < 1 or g.shape[0] != batch or g.shape[1:] != out.shape:
            raise ValueError(
                f"{op}: per_example[{k}] must be (B, *summed[{k}].shape) with B = {batch}, got "
                f"{tuple(g.shape)} against summed {tuple(out.shape)}"
            )
    return batch


# ---------------------------------------------------------------- clip_accumulate_


@_backend.custom_op("torch_dpfast::clip_accumulate_", mutates_args=("summed",))
def _clip_accumulate_(
    per_example: list[Tensor],
    summed: list[Tensor],
    max_norm: float,
    mask: Tensor | None,
    backend: str,
) -> Tensor:
    return _backend.run("clip_accumulate_", backend, per_example, summed, max_norm, mask)


@_clip_accumulate_.register_fake
def _(per_example, summed, max_norm, mask, backend) -> Tensor:
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in per_example) else torch.float32
    return per_example[0].new_empty(per_example[0].shape[0], dtype=dtype)


@_backend.register("clip_accumulate_", "reference")
def clip_accumulate_reference(
    per_example: list[Tensor], summed: list[Tensor], max_norm: float, mask: Tensor | None
) -> Tensor:
    """Reference: float64 norms over all tensors, then summed[k] += sum_i c_i g_k[i]."""
    batch = per_example[0].shape[0]
    norm_sq = sum(
        g.reshape(batch, math.prod(g.shape[1:])).to(torch.float64).square().sum(dim=1)
        for g in per_example
    )
    factors = clip_factors_reference(norm_sq, max_norm, mask)
    for g, out in zip(per_example, summed):
        acc = accumulation_dtype(g)
        c = factors.to(acc)
        clipped = drop_unscaled_rows(g.to(acc), c) * c.reshape(-1, *([1] * (g.dim() - 1)))
        out.add_(clipped.sum(dim=0).to(out.dtype))
    out_dtype = (
        torch.float64 if any(g.dtype == torch.float64 for g in per_example) else torch.float32
    )
    return norm_sq.to(out_dtype)


_backend.register_compiled("clip_accumulate_", "cpp", "CPU")
_backend.register_compiled("clip_accumulate_", "cuda", "CUDA")


def clip_accumulate_(
    per_example: list[Tensor],
    summed: list[Tensor],
    max_norm: float,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Clips materialised per-example gradients of many tensors and adds them up, in one call.

    With n_i = sum_k ||per_example[k][i]||^2 over *all* tensors and c_i = clip factor of n_i,
    does ``summed[k] += sum_i c_i per_example[k][i]`` for every k.

    Args:
        per_example: per-example gradients, tensor k of shape (B, *shape_k).
        summed: accumulators, tensor k of shape shape_k; updated in place.
        max_norm: the clipping bound C > 0.
        mask: optional (B,) tensor; examples where it is False (0) are left out.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        (B,) squared per-example norms n_i (float32, or float64 for float64 inputs).
    """
    op = "clip_accumulate_"
    max_norm = _check_max_norm(op, max_norm)
    per_example, summed = list(per_example), list(summed)
    batch = _check_accumulators(op, per_example, summed)
    check_mask(op, mask, batch)
    device = _one_device(op, per_example + summed + ([mask] if mask is not None else []))
    backend = _backend.resolve(op, backend, device, per_example, summed, max_norm, mask)
    return _clip_accumulate_(per_example, summed, max_norm, mask, backend)


# ---------------------------------------------------------------- scaled_accumulate_


@_backend.custom_op("torch_dpfast::scaled_accumulate_", mutates_args=("summed",))
def _scaled_accumulate_(
    per_example: list[Tensor], summed: list[Tensor], scale: Tensor, backend: str
) -> None:
    _backend.run("scaled_accumulate_", backend, per_example, summed, scale)


@_scaled_accumulate_.register_fake
def _(per_example, summed, scale, backend) -> None:
    return None


@_backend.register("scaled_accumulate_", "reference")
def scaled_accumulate_reference(
    per_example: list[Tensor], summed: list[Tensor], scale: Tensor
) -> None:
    """Reference: summed[k] += sum_i scale_i g_k[i], in float32 (float64 for float64 inputs)."""
    for g, out in zip(per_example, summed):
        acc = accumulation_dtype(g)
        s = scale.to(acc)
        scaled = drop_unscaled_rows(g.to(acc), s) * s.reshape(-1, *([1] * (g.dim() - 1)))
        out.add_(scaled.sum(dim=0).to(out.dtype))


_backend.register_compiled("scaled_accumulate_", "cpp", "CPU")


def scaled_accumulate_(
    per_example: list[Tensor], summed: list[Tensor], scale: Tensor, backend: str = "auto"
) -> None:
    """Adds up materialised per-example gradients of many tensors with given factors, in one call.

    Does ``summed[k] += sum_i scale_i per_example[k][i]`` for every k; examples with
    ``scale_i == 0`` are left out exactly (a NaN or Inf in their rows never reaches ``summed``).
    Book-keeping's clip of the layers it materialises: their factors come from the norms of every
    layer. The cpp kernel accumulates in float64, one pass over each tensor.

    Args:
        per_example: per-example gradients, tensor k of shape (B, *shape_k).
        summed: accumulators, tensor k of shape shape_k; updated in place.
        scale: (B,) factors.
        backend: ``"auto"``, ``"reference"`` or ``"cpp"``.
    """
    op = "scaled_accumulate_"
    per_example, summed = list(per_example), list(summed)
    batch = _check_accumulators(op, per_example, summed)
    check_scale(op, scale, batch)
    device = _one_device(op, per_example + summed + [scale])
    backend = _backend.resolve(op, backend, device, per_example, summed, scale)
    _scaled_accumulate_(per_example, summed, scale, backend)

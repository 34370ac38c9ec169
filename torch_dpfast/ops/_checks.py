"""Argument checks and small helpers shared by the ops."""

from __future__ import annotations

import torch


def norm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Norms accumulate in float32, or float64 when any input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")
    return first


def check_scale(op: str, scale: torch.Tensor, batch: int) -> None:
    if not isinstance(scale, torch.Tensor) or scale.shape != (batch,):
        shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{op}: scale must be a tensor of shape (B,) = ({batch},), got {shape}")


def check_mask(op: str, mask: torch.Tensor | None, batch: int) -> None:
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (batch,)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must be a tensor of shape (B,) = ({batch},), got {shape}")


def check_method(op: str, method: str) -> None:
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"{op}: method must be 'auto', 'ghost' or 'direct', got {method!r}")


def norm_method(method: str, t: int, d_in: int, d_out: int) -> str:
    """Resolves ``method="auto"`` with the cost model of docs/ops.md.

    Per example, the ghost norm costs T^2 (d_in + d_out) multiply-adds (two T x T Grams) and the
    direct norm T d_in d_out (the d_out x d_in gradient); ghost wins when T (d_in + d_out) <=
    d_in d_out.
    """
    if method != "auto":
        return method
    return "ghost" if t * (d_in + d_out) <= d_in * d_out else "direct"


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def drop_unscaled_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Makes the examples with scale == 0 (rows of x, (B, ...)) safe to multiply by their zero
    scale: zeroed where they hold a NaN or Inf (0 * inf = NaN would leak into the sum). Callers
    multiply every row by its scale (directly, or through the other operand of a product).

    On CPU, where checking needs no device synchronisation, x itself is returned when those
    rows are finite, the common case (padding rows of a physical batch): multiplying them by 0
    gives exactly 0, without a pass over all of x."""
    keep = scale != 0
    if x.device.type == "cpu":
        dropped = (~keep).nonzero().squeeze(1).tolist()
        if not dropped:
            return x
        first, count = dropped[0], len(dropped)
        rows = (  # the padding rows of a physical batch are its last ones: a view, no copy
            x.narrow(0, first, count)
            if dropped[-1] - first == count - 1
            else x.index_select(0, torch.tensor(dropped))
        )
        if bool(torch.isfinite(rows.sum())):  # NaN or Inf anywhere makes the sum non-finite
            return x
    keep = keep.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

"""Per-example gradient norms and clipped sums of conv1d/2d/3d weights (any stride, padding
incl. 'same', dilation, groups).

A convolution is a linear map on unfolded input patches: with T output positions, group j sees
a_ij (T x C_in/groups * prod(k)) and g_ij (T x C_out/groups), and the per-example gradient of its
weight slice is g_ij^T a_ij. The norm sums over groups; the clipped sum is laid out like the
weight, (C_out, C_in/groups, *kernel_size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import _backend
from ._checks import (
    accumulation_dtype,
    check_floating,
    check_method,
    check_same_device,
    check_scale,
    drop_unscaled_rows,
    norm_dtype,
    norm_method,
)

IntOrTuple = int | Sequence[int]


def _tuple(op: str, name: str, value: IntOrTuple, n: int) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{op}: {name} must be an int or {n} ints for conv{n}d, got {value!r}")
    return values


def conv_geometry(
    op: str,
    x: Tensor,
    g: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    padding: IntOrTuple | str,
    dilation: IntOrTuple,
    groups: int,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Checks a conv's arguments against x (B, C_in, *S) and g (B, C_out, *S_out).

    Returns (kernel_size, stride, padding, dilation) as lists, padding as (left, right) per
    spatial dim, so 'same' with an even kernel pads as PyTorch does (extra on the right).
    """
    check_floating(op, x=x, g=g)
    n = x.dim() - 2
    if n not in (1, 2, 3) or g.dim() != x.dim() or g.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: x must be (B, C_in, *spatial) and g (B, C_out, *spatial_out) with 1-3 spatial "
            f"dims and the same B, got x {tuple(x.shape)} and g {tuple(g.shape)}"
        )
    kernel = _tuple(op, "kernel_size", kernel_size, n)
    strides = _tuple(op, "stride", stride, n)
    dil = _tuple(op, "dilation", dilation, n)
    if min(kernel + strides + dil) < 1:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be >= 1")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * n)
        elif padding == "same":
            if any(s != 1 for s in strides):
                raise ValueError(f"{op}: padding='same' needs stride 1, got stride {strides}")
            pads = []
            for k, d in zip(kernel, dil):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or {n} ints")
    else:
        pads = [p for p in _tuple(op, "padding", padding, n) for _ in range(2)]
    c_in, c_out = x.shape[1], g.shape[1]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"{op}: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    expected = [
        (x.shape[2 + i] + pads[2 * i] + pads[2 * i + 1] - dil[i] * (kernel[i] - 1) - 1)
        // strides[i]
        + 1
        for i in range(n)
    ]
    if list(g.shape[2:]) != expected:
        raise ValueError(
            f"{op}: g has spatial shape {tuple(g.shape[2:])} but this conv maps x "
            f"{tuple(x.shape)} to spatial shape {tuple(expected)}"
        )
    return kernel, strides, pads, dil


def pad_arguments(pads: list[int]) -> list[int]:
    """Per-dim (left, right) pads, first spatial dim first, as F.pad takes them (last first)."""
    return [p for i in reversed(range(len(pads) // 2)) for p in (pads[2 * i], pads[2 * i + 1])]


def unfold_patches(
    x: Tensor, kernel: list[int], stride: list[int], pads: list[int], dilation: list[int]
) -> Tensor:
    """Input patches of a conv: x (B, C, *S) -> (B, T, C, prod(kernel)), T output positions."""
    n = len(kernel)
    x = F.pad(x, pad_arguments(pads))
    for i in range(n):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(..., *[slice(None, None, d) for d in dilation])]  # (B, C, *S_out, *kernel)
    order = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    batch, channels, positions = x.shape[0], x.shape[1], math.prod(x.shape[2 : 2 + n])
    return x.permute(order).reshape(batch, positions, channels, math.prod(kernel))


def _grouped(x: Tensor, g: Tensor, geometry: tuple, groups: int) -> tuple[Tensor, Tensor]:
    """a (B, T, groups, C_in/groups * K) and g (B, T, groups, C_out/groups)."""
    patches = unfold_patches(x, *geometry)
    batch, positions = patches.shape[:2]
    a = patches.reshape(batch, positions, groups, patches.shape[2] // groups * patches.shape[3])
    g = g.reshape(batch, groups, g.shape[1] // groups, positions).permute(0, 3, 1, 2)
    return a, g


# ---------------------------------------------------------------- conv_norm_sq


@_backend.custom_op("torch_dpfast::conv_norm_sq", mutates_args=())
def _conv_norm_sq(
    x: Tensor,
    g: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    method: str,
    backend: str,
) -> Tensor:
    geometry = (kernel_size, stride, padding, dilation)
    return _backend.run("conv_norm_sq", backend, x, g, geometry, groups, method)


@_conv_norm_sq.register_fake
def _(x, g, kernel_size, stride, padding, dilation, groups, method, backend) -> Tensor:
    return x.new_empty(x.shape[0], dtype=norm_dtype(x, g))


@_backend.register("conv_norm_sq", "reference")
def conv_norm_sq_reference(x: Tensor, g: Tensor, geometry: tuple, groups: int, method: str):
    """Reference on unfolded patches: per group, ghost <a a^T, g g^T> or direct ||g^T a||^2."""
    dtype = norm_dtype(x, g)
    a, g = _grouped(x.to(dtype), g.to(dtype), geometry, groups)
    a, g = a.transpose(1, 2), g.transpose(1, 2)  # (B, groups, T, d)
    if method == "ghost":
        return ((a @ a.mT) * (g @ g.mT)).sum(dim=(1, 2, 3))
    return (g.mT @ a).square().sum(dim=(1, 2, 3))


if _ext.has_kernel("linear_norm_sq", "CPU"):

    @_backend.register("conv_norm_sq", "cpp")
    def conv_norm_sq_cpp(x: Tensor, g: Tensor, geometry: tuple, groups: int, method: str):
        """The C++ linear kernel on unfolded patches, the groups folded into the batch."""
        a, g = _grouped(x, g, geometry, groups)  # (B, T, groups, d)
        batch, positions = a.shape[:2]
        a = a.transpose(1, 2).reshape(batch * groups, positions, a.shape[3])
        g = g.transpose(1, 2).reshape(batch * groups, positions, g.shape[3])
        norms = torch.ops.dpfast_C.linear_norm_sq(a, g, method)
        return norms.view(batch, groups).sum(dim=1)


def conv_norm_sq(
    x: Tensor,
    g: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    method: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """Squared norm of each example's conv weight gradient (conv1d, conv2d or conv3d).

    Args:
        x: conv input, (B, C_in, *S) with 1, 2 or 3 spatial dims (zero padding; pad other modes
            beforehand and pass padding=0).
        g: gradient of the conv output, (B, C_out, *S_out).
        kernel_size, stride, padding, dilation, groups: as in ``torch.nn.Conv{1,2,3}d``;
            padding may be 'same' or 'valid'.
        method: ``"ghost"``, ``"direct"`` or ``"auto"`` (cost model with T = prod(S_out),
            d_in = C_in/groups * prod(kernel_size), d_out = C_out/groups).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B,) float32 (float64 for float64 inputs).
    """
    op = "conv_norm_sq"
    kernel, strides, pads, dil = conv_geometry(
        op, x, g, kernel_size, stride, padding, dilation, groups
    )
    check_method(op, method)
    device = check_same_device(op, x=x, g=g)
    d_in = x.shape[1] // groups * math.prod(kernel)
    method = norm_method(method, math.prod(g.shape[2:]), d_in, g.shape[1] // groups)
    geometry = (kernel, strides, pads, dil)
    backend = _backend.resolve(op, backend, device, x, g, geometry, groups, method)
    return _conv_norm_sq(x, g, kernel, strides, pads, dil, groups, method, backend)


# ---------------------------------------------------------------- conv_clipped_sum


@_backend.custom_op("torch_dpfast::conv_clipped_sum", mutates_args=())
def _conv_clipped_sum(
    x: Tensor,
    g: Tensor,
    scale: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
) -> Tensor:
    geometry = (kernel_size, stride, padding, dilation)
    return _backend.run("conv_clipped_sum", backend, x, g, scale, geometry, groups)


@_conv_clipped_sum.register_fake
def _(x, g, scale, kernel_size, stride, padding, dilation, groups, backend) -> Tensor:
    return x.new_empty(g.shape[1], x.shape[1] // groups, *kernel_size)


@_backend.register("conv_clipped_sum", "reference")
def conv_clipped_sum_reference(x: Tensor, g: Tensor, scale: Tensor, geometry: tuple, groups: int):
    """Reference: sum_i scale_i g_ij^T a_ij per group, laid out as the conv weight."""
    out_dtype, acc = x.dtype, accumulation_dtype(x)
    scale = scale.to(acc)
    x = drop_unscaled_rows(x.to(acc), scale)
    g = drop_unscaled_rows(g.to(acc), scale) * scale.reshape(-1, *([1] * (g.dim() - 1)))
    a, g = _grouped(x, g, geometry, groups)
    summed = torch.einsum("btgo,btgi->goi", g, a)
    return summed.reshape(-1, x.shape[1] // groups, *geometry[0]).to(out_dtype)


if _ext.has_kernel("linear_clipped_sum", "CPU"):

    @_backend.register(
        "conv_clipped_sum", "cpp", prefer=lambda x, g, scale, geometry, groups: groups == 1
    )
    def conv_clipped_sum_cpp(x: Tensor, g: Tensor, scale: Tensor, geometry: tuple, groups: int):
        """The C++ linear kernel on unfolded patches, one call per group (``auto`` takes it for
        groups = 1 only: the reference sums all groups in one batched product)."""
        a, g = _grouped(x, g, geometry, groups)
        summed = torch.stack(
            [
                torch.ops.dpfast_C.linear_clipped_sum(a[:, :, j], g[:, :, j], scale)
                for j in range(groups)
            ]
        )
        return summed.reshape(-1, x.shape[1] // groups, *geometry[0])


def conv_clipped_sum(
    x: Tensor,
    g: Tensor,
    scale: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Book-keeping clipped sum of conv weight gradients, sum_i scale_i G_i.

    Examples with ``scale_i == 0`` contribute exactly nothing, even with non-finite x_i or g_i.

    Args:
        x, g, kernel_size, stride, padding, dilation, groups: as in :func:`conv_norm_sq`.
        scale: per-example factors, (B,).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (C_out, C_in/groups, *kernel_size) in the dtype of ``x``.
    """
    op = "conv_clipped_sum"
    kernel, strides, pads, dil = conv_geometry(
        op, x, g, kernel_size, stride, padding, dilation, groups
    )
    check_scale(op, scale, x.shape[0])
    device = check_same_device(op, x=x, g=g, scale=scale)
    geometry = (kernel, strides, pads, dil)
    backend = _backend.resolve(op, backend, device, x, g, scale, geometry, groups)
    return _conv_clipped_sum(x, g, scale, kernel, strides, pads, dil, groups, backend)

"""nn.Conv1d/2d/3d: x (B, C_in, *S), g (B, C_out, *S_out). The weight through the conv ops of
``ops`` (all strides, paddings incl. 'same', dilations, groups); non-zero padding modes pad x
first. The bias gradient of example i is g_i summed over output positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext, ops
from ..ops.conv import conv_geometry, pad_arguments, unfold_patches
from ._fastest import fastest
from ._registry import Rule, bound_dtype, register_rule, row_norms, scaled_sum, zero_norms
from .linear import plan_linear


def _conv_args(module: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
    """The input as the conv's weight sees it (padded for reflect/replicate/circular) and the
    keyword arguments of the conv ops."""
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    return x, dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=module.groups,
    )


def _spatial_sum(g: Tensor, out: Tensor | None = None) -> Tensor:
    """(B, C, *S) -> (B, C), written into ``out`` if given."""
    if g.dim() == 2 and out is None:
        return g
    return torch.sum(g.reshape(*g.shape[:2], -1), dim=2, out=out)


def patch_norms(x: Tensor, kwargs: dict) -> Tensor:
    """(B, T) float64 norms of the input patches the conv's weight sees at each of its T output
    positions, over all input channels: a conv of sum_c x_c^2 with an all-ones kernel (in
    bound_dtype: float32 unless x is float64)."""
    squares = x.to(bound_dtype(x)).square().sum(dim=1, keepdim=True)
    ones = squares.new_ones(1, 1, *kwargs["kernel_size"])
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    sums = conv(squares, ones, None, kwargs["stride"], kwargs["padding"], kwargs["dilation"])
    return sums.flatten(1).clamp_min(0).sqrt().to(torch.float64)


def conv_bound_sq(x: Tensor, g: Tensor, kwargs: dict, weight: bool, bias: bool) -> Tensor:
    """(B,) float64 squared upper bound of an example's conv weight and bias gradient norms,
    (sum_t ||g_t|| ||patch_t||)^2 + (sum_t ||g_t||)^2 (a grouped conv's block-diagonal gradient
    is bounded by the same sum); x as the weight sees it (_conv_args), g (B, C_out, *S_out)."""
    g_norms = row_norms(g.flatten(2), dim=1)  # (B, T)
    total = g_norms.new_zeros(g.shape[0])
    if weight:
        total = total + (patch_norms(x, kwargs) * g_norms).sum(dim=1).square()
    if bias:
        total = total + g_norms.sum(dim=1).square()
    return total


# How the per-example weight gradients of a conv are computed (``_gradient_path``). Measured on
# the 2-core CPU at batch 8 against the batch's own weight gradient (oneDNN, one call): a
# depthwise conv's are fastest as one forward convolution with the output gradients as kernels
# (``_weight_grads_correlated``; 7x7 at 56x56: 2.6 ms, the batch's weight gradient 28 ms, the
# batch folded into the groups 11 ms); an ungrouped conv with a kernel larger than 1 is as fast
# as the batch's when the batch is folded into the groups up to FOLDED_MAX_CHANNELS channels
# (3x3, 96 channels at 56x56: 22.5 ms, the batch's 22.5; at 256 channels folding is 2x slower),
# and nearly so by one weight-gradient convolution per example up to BY_EXAMPLE_MAX_WEIGHT
# weight values (3x3, 256 channels at 14x14: 11.8 ms against 11.2; 512 channels at 7x7: 4x
# slower); the batched GEMM over unfolded patches pays for a prod(kernel)-larger copy of the
# input (1.5-4x slower) and is left for the rest and for 1x1 convs (a transposed view, no copy:
# as fast as the batch's). Grouped convs with several input channels per group are folded.
# Stems (a few input channels, large maps) go by example: 7x7, 3 -> 64 channels, stride 2 at
# 224x224: 15.7 ms against 27.7 folded (the batch's: 13.3); 3x3, 3 -> 32: 3.6 against 8.5.
# A depthwise conv whose input holds DEPTHWISE_KERNEL_MIN_INPUT values or more takes the faster,
# timed once per shape (rules/_fastest.py), of oneDNN's path and a compiled kernel
# (csrc/cpu/depthwise_grads.cpp): oneDNN's correlation falls off a cliff on some such shapes
# and not on others (batch 8, 3x3 at 56x56: 32 channels 0.48 ms, 128 channels 17.6 ms, the
# kernel 2.3 ms; 7x7, 64 channels at 56x56, batch 12: oneDNN 6.9 ms, the kernel 14.8 ms; 5x5,
# 240 channels at 28x28, batch 16: 5.8 against 15.1), and below it was faster every time
# measured (5x5, 128 channels at 28x28, batch 8: 0.7 ms against 2.2).
DEPTHWISE_KERNEL_MIN_INPUT = 1 << 20
FOLDED_MAX_CHANNELS = 192
BY_EXAMPLE_MAX_INPUT_CHANNELS = 4
BY_EXAMPLE_MAX_WEIGHT = 1 << 20
# Output positions from which a depthwise/grouped weight gradient runs channels-last on CPU.
MIN_POSITIONS_CHANNELS_LAST = 512


def weight_grads(module: nn.Module, x: Tensor, g: Tensor, out: Tensor | None = None) -> Tensor:
    """(B, *weight.shape) materialised per-example gradients of the conv weight (written into
    ``out`` if given): on CPU a depthwise conv's as one forward convolution with the output
    gradients as kernels; one grouped convolution backward with the batch folded into the
    groups (grouped convs; on CPU narrow ones too); one weight-gradient convolution per example
    (on CPU); or one batched GEMM g_i a_i over the input patches (see _gradient_path)."""
    dtype = torch.promote_types(x.dtype, g.dtype)  # autocast: float32 x, bfloat16 g
    x, kwargs = _conv_args(module, x.to(dtype))
    g = g.to(dtype)
    geometry = conv_geometry("conv rule", x, g, **kwargs)
    path = _gradient_path(module, x, geometry)
    if path == "depthwise_fastest" and not (x.requires_grad or g.requires_grad):
        grads = _weight_grads_fastest_depthwise(module, x, g, geometry)
        return grads if out is None else out.view(grads.shape).copy_(grads)
    if path == "depthwise_kernel":
        return _weight_grads_depthwise(module, x, g, geometry, out)
    if path == "depthwise_fastest":  # inputs requiring grad: oneDNN's path
        path = _onednn_depthwise_path(geometry)
    if path == "by_example":
        return _weight_grads_by_example(module, x, g, geometry, out)
    if path in ("folded", "correlated"):
        compute = _weight_grads_folded if path == "folded" else _weight_grads_correlated
        grads = compute(module, x, g, geometry)
        return grads if out is None else out.view(grads.shape).copy_(grads)
    batch = x.shape[0]
    rows = g.reshape(batch, module.out_channels, -1)  # (B, C_out, T)
    target = None if out is None else out.view(*rows.shape[:2], -1)
    grads = torch.bmm(rows, _patch_rows(x, geometry), out=target)
    return grads.view(batch, *module.weight.shape)


def _gradient_path(module: nn.Module, x: Tensor, geometry) -> str:
    """One of "depthwise_fastest" (the faster of oneDNN's and the compiled kernel's, see
    :data:`DEPTHWISE_KERNEL_MIN_INPUT`), "correlated", "folded", "by_example", "gemm" (see
    :data:`FOLDED_MAX_CHANNELS`)."""
    if module.groups > 1:
        one_input = module.in_channels == module.groups  # depthwise (any channel multiplier)
        if one_input and _depthwise_kernel_runs(x):
            return "depthwise_fastest"
        if one_input and x.device.type == "cpu":
            return _onednn_depthwise_path(geometry)
        return "folded"
    kernel, _, pads, _ = geometry
    if x.device.type != "cpu" or math.prod(kernel) == 1:
        return "gemm"
    symmetric = pads[0::2] == pads[1::2]
    if module.in_channels <= BY_EXAMPLE_MAX_INPUT_CHANNELS and symmetric:
        return "by_example"
    if max(module.in_channels, module.out_channels) <= FOLDED_MAX_CHANNELS:
        return "folded"
    if module.weight.numel() <= BY_EXAMPLE_MAX_WEIGHT and symmetric:
        return "by_example"
    return "gemm"


def _onednn_depthwise_path(geometry) -> str:
    """ "correlated", or "folded" for a strided conv with kernels up to 3: there the dilated
    correlation is slower than folding (3x3, stride 2, 96 channels at 112x112: 35 ms against
    24 ms folded; 5x5 at 56x56: 6 ms against 25 ms)."""
    kernel, strides = geometry[0], geometry[1]
    return "folded" if max(kernel) <= 3 and max(strides) > 1 else "correlated"


def _weight_grads_fastest_depthwise(module, x, g, geometry) -> Tensor:
    """(B, *weight.shape) by the compiled kernel or oneDNN's path, whichever ran faster the
    first time this shape was met (rules/_fastest.py)."""
    onednn = _onednn_depthwise_path(geometry)
    compute = _weight_grads_folded if onednn == "folded" else _weight_grads_correlated
    key = ("depthwise", tuple(x.shape), tuple(g.shape), x.dtype, module.groups,
           *(tuple(part) for part in geometry), torch.get_num_threads())  # fmt: skip
    ways = {
        "depthwise_kernel": lambda: _weight_grads_depthwise(module, x, g, geometry),
        onednn: lambda: compute(module, x, g, geometry),
    }
    return fastest(key, ways)


def _depthwise_kernel_runs(x: Tensor) -> bool:
    """Whether the compiled depthwise kernel takes a depthwise conv's input x: CPU, float32 or
    float64, 1 or 2 spatial dims, at least DEPTHWISE_KERNEL_MIN_INPUT values."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() in (3, 4)
        and x.numel() >= DEPTHWISE_KERNEL_MIN_INPUT
        and _ext.has_kernel("depthwise_weight_grads", "CPU")
    )


def _weight_grads_depthwise(module, x, g, geometry, out=None) -> Tensor:
    """(B, *weight.shape) by the compiled kernel: each example's weight gradient
    G_i[o, 0, k] = sum_t g_i[o, t] x_i[o / M, stride t - pad + dilation k] (M = C_out / C_in),
    one thread per (example, channel) plane; a 1-d conv as a 2-d one of height 1."""
    kernel, strides, pads, dilation = geometry
    if x.dim() == 3:
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, strides, pads, dilation = [1, *kernel], [1, *strides], [0, 0, *pads], [1, *dilation]
    grads = torch.ops.dpfast_C.depthwise_weight_grads(x, g, kernel, strides, pads[0::2], dilation)
    grads = grads.view(x.shape[0], *module.weight.shape)
    return grads if out is None else out.view(grads.shape).copy_(grads)


def _patch_rows(x: Tensor, geometry) -> Tensor:
    """(B, T, C_in prod(kernel)) input patches; for a 1x1 conv with stride 1 and no padding a
    transposed view of x (no copy: the GEMM reads it transposed)."""
    kernel, strides, pads, _ = geometry
    if math.prod(kernel) == 1 and set(strides) == {1} and not any(pads):
        return x.flatten(2).transpose(1, 2)
    patches = unfold_patches(x, *geometry)
    return patches.reshape(*patches.shape[:2], -1)


def _weight_grads_correlated(module, x, g, geometry) -> Tensor:
    """(B, *weight.shape) as one forward convolution: example i's weight gradient
    G_i[o, c, k] = sum_t g_i[o, t] x_i[c, stride t + dilation k] is the cross-correlation of
    its padded input with its output gradient, so a grouped conv over x' = (C_in/G, B G, *S)
    (input channels of a group as the batch) with g as the kernel, (B C_out, 1, *S_out), B G
    groups, stride and dilation swapped, computes every example's at once (the first
    prod(kernel) outputs per spatial dim; more when the stride does not divide the padded
    input)."""
    kernel, strides, pads, dilation = geometry
    if any(pads):
        x = F.pad(x, pad_arguments(pads))
    batch, groups = x.shape[0], module.groups
    per_group = x.shape[1] // groups
    folded_x = x.reshape(batch * groups, per_group, *x.shape[2:]).transpose(0, 1)
    folded_g = g.reshape(batch * g.shape[1], 1, *g.shape[2:])
    n = len(kernel)
    out = torch.ops.aten.convolution(
        folded_x, folded_g, None, list(dilation), [0] * n, list(strides), False, [0] * n,
        batch * groups,
    )  # fmt: skip  # (C_in/G, B C_out, *K')
    out = out[(..., *[slice(0, k) for k in kernel])]
    out = out.reshape(per_group, batch, g.shape[1], *kernel)
    return out.permute(1, 2, 0, *range(3, 3 + n))


def _weight_grads_folded(module, x, g, geometry) -> Tensor:
    """(B, *weight.shape) with the batch folded into the groups: B G groups of one conv over
    x (1, B C_in, *S), whose weight gradient is every example's (ATen's convolution backward,
    weight only: no k^2-larger copy of the input)."""
    pads = geometry[2]
    if pads[0::2] != pads[1::2]:  # 'same' with an even kernel: pad as the conv did
        x = F.pad(x, pad_arguments(pads))
        pads = [0] * len(pads)
    batch = x.shape[0]
    folded_x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    folded_g = g.reshape(1, batch * g.shape[1], *g.shape[2:])
    large = math.prod(g.shape[2:]) >= MIN_POSITIONS_CHANNELS_LAST
    if x.device.type == "cpu" and module.groups > 1 and x.dim() in (4, 5) and large:
        # oneDNN's grouped weight gradient is 2-4x faster channels-last on large maps
        # (depthwise 7x7, batch 8, 2 cores: 56x56 9 ms against 33 ms, 28x28 faster too) and
        # slower on small ones (14x14: 4x slower); with the batch as the only groups, slower
        layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        folded_x = folded_x.contiguous(memory_format=layout)
        folded_g = folded_g.contiguous(memory_format=layout)
    shape = module.weight.shape
    weight = x.new_empty(batch * shape[0], *shape[1:])  # only its shape is read
    grad = _weight_gradient(folded_g, folded_x, weight, geometry, pads, batch * module.groups)
    return grad.view(batch, *shape)


def _weight_gradient(g: Tensor, x: Tensor, weight: Tensor, geometry, pads, groups: int) -> Tensor:
    """The conv's weight gradient for input x and output gradient g (ATen's convolution
    backward, weight only; ``weight`` gives the shape and dtype); ``pads`` symmetric."""
    _, strides, _, dilation = geometry
    _, grad, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, strides, pads[0::2], dilation, False, [0] * len(strides), groups,
        [False, True, False],
    )  # fmt: skip
    return grad


def _weight_grads_by_example(module, x, g, geometry, out=None) -> Tensor:
    """(B, *weight.shape): example i's weight gradient as the weight gradient of the conv on
    x[i:i+1] with output gradient g[i:i+1] (ATen's convolution backward, weight only)."""
    batch = x.shape[0]
    shape = (batch, *module.weight.shape)
    out = x.new_empty(shape) if out is None else out.view(shape)
    weight = module.weight.detach().to(x.dtype)  # only its shape and dtype are read
    groups = module.groups
    for i in range(batch):
        grad = _weight_gradient(g[i : i + 1], x[i : i + 1], weight, geometry, geometry[2], groups)
        out[i].copy_(grad)
    return out


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    def per_example_grads(self, module, x, g, out=None):
        out = {} if out is None else out
        grads = {}
        if module.weight.requires_grad:
            grads["weight"] = weight_grads(module, x, g, out.get("weight"))
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = _spatial_sum(g, out.get("bias"))
        return grads

    def plan(self, module, x, out, clipping):
        t = math.prod(out.shape[2:])
        d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        method, cost = plan_linear(clipping, t, d_in, module.out_channels // module.groups)
        return method, cost * module.groups

    def materialise_saving(self, module, x, g):
        if not module.weight.requires_grad:
            return None
        trainable_bias = module.bias is not None and module.bias.requires_grad
        return self.plan(module, x, g, "auto")[1], module.weight.numel() + (
            module.out_channels if trainable_bias else 0
        )

    def norm_sq(self, module, x, g, method="auto"):
        x, kwargs = _conv_args(module, x)
        total = zero_norms(g)
        if module.weight.requires_grad:
            total = total + ops.conv_norm_sq(x, g, method=method, **kwargs)
        if module.bias is not None and module.bias.requires_grad:
            total = total + _spatial_sum(g.to(total.dtype)).square().sum(dim=1)
        return total

    def norm_bound(self, module, x, g):
        x, kwargs = _conv_args(module, x)
        bias = module.bias is not None and module.bias.requires_grad
        return conv_bound_sq(x, g, kwargs, module.weight.requires_grad, bias).sqrt()

    def clipped_sums(self, module, x, g, scale):
        x, kwargs = _conv_args(module, x)
        out = {}
        if module.weight.requires_grad:
            summed = ops.conv_clipped_sum(x, g, scale, **kwargs)
            out["weight"] = summed.to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = scaled_sum(_spatial_sum(g), scale).to(module.bias.dtype)
        return out

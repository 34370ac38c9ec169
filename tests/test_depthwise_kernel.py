"""dpfast_C::depthwise_weight_grads (csrc/cpu/depthwise_grads.cpp) against each example's weight
gradient from ATen's convolution backward in float64: random geometries (odd sizes, strides 1-3,
dilations, paddings up to past the kernel's reach, channel multipliers), float32 and float64,
non-contiguous inputs, and the shape errors."""

import pytest
import torch

from torch_dpfast import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("depthwise_weight_grads", "CPU"), reason="torch_dpfast._C is not built"
)


def _reference(x, g, kernel, stride, padding, dilation):
    """(B, C_out, kh, kw): example i's gradient of a groups = C_in conv, in float64."""
    x, g = x.double(), g.double()
    channels, outputs = x.shape[1], g.shape[1]
    weight = torch.empty(outputs, 1, *kernel, dtype=torch.float64)
    grads = [
        torch.ops.aten.convolution_backward(
            g[i : i + 1], x[i : i + 1], weight, None, stride, padding, dilation,
            False, [0, 0], channels, [False, True, False],
        )[1]
        for i in range(x.shape[0])
    ]  # fmt: skip
    return torch.stack(grads).squeeze(2)


def _geometry(gen):
    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    kernel = [pick(1, 5), pick(1, 5)]
    stride, dilation = [pick(1, 3), pick(1, 3)], [pick(1, 2), pick(1, 2)]
    padding = [pick(0, k * d) for k, d in zip(kernel, dilation)]
    size = [pick(k * d, k * d + 13) for k, d in zip(kernel, dilation)]
    return kernel, stride, padding, dilation, size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trial", range(12))
def test_matches_each_examples_convolution_backward(dtype, trial, gen):
    kernel, stride, padding, dilation, size = _geometry(gen)
    batch, channels = int(torch.randint(1, 4, (1,), generator=gen)), 3
    multiplier = 1 + trial % 2
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
    out_size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)
    ]
    g = torch.randn(batch, channels * multiplier, *out_size, generator=gen, dtype=torch.float64)
    got = torch.ops.dpfast_C.depthwise_weight_grads(
        x.to(dtype), g.to(dtype), kernel, stride, padding, dilation
    )
    assert got.dtype == dtype and got.shape == (batch, channels * multiplier, *kernel)
    want = _reference(x.to(dtype), g.to(dtype), kernel, stride, padding, dilation)
    tolerance = (
        dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    )
    torch.testing.assert_close(got.double(), want, **tolerance)


def test_non_contiguous_inputs_and_a_plane_the_kernel_never_reaches(gen):
    """Channels-last views are read as their values; padding 4 around a 1x1 window: taps whose
    every position lies in the padding sum to 0."""
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 13, 14, generator=gen, dtype=torch.float64)
    x_view = x.contiguous(memory_format=torch.channels_last)
    g_view = g.transpose(2, 3).contiguous().transpose(2, 3)
    got = torch.ops.dpfast_C.depthwise_weight_grads(x_view, g_view, [1, 1], [1, 1], [4, 4], [1, 1])
    torch.testing.assert_close(got, _reference(x, g, [1, 1], [1, 1], [4, 4], [1, 1]))


def test_errors_name_the_shapes():
    x, g = torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="multiple of its 3 channels"):
        torch.ops.dpfast_C.depthwise_weight_grads(x, g, [1, 1], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"\(B, C, H, W\)"):
        torch.ops.dpfast_C.depthwise_weight_grads(x[0], g[0], [1, 1], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="positive"):
        torch.ops.dpfast_C.depthwise_weight_grads(x, x, [1, 1], [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.dpfast_C.depthwise_weight_grads(x, x.double(), [1, 1], [1, 1], [0, 0], [1, 1])

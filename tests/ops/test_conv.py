"""conv_norm_sq and conv_clipped_sum against per-example autograd of F.conv{1,2,3}d in float64."""

import pytest
import torch
import torch.nn.functional as F

import torch_dpfast as dpf
from tests import brute_force
from tests.helpers import assert_close, backends, randn

# (input shape (B, C_in, *S), C_out, conv kwargs)
CONFIGS = [
    ((3, 2, 11), 5, dict(kernel_size=3)),
    ((2, 4, 9), 6, dict(kernel_size=4, stride=2, padding=1, dilation=2, groups=2)),
    ((4, 3, 7), 3, dict(kernel_size=2, padding="same")),
    ((2, 3, 7, 6), 5, dict(kernel_size=3, padding=1)),
    ((3, 4, 9, 7), 8, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ((2, 4, 6, 5), 8, dict(kernel_size=3, padding="same", groups=4)),  # depthwise, multiplier 2
    ((2, 3, 6, 6), 3, dict(kernel_size=(2, 4), padding="same", dilation=(2, 1))),  # even kernel
    ((1, 2, 5, 5), 4, dict(kernel_size=5, padding="valid")),  # T = 1
    ((0, 2, 5, 5), 4, dict(kernel_size=3)),  # empty batch
    ((2, 2, 5, 4, 6), 3, dict(kernel_size=(3, 2, 3), stride=(1, 2, 2), padding=(1, 0, 1))),
    ((2, 4, 4, 5, 3), 4, dict(kernel_size=2, dilation=(1, 2, 1), groups=2)),
]


def _conv_kwargs(kwargs):
    return {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **kwargs}


def _inputs(x_shape, c_out, kwargs, gen, dtype, device):
    k = _conv_kwargs(kwargs)
    n = len(x_shape) - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    kernel = (k["kernel_size"],) * n if isinstance(k["kernel_size"], int) else k["kernel_size"]
    weight = torch.zeros(c_out, x_shape[1] // k["groups"], *kernel, dtype=torch.float64)
    probe = torch.zeros(1, *x_shape[1:], dtype=torch.float64)
    out_shape = conv(probe, weight, None, k["stride"], k["padding"], k["dilation"], k["groups"])
    x = randn(*x_shape, gen=gen, dtype=dtype, device=device)
    g = randn(x_shape[0], *out_shape.shape[1:], gen=gen, dtype=dtype, device=device)
    return x, g, k


@pytest.mark.parametrize("x_shape,c_out,kwargs", CONFIGS)
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_sq_matches_per_example_autograd(x_shape, c_out, kwargs, method, dtype, device, gen):
    x, g, k = _inputs(x_shape, c_out, kwargs, gen, dtype, device)
    expected = brute_force.norms_sq(brute_force.conv_grads(x, g, **k))
    for backend in backends("conv_norm_sq", device, dtype):
        out = dpf.ops.conv_norm_sq(x, g, method=method, backend=backend, **k)
        assert out.shape == (x.shape[0],)
        assert_close(out, expected, dtype, scale=x[0:1].numel() * g[0:1].numel() + 1)


@pytest.mark.parametrize("x_shape,c_out,kwargs", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clipped_sum_matches_per_example_autograd(x_shape, c_out, kwargs, dtype, device, gen):
    x, g, k = _inputs(x_shape, c_out, kwargs, gen, dtype, device)
    scale = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
    scale[1::2] = 0.0
    expected = brute_force.clipped_sum(brute_force.conv_grads(x, g, **k), scale)
    for backend in backends("conv_clipped_sum", device, dtype):
        out = dpf.ops.conv_clipped_sum(x, g, scale.to(device), backend=backend, **k)
        assert out.shape == expected.shape and out.dtype == dtype
        assert_close(out, expected, dtype, scale=x[0:1].numel() * g[0:1].numel() + 1)


def test_clipped_sum_drops_non_finite_examples_with_zero_scale(device, gen):
    x, g, k = _inputs((3, 2, 6, 6), 4, dict(kernel_size=3, padding=1), gen, torch.float32, device)
    x[1, 0, 2, 2] = float("nan")
    scale = torch.tensor([1.0, 0.0, 0.5], device=device)
    out = dpf.ops.conv_clipped_sum(x, g, scale, **k)
    expected = brute_force.clipped_sum(
        brute_force.conv_grads(x[[0, 2]], g[[0, 2]], **k), scale[[0, 2]]
    )
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32, scale=100)


def test_bad_arguments_name_the_problem():
    x, g = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 6, 6)
    with pytest.raises(ValueError, match="maps x"):
        dpf.ops.conv_norm_sq(x, g, kernel_size=2)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        dpf.ops.conv_norm_sq(x, g, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        dpf.ops.conv_norm_sq(x, g, kernel_size=3, stride=2, padding="same")
    with pytest.raises(ValueError, match="kernel_size must be an int or 2 ints"):
        dpf.ops.conv_norm_sq(x, g, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="1-3 spatial dims"):
        dpf.ops.conv_norm_sq(torch.randn(2, 4), torch.randn(2, 6), kernel_size=1)


def test_ops_trace_under_torch_compile_and_pass_opcheck(device, gen):
    x, g, k = _inputs(
        (2, 4, 7, 6), 6, dict(kernel_size=3, padding=1, groups=2), gen, torch.float32, device
    )
    scale = torch.rand(2, generator=gen).to(device)

    def step(x, g, scale):
        return dpf.ops.conv_norm_sq(x, g, **k), dpf.ops.conv_clipped_sum(x, g, scale, **k)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, g, scale), step(x, g, scale)):
        torch.testing.assert_close(got, want)
    geometry = ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 2)
    for backend in backends("conv_norm_sq", device, torch.float32):
        torch.library.opcheck(
            torch.ops.torch_dpfast.conv_norm_sq, (x, g, *geometry, "ghost", backend)
        )
    for backend in backends("conv_clipped_sum", device, torch.float32):
        torch.library.opcheck(
            torch.ops.torch_dpfast.conv_clipped_sum, (x, g, scale, *geometry, backend)
        )

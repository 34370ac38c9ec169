"""linear_norm_sq and linear_clipped_sum against per-example autograd in float64."""

import pytest
import torch

import torch_dpfast as dpf
from tests import brute_force
from tests.helpers import INTERPRET, assert_close, backends, randn

# a's shape (B, *, d_in) and d_out: 2-D inputs, T = 1, zero batch, odd sizes, two middle dims.
SHAPES = [
    ((4, 7), 5),
    ((1, 1, 1), 1),
    ((0, 3, 4), 5),
    ((7, 1, 13), 5),
    ((5, 17, 3), 33),
    ((3, 2, 5, 6), 7),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _inputs(a_shape, d_out, gen, dtype, device):
    a = randn(*a_shape, gen=gen, dtype=dtype, device=device)
    g = randn(*a_shape[:-1], d_out, gen=gen, dtype=dtype, device=device)
    return a, g


@pytest.mark.parametrize("a_shape,d_out", SHAPES)
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_sq_matches_per_example_autograd(a_shape, d_out, method, dtype, device, gen):
    a, g = _inputs(a_shape, d_out, gen, dtype, device)
    expected = brute_force.norms_sq(brute_force.linear_grads(a, g))
    for backend in backends("linear_norm_sq", device, dtype):
        out = dpf.ops.linear_norm_sq(a, g, method=method, backend=backend)
        assert out.shape == (a.shape[0],) and out.device.type == device
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(out, expected, dtype, scale=a.shape[-1] * d_out)


@pytest.mark.parametrize("a_shape,d_out", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_sum_matches_per_example_autograd(a_shape, d_out, dtype, device, gen):
    a, g = _inputs(a_shape, d_out, gen, dtype, device)
    scale = torch.rand(a.shape[0], generator=gen, dtype=torch.float64)
    scale[::3] = 0.0
    expected = brute_force.clipped_sum(brute_force.linear_grads(a, g), scale)
    for backend in backends("linear_clipped_sum", device, dtype):
        out = dpf.ops.linear_clipped_sum(a, g, scale.to(device), backend=backend)
        assert out.shape == (d_out, a.shape[-1]) and out.dtype == dtype
        if dtype == torch.bfloat16:  # the result itself is rounded to bf16
            torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)
        else:
            assert_close(out, expected, dtype, scale=a.shape[0] * a.numel() ** 0.5)


# Shapes that cross the C++ kernels' block sizes (csrc/cpu/linear.cpp): T over one ghost tile
# of ~48 positions and not a multiple of it, a direct-norm block of 2^20 elements of G over the
# batch (B d_in d_out above it), and clipped-sum chunks of 2048 rows (T above it, so one example
# per chunk, and runs of kept examples broken by zero scales).
TILED_SHAPES = [
    ((2, 49, 6), 5),
    ((3, 97, 11), 4),
    ((1, 200, 3), 7),
    ((3, 5, 700), 600),
    ((5, 2100, 3), 2),
]


def _tiled_backends(op: str, device: str, a: torch.Tensor) -> list[str]:
    found = backends(op, device, torch.float32)
    if INTERPRET and device == "cpu" and a.numel() > 10_000:  # the interpreter is too slow
        found = [b for b in found if b != "triton"]
    return found


@pytest.mark.parametrize("a_shape,d_out", TILED_SHAPES)
def test_norms_and_clipped_sums_across_kernel_block_sizes(a_shape, d_out, device, gen):
    a, g = _inputs(a_shape, d_out, gen, torch.float32, device)
    grads = brute_force.linear_grads(a, g)
    expected_norms = brute_force.norms_sq(grads)
    scale = torch.rand(a.shape[0], generator=gen, dtype=torch.float64)
    scale[1::3] = 0.0
    expected_sum = brute_force.clipped_sum(grads, scale)
    for backend in _tiled_backends("linear_norm_sq", device, a):
        for method in ("ghost", "direct"):
            out = dpf.ops.linear_norm_sq(a, g, method=method, backend=backend)
            torch.testing.assert_close(out.double().cpu(), expected_norms, rtol=1e-4, atol=1e-3)
    for backend in _tiled_backends("linear_clipped_sum", device, a):
        out = dpf.ops.linear_clipped_sum(a, g, scale.to(device), backend=backend)
        torch.testing.assert_close(out.double().cpu(), expected_sum, rtol=1e-4, atol=1e-3)


# (B, T, d_in, d_out) for gradients g stored time-major, a (B, T, .) view of (T, B, .) memory
# (a recurrent layer's gate gradients): either side the narrower one, T past one chunk of steps
# (2048 rows: 1024 steps of 2 examples), one example per step.
TIME_MAJOR_SHAPES = [(3, 7, 5, 9), (4, 6, 11, 2), (2, 1100, 3, 4), (5, 3, 4, 4)]


@pytest.mark.parametrize("batch,steps,d_in,d_out", TIME_MAJOR_SHAPES)
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_sum_of_time_major_gradients(batch, steps, d_in, d_out, zeros, dtype, device, gen):
    """The C++ kernel reads time-major g in place when no scale is 0 (else example by example):
    both ways against brute force, float32 and float64; with zero scales a NaN in a dropped
    example's g must not reach the sum."""
    a, g_bt = _inputs((batch, steps, d_in), d_out, gen, dtype, device)
    g = g_bt.transpose(0, 1).contiguous().transpose(0, 1)
    scale = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5
    if zeros:
        scale[1] = 0.0
        g[1, steps // 2, 0] = float("nan")
    keep = scale != 0
    expected = brute_force.clipped_sum(brute_force.linear_grads(a[keep], g[keep]), scale[keep])
    found = backends("linear_clipped_sum", device, dtype)
    if INTERPRET and a.numel() > 10_000:  # the interpreter is too slow
        found = [b for b in found if b != "triton"]
    for backend in found:
        out = dpf.ops.linear_clipped_sum(a, g, scale.to(device), backend=backend)
        assert torch.isfinite(out).all(), backend
        assert_close(out, expected, dtype, scale=batch * a.numel() ** 0.5)


def test_norms_of_non_finite_examples_are_not_finite(device, gen):
    """A NaN or Inf anywhere in an example's a or g must reach its norm (so that its clip factor
    is 0), in every tile of the C++ ghost kernel and every block of the direct one."""
    for positions in (3, 97):
        for where in ("a_first", "a_last", "g_middle"):
            a, g = _inputs((3, positions, 5), 4, gen, torch.float32, device)
            if where == "a_first":
                a[1, 0, 2] = float("inf")
            elif where == "a_last":
                a[1, -1, 0] = float("nan")
            else:
                g[1, positions // 2, 3] = float("-inf")
            for backend in backends("linear_norm_sq", device, torch.float32):
                for method in ("ghost", "direct"):
                    out = dpf.ops.linear_norm_sq(a, g, method=method, backend=backend).cpu()
                    assert not torch.isfinite(out[1]), (backend, method, where, positions)
                    assert torch.isfinite(out[[0, 2]]).all(), (backend, method, where)


def test_clipped_sum_drops_non_finite_examples_with_zero_scale(device, gen):
    a, g = _inputs((5, 4, 6), 3, gen, torch.float32, device)
    a[1, 2, 0], g[3, 0, 1] = float("inf"), float("nan")
    scale = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.25], device=device)
    keep = [0, 2, 4]
    expected = brute_force.clipped_sum(brute_force.linear_grads(a[keep], g[keep]), scale[keep])
    for backend in backends("linear_clipped_sum", device, torch.float32):
        out = dpf.ops.linear_clipped_sum(a, g, scale, backend=backend)
        assert torch.isfinite(out).all()
        assert_close(out, expected, torch.float32, scale=10)


def test_auto_method_follows_the_cost_model():
    from torch_dpfast.ops._checks import norm_method

    assert norm_method("auto", 1, 768, 768) == "ghost"
    assert norm_method("auto", 197, 768, 3072) == "ghost"
    assert norm_method("auto", 3136, 64, 64) == "direct"
    assert norm_method("direct", 1, 8, 8) == "direct"


def test_bad_arguments_name_the_problem():
    a, g = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="agree in all but the last dim"):
        dpf.ops.linear_norm_sq(a, torch.randn(2, 5))
    with pytest.raises(ValueError, match="method must be"):
        dpf.ops.linear_norm_sq(a, g, method="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        dpf.ops.linear_norm_sq(a, g, backend="gpu")
    with pytest.raises(TypeError, match="floating-point"):
        dpf.ops.linear_norm_sq(a.long(), g)
    with pytest.raises(ValueError, match=r"scale must be a tensor of shape \(B,\)"):
        dpf.ops.linear_clipped_sum(a, g, torch.ones(4))


def test_ops_trace_under_torch_compile_and_pass_opcheck(device, gen):
    a, g = _inputs((3, 5, 4), 6, gen, torch.float32, device)
    scale = torch.rand(3, generator=gen).to(device)

    def step(a, g, scale):
        return dpf.ops.linear_norm_sq(a, g, "ghost"), dpf.ops.linear_clipped_sum(a, g, scale)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(a, g, scale), step(a, g, scale)):
        torch.testing.assert_close(got, want)
    for backend in backends("linear_norm_sq", device, torch.float32):
        for method in ("ghost", "direct"):
            torch.library.opcheck(torch.ops.torch_dpfast.linear_norm_sq, (a, g, method, backend))
    for backend in backends("linear_clipped_sum", device, torch.float32):
        torch.library.opcheck(torch.ops.torch_dpfast.linear_clipped_sum, (a, g, scale, backend))

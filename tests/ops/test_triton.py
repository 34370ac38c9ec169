"""Triton kernels on shapes that cross their tile boundaries (several T, d and row tiles, none a
multiple of a block), split-K, and per-precision accuracy on a GPU.

The op-level tests in this folder run every backend, Triton included, on small shapes; these
add the sizes that exercise off-diagonal tiles, loops and masks inside the kernels."""

import pytest
import torch

import torch_dpfast as dpf
from tests import brute_force
from tests.helpers import assert_close, backends, randn

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from torch_dpfast.ops.triton._common import round_to_tf32  # noqa: E402


@triton.jit
def _round_kernel(x_ptr, out_ptr):
    offsets = tl.arange(0, 16)
    tl.store(out_ptr + offsets, round_to_tf32(tl.load(x_ptr + offsets)))


def _need_triton(op, device):
    if "triton" not in backends(op, device, torch.float32):
        pytest.skip("no Triton backend for this device here")


@pytest.mark.parametrize("b,t,d_in,d_out", [(3, 130, 70, 45), (2, 1, 129, 65), (5, 67, 17, 200)])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_norm_across_tiles(b, t, d_in, d_out, method, device, gen):
    _need_triton("linear_norm_sq", device)
    a = randn(b, t, d_in, gen=gen, dtype=torch.float32, device=device)
    g = randn(b, t, d_out, gen=gen, dtype=torch.float32, device=device)
    expected = brute_force.norms_sq(brute_force.linear_grads(a, g))
    out = dpf.ops.linear_norm_sq(a, g, method, backend="triton")
    assert_close(out, expected, torch.float32, scale=t * t * d_in * d_out)


@pytest.mark.parametrize("splits", [1, 3])
def test_clipped_sum_across_tiles_and_splits(splits, device, gen):
    _need_triton("linear_clipped_sum", device)
    from torch_dpfast.ops.triton.clipped_sum import clipped_sum

    a = randn(7, 23, 70, gen=gen, dtype=torch.float32, device=device)
    g = randn(7, 23, 133, gen=gen, dtype=torch.float32, device=device)
    scale = torch.rand(7, generator=gen, dtype=torch.float64)
    scale[[1, 4]] = 0.0
    g[1, 3, 5] = float("nan")
    a[4, 0, 0] = float("inf")
    expected = brute_force.clipped_sum(brute_force.linear_grads(a, g), scale)
    out = clipped_sum(a[:, :, None], g[:, :, None], scale.to(device, torch.float32), splits)[0]
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32, scale=100)


def test_conv_across_tiles(device, gen):
    _need_triton("conv_norm_sq", device)
    kwargs = dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=2)
    x = randn(2, 6, 11, 13, gen=gen, dtype=torch.float32, device=device)  # T = 143
    g = randn(2, 4, 11, 13, gen=gen, dtype=torch.float32, device=device)
    grads = brute_force.conv_grads(x, g, **kwargs)
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    for method in ("ghost", "direct"):
        out = dpf.ops.conv_norm_sq(x, g, method=method, backend="triton", **kwargs)
        assert_close(out, brute_force.norms_sq(grads), torch.float32, scale=1e5)
    out = dpf.ops.conv_clipped_sum(x, g, scale.to(device), backend="triton", **kwargs)
    assert_close(out, brute_force.clipped_sum(grads, scale), torch.float32, scale=100)


def test_embedding_norm_across_tiles(device, gen):
    _need_triton("embedding_norm_sq", device)
    ids = torch.randint(0, 9, (3, 150), generator=gen).to(device)
    g = randn(3, 150, 37, gen=gen, dtype=torch.float32, device=device)
    for padding_idx in (None, 4):
        expected = brute_force.norms_sq(brute_force.embedding_grads(ids, g, 9, padding_idx))
        out = dpf.ops.embedding_norm_sq(ids, g, 9, padding_idx, backend="triton")
        assert_close(out, expected, torch.float32, scale=150 * 150)


def _relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double().cpu(), truth.double().cpu()
    return ((x - truth).norm() / truth.norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_precision_settings_on_gpu(precision, gen):
    """Each kernel's error against float64 is at most twice PyTorch's own error at the same
    input precision (TF32 matmuls; bf16-rounded inputs), plus a float32 floor."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = randn(16, 197, 256, gen=gen, dtype=torch.float32, device="cuda")
    g = randn(16, 197, 384, gen=gen, dtype=torch.float32, device="cuda")
    scale = torch.rand(16, generator=gen).cuda()
    truth_norm = dpf.ops.linear_norm_sq(a.double(), g.double(), "direct", "reference")
    truth_sum = dpf.ops.linear_clipped_sum(a.double(), g.double(), scale.double(), "reference")
    ref_a, ref_g = (a.bfloat16().float(), g.bfloat16().float()) if precision == "bf16" else (a, g)
    with dpf.precision("ieee" if precision == "bf16" else precision):
        torch_norm = {
            m: dpf.ops.linear_norm_sq(ref_a, ref_g, m, "reference") for m in ("ghost", "direct")
        }
        torch_sum = dpf.ops.linear_clipped_sum(ref_a, ref_g, scale, "reference")
    with dpf.precision(precision):
        for method in ("ghost", "direct"):
            out = dpf.ops.linear_norm_sq(a, g, method, "triton")
            bound = 2 * _relative_error(torch_norm[method], truth_norm) + 1e-6
            assert _relative_error(out, truth_norm) <= bound, (method, precision)
        out = dpf.ops.linear_clipped_sum(a, g, scale, "triton")
        bound = 2 * _relative_error(torch_sum, truth_sum) + 1e-6
        assert _relative_error(out, truth_sum) <= bound


def test_auto_takes_triton_only_where_it_measured_faster():
    from torch_dpfast.ops.triton.norms import _prefer_linear

    a, g = torch.empty(2, 197, 768), torch.empty(2, 197, 3072)
    with dpf.precision("bf16"):
        assert _prefer_linear(a, g, "direct")
        assert not _prefer_linear(a, g, "ghost")
        assert not _prefer_linear(a[:, :1], g[:, :1], "direct")
    with dpf.precision("tf32"):
        assert not _prefer_linear(a, g, "direct")
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        a, g, scale = a.to(cuda), g.to(cuda), torch.ones(2, device=cuda)
        with dpf.precision("ieee"):
            resolve = dpf.ops._backend.resolve
            assert resolve("linear_norm_sq", "auto", cuda, a, g, "direct") == "triton"
            assert resolve("linear_clipped_sum", "auto", cuda, a, g, scale) == "reference"


def test_tf32_rounding_is_to_nearest(device):
    """The kernels' TF32 inputs are rounded to nearest, not truncated as the tensor cores do."""
    if "triton" not in backends("linear_norm_sq", device, torch.float32):
        pytest.skip("no Triton backend for this device here")
    ulp = 2.0**-10
    head = [1 + 0.4 * ulp, 1 + 0.6 * ulp, -(1 + 0.6 * ulp), 3.0]
    x = torch.tensor(head + [0.0] * 12, device=device)
    out = torch.empty_like(x)
    _round_kernel[(1,)](x, out)
    assert out[:4].tolist() == [1.0, 1 + ulp, -(1 + ulp), 3.0]

"""The tensor-core CUDA kernels of the linear ops (csrc/cuda/linear_tc.cu) at TF32 and bf16
precision: shapes that cross their 64 x 64 tiles and 16-row K steps (none a multiple), T = 1,
zero scales over non-finite rows, non-finite norms, against float64 brute force with a bound
of twice PyTorch's own error at the same input precision. GPU only; the policy tests run
anywhere the CUDA extension is built."""

import pytest
import torch

import torch_dpfast as dpf
from tests import brute_force
from tests.helpers import randn
from torch_dpfast.ops import _backend

SHAPES = [(3, 130, 70, 45), (2, 1, 129, 65), (5, 67, 17, 200), (1, 64, 64, 64)]


def _need_kernels():
    if "cuda" not in dpf.ops.available("linear_norm_sq"):
        pytest.skip("the CUDA extension is not built")


def _need_gpu():
    _need_kernels()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU of compute capability 8.0+")


def _relative_error(out, truth):
    return ((out.double().cpu() - truth.double().cpu()).norm() / truth.double().norm()).item()


def _at_input_precision(fn, precision, a, g, *rest):
    """fn(a, g, *rest) computed by PyTorch with inputs of the same precision as the kernels'."""
    if precision == "bf16":
        a, g = a.bfloat16().float(), g.bfloat16().float()
    with dpf.precision("ieee" if precision == "bf16" else precision):
        return fn(a, g, *rest)


@pytest.mark.cuda
@pytest.mark.parametrize("b,t,d_in,d_out", SHAPES)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_norms_and_clipped_sums_match_float64(b, t, d_in, d_out, precision, gen):
    _need_gpu()
    a = randn(b, t, d_in, gen=gen, dtype=torch.float32, device="cuda")
    g = randn(b, t, d_out, gen=gen, dtype=torch.float32, device="cuda")
    scale = torch.rand(b, generator=gen, dtype=torch.float64)
    scale[1::2] = 0.0
    grads = brute_force.linear_grads(a, g)
    truth_norms = brute_force.norms_sq(grads)
    truth_sum = brute_force.clipped_sum(grads, scale)
    scale = scale.to("cuda", torch.float32)
    with dpf.precision(precision):
        for method in ("ghost", "direct"):
            out = dpf.ops.linear_norm_sq(a, g, method, backend="cuda")
            assert out.shape == (b,) and out.dtype == torch.float32
            torch_out = _at_input_precision(
                dpf.ops.linear_norm_sq, precision, a, g, method, "reference"
            )
            bound = 2 * _relative_error(torch_out, truth_norms) + 1e-6
            assert _relative_error(out, truth_norms) <= bound, (method, precision)
        out = dpf.ops.linear_clipped_sum(a, g, scale, backend="cuda")
        assert out.shape == (d_out, d_in) and out.dtype == torch.float32
        torch_out = _at_input_precision(
            dpf.ops.linear_clipped_sum, precision, a, g, scale, "reference"
        )
        if truth_sum.norm() > 0:
            bound = 2 * _relative_error(torch_out, truth_sum) + 1e-6
            assert _relative_error(out, truth_sum) <= bound, precision


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_non_finite_examples(precision, gen):
    """Zero-scale rows holding NaN/Inf stay out of the clipped sum; a NaN/Inf in an example's
    inputs makes its norm non-finite (so its clip factor is 0), and only its own."""
    _need_gpu()
    a = randn(4, 70, 33, gen=gen, dtype=torch.float32, device="cuda")
    g = randn(4, 70, 20, gen=gen, dtype=torch.float32, device="cuda")
    a[1, 65, 3], g[3, 0, 0] = float("inf"), float("nan")
    scale = torch.tensor([0.5, 0.0, 1.0, 0.0], device="cuda")
    with dpf.precision(precision):
        summed = dpf.ops.linear_clipped_sum(a, g, scale, backend="cuda")
        assert torch.isfinite(summed).all()
        for method in ("ghost", "direct"):
            norms = dpf.ops.linear_norm_sq(a, g, method, backend="cuda").cpu()
            assert not torch.isfinite(norms[[1, 3]]).any(), method
            assert torch.isfinite(norms[[0, 2]]).all(), method


def test_they_refuse_ieee_precision_and_float64_with_the_reason():
    _need_kernels()
    from torch_dpfast.ops.linear import tensor_core_unsupported

    a = torch.ones(2, 3, 4)
    with dpf.precision("ieee"):
        assert "run on tensor cores" in tensor_core_unsupported(a, a)
    with dpf.precision("tf32"):
        assert "not float64" in tensor_core_unsupported(a.double(), a.double())
        assert tensor_core_unsupported(a, a.bfloat16()) is None
    if torch.cuda.is_available():
        with dpf.precision("ieee"), pytest.raises(ValueError, match="run on tensor cores"):
            dpf.ops.linear_norm_sq(a.cuda(), a.cuda(), backend="cuda")


def test_auto_does_not_take_them_before_they_are_measured():
    _need_kernels()
    a, g, scale = torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.ones(2)
    cuda = torch.device("cuda")
    with dpf.precision("tf32"):
        assert _backend.resolve("linear_norm_sq", "auto", cuda, a, g, "ghost") != "cuda"
        assert _backend.resolve("linear_clipped_sum", "auto", cuda, a, g, scale) != "cuda"

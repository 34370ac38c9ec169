"""Backend selection: what "auto" picks, and the errors for backends that cannot run."""

import pytest
import torch

import torch_dpfast as dpf
from torch_dpfast import _ext
from torch_dpfast.ops import _backend


def test_every_op_has_a_reference_and_a_public_custom_op():
    for op in dpf.ops.OPS:
        assert "reference" in dpf.ops.available(op)
        assert hasattr(torch.ops.torch_dpfast, op)


def test_auto_prefers_compiled_kernels_on_their_device():
    cpu = torch.device("cpu")
    expected = "cpp" if _ext.cpu_loaded else "reference"
    assert _backend.resolve("clip_accumulate_", "auto", cpu) == expected
    assert _backend.resolve("linear_norm_sq", "auto", cpu) == expected
    assert _backend.resolve("embedding_clipped_sum", "auto", cpu) == "reference"  # no C++ twin
    assert _backend.resolve("clip_factors", "auto", torch.device("meta")) == "reference"


def test_auto_leaves_unmeasured_cuda_kernels_alone():
    if "cuda" not in dpf.ops.available("embedding_norm_sq"):
        pytest.skip("the CUDA extension is not built")
    ids, g = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 4)
    chosen = _backend.resolve("embedding_norm_sq", "auto", torch.device("cuda"), ids, g, 5, None)
    assert chosen != "cuda"  # the segmented reduction has not been measured on a GPU yet


def test_a_backend_on_the_wrong_device_is_refused():
    if "cuda" not in dpf.ops.available("clip_factors"):
        pytest.skip("the CUDA extension is not built")
    with pytest.raises(ValueError, match="runs on cuda tensors, got tensors on cpu"):
        dpf.ops.clip_factors(torch.ones(3), 1.0, backend="cuda")


def test_a_missing_backend_lists_the_available_ones():
    with pytest.raises(NotImplementedError, match="no 'triton' kernel.*available: reference"):
        dpf.ops.clip_factors(torch.ones(3), 1.0, backend="triton")


def test_a_backend_that_cannot_run_the_call_says_why():
    if "triton" not in dpf.ops.available("linear_norm_sq"):
        pytest.skip("Triton is not installed")
    a = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot run this call: the Triton kernels take float32"):
        dpf.ops.linear_norm_sq(a, a, backend="triton")
    # auto quietly takes a backend that can
    assert dpf.ops.linear_norm_sq(a, a).dtype == torch.float64


def test_registration_is_once_only():
    with pytest.raises(RuntimeError, match="already has a 'reference' implementation"):
        _backend.register("linear_norm_sq", "reference")(lambda *args: None)
    with pytest.raises(ValueError, match="cannot register backend 'auto'"):
        _backend.register("linear_norm_sq", "auto")


TRITON_OPS = (
    "linear_norm_sq",
    "linear_clipped_sum",
    "conv_norm_sq",
    "conv_clipped_sum",
    "embedding_norm_sq",
)


def test_triton_kernels_are_registered_where_triton_is_installed():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    for op in TRITON_OPS:
        assert "triton" in dpf.ops.available(op), op

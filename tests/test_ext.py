"""The compiled extensions: they load and register their kernels, the package survives their
absence, and `python -m torch_dpfast.info` reports what is live."""

import os
import subprocess
import sys

import pytest
import torch

import torch_dpfast as dpf
from torch_dpfast import _ext

# CI builds the extensions strictly and sets these, so a silently skipped build fails here.
REQUIRE_CPP = os.environ.get("TORCH_DPFAST_REQUIRE_CPP") == "1"
REQUIRE_CUDA = os.environ.get("TORCH_DPFAST_REQUIRE_CUDA_BUILD") == "1"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_cpu_extension_registers_its_kernels():
    if not _ext.cpu_loaded:
        assert not REQUIRE_CPP, f"torch_dpfast._C did not load: {_ext.cpu_error}"
        pytest.skip(f"torch_dpfast._C: {_ext.cpu_error}")
    cpu_ops = ("linear_norm_sq", "linear_clipped_sum", "embedding_norm_sq", "total_clip_factors")
    cpu_ops += ("scaled_accumulate_", "per_example_norm_sq")
    for op in ("clip_factors", "clip_accumulate_", "add_noise_", *cpu_ops):
        assert _ext.has_kernel(op, "CPU")
        assert "cpp" in dpf.ops.available(op)


def test_cuda_extension_registers_compiled_cuda_kernels():
    if not _ext.cuda_loaded:
        assert not REQUIRE_CUDA, f"torch_dpfast._C_cuda did not load: {_ext.cuda_error}"
        pytest.skip(f"torch_dpfast._C_cuda: {_ext.cuda_error}")
    cuda_ops = ("clip_factors", "total_clip_factors", "clip_accumulate_", "add_noise_")
    for op in (*cuda_ops, "embedding_norm_sq"):
        assert _ext.has_kernel(op, "CUDA"), op
        assert "cuda" in dpf.ops.available(op), op
    for kernel in ("linear_norm_sq_tc", "linear_clipped_sum_tc"):  # the tensor-core kernels
        assert _ext.has_kernel(kernel, "CUDA"), kernel
    for op in ("linear_norm_sq", "linear_clipped_sum"):
        assert "cuda" in dpf.ops.available(op), op


def test_package_falls_back_to_references_without_the_extension():
    code = (
        "import sys, warnings\n"
        "sys.modules['torch_dpfast._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, torch_dpfast as dpf\n"
        "messages = [str(w.message) for w in caught if 'torch_dpfast._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "print(messages[0])\n"
        "print(dpf.ops.available('clip_accumulate_'))\n"
        "s = [torch.zeros(2)]\n"
        "dpf.ops.clip_accumulate_([torch.ones(3, 2)], s, 1.0)\n"
        "print(s[0].tolist())\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "pure-PyTorch reference" in lines[0] and "pip install" in lines[0]
    assert lines[1] == "('reference',)"
    assert eval(lines[2]) == pytest.approx([3 * 0.5**0.5] * 2, rel=1e-5)


def test_info_reports_versions_backends_and_precision():
    result = subprocess.run(
        [sys.executable, "-m", "torch_dpfast.info"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"torch          {torch.__version__}" in out
    lines = (
        "reference    live",
        "cpp ",
        "cuda ",
        "triton ",
        "precision: ieee",
        "GPU",
        "CPU memory:",
    )
    for line in lines:
        assert line in out
    if _ext.cpu_loaded:
        assert "cpp          live" in out
    assert "clip_accumulate_" in out

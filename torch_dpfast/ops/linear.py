"""Per-example gradient norms and clipped gradient sums of a linear map y = a W^T.

Shapes: ``a`` (B, *, d_in) is the layer input, ``g`` (B, *, d_out) the gradient of the layer
output; the middle dimensions (if any) are flattened into T positions. The per-example weight
gradient is G_i = g_i^T a_i (d_out x d_in).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _ext
from ..precision import get_precision
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


def _as_sequence(op: str, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, *, d) -> (B, T, d) for both tensors, after checking that their leading dims agree."""
    check_floating(op, a=a, g=g)
    if a.dim() < 2 or a.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"{op}: a (B, *, d_in) and g (B, *, d_out) must agree in all but the last dim, "
            f"got a {tuple(a.shape)} and g {tuple(g.shape)}"
        )
    batch, positions = a.shape[0], math.prod(a.shape[1:-1])
    return a.reshape(batch, positions, a.shape[-1]), g.reshape(batch, positions, g.shape[-1])


# ---------------------------------------------------------------- linear_norm_sq


@_backend.custom_op("torch_dpfast::linear_norm_sq", mutates_args=())
def _linear_norm_sq(a: Tensor, g: Tensor, method: str, backend: str) -> Tensor:
    return _backend.run("linear_norm_sq", backend, a, g, method)


@_linear_norm_sq.register_fake
def _(a: Tensor, g: Tensor, method: str, backend: str) -> Tensor:
    return a.new_empty(a.shape[0], dtype=norm_dtype(a, g))


@_backend.register("linear_norm_sq", "reference")
def linear_norm_sq_reference(a: Tensor, g: Tensor, method: str) -> Tensor:
    """Reference: ghost <a a^T, g g^T> or direct ||g^T a||_F^2 per example; a, g are (B, T, d)."""
    dtype = norm_dtype(a, g)
    a, g = a.to(dtype), g.to(dtype)
    if method == "ghost":
        return ((a @ a.mT) * (g @ g.mT)).sum(dim=(1, 2))
    return (g.mT @ a).square().sum(dim=(1, 2))


_backend.register_compiled("linear_norm_sq", "cpp", "CPU")


def linear_norm_sq(a: Tensor, g: Tensor, method: str = "auto", backend: str = "auto") -> Tensor:
    """Squared Frobenius norm of each example's weight gradient, ||g_i^T a_i||_F^2.

    Args:
        a: layer input, (B, d_in) or (B, *, d_in).
        g: gradient of the layer output, (B, d_out) or (B, *, d_out).
        method: ``"ghost"`` (<a_i a_i^T, g_i g_i^T>, cost T^2 (d_in + d_out)), ``"direct"``
            (sum of squares of g_i^T a_i, cost T d_in d_out) or ``"auto"`` (the cheaper one).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B,) float32 (float64 for float64 inputs).
    """
    op = "linear_norm_sq"
    a, g = _as_sequence(op, a, g)
    check_method(op, method)
    device = check_same_device(op, a=a, g=g)
    method = norm_method(method, a.shape[1], a.shape[2], g.shape[2])
    return _linear_norm_sq(a, g, method, _backend.resolve(op, backend, device, a, g, method))


# ---------------------------------------------------------------- linear_clipped_sum


@_backend.custom_op("torch_dpfast::linear_clipped_sum", mutates_args=())
def _linear_clipped_sum(a: Tensor, g: Tensor, scale: Tensor, backend: str) -> Tensor:
    return _backend.run("linear_clipped_sum", backend, a, g, scale)


@_linear_clipped_sum.register_fake
def _(a: Tensor, g: Tensor, scale: Tensor, backend: str) -> Tensor:
    return a.new_empty(g.shape[-1], a.shape[-1])


@_backend.register("linear_clipped_sum", "reference")
def linear_clipped_sum_reference(a: Tensor, g: Tensor, scale: Tensor) -> Tensor:
    """Reference: (diag(scale) g)^T a over all B*T rows; a (B, T, d_in), g (B, T, d_out)."""
    out_dtype, acc = a.dtype, accumulation_dtype(a)
    scale = scale.to(acc)
    a = drop_unscaled_rows(a.to(acc), scale)
    g = drop_unscaled_rows(g.to(acc), scale) * scale[:, None, None]
    return (g.reshape(-1, g.shape[-1]).mT @ a.reshape(-1, a.shape[-1])).to(out_dtype)


_backend.register_compiled("linear_clipped_sum", "cpp", "CPU")


def linear_clipped_sum(a: Tensor, g: Tensor, scale: Tensor, backend: str = "auto") -> Tensor:
    """Book-keeping clipped sum sum_i scale_i g_i^T a_i, one GEMM over all B*T rows.

    Examples with ``scale_i == 0`` contribute exactly nothing, even if their a_i or g_i hold
    NaN or Inf.

    Args:
        a: layer input, (B, d_in) or (B, *, d_in).
        g: gradient of the layer output, (B, d_out) or (B, *, d_out).
        scale: per-example factors, (B,) (clip factor times any loss scaling).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (d_out, d_in) in the dtype of ``a`` (accumulated in float32 for half types).
    """
    op = "linear_clipped_sum"
    a, g = _as_sequence(op, a, g)
    check_scale(op, scale, a.shape[0])
    device = check_same_device(op, a=a, g=g, scale=scale)
    backend = _backend.resolve(op, backend, device, a, g, scale)
    return _linear_clipped_sum(a, g, scale, backend)


# ---------------------------------------------------------------- tensor-core CUDA kernels

# csrc/cuda/linear_tc.cu, at the TF32 or bf16 precision setting. They have not run on a GPU
# yet, so backend="auto" does not take them (prefer=never).
TENSOR_CORE_PRECISION = {"tf32": 1, "bf16": 2}


def tensor_core_unsupported(*tensors: Tensor) -> str | None:
    """Why the tensor-core kernels cannot run these tensors at the current precision, or None."""
    if get_precision() not in TENSOR_CORE_PRECISION:
        return (
            "the CUDA layer kernels run on tensor cores: use dpf.set_precision('tf32') or "
            f"'bf16' (the precision is {get_precision()!r})"
        )
    if any(t.dtype == torch.float64 for t in tensors):
        return "the CUDA layer kernels take float32, bfloat16 or float16 inputs, not float64"
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "the CUDA layer kernels need a GPU of compute capability 8.0 or newer"
    return None


def _register_tensor_core(op: str, kernel) -> None:
    """``kernel(a, g, *rest, precision)`` as the cuda backend of ``op``."""

    def run(a: Tensor, g: Tensor, *rest):
        return kernel(a, g, *rest, TENSOR_CORE_PRECISION[get_precision()])

    unsupported = lambda a, g, *rest: tensor_core_unsupported(a, g)  # noqa: E731
    _backend.register(op, "cuda", unsupported=unsupported, prefer=_backend.never)(run)


if _ext.has_kernel("linear_norm_sq_tc", "CUDA"):
    _register_tensor_core("linear_norm_sq", torch.ops.dpfast_C.linear_norm_sq_tc)
    _register_tensor_core("linear_clipped_sum", torch.ops.dpfast_C.linear_clipped_sum_tc)

"""Shared pieces of the Triton kernels: the precision of their dot products, the interpreter
switch, and the checks that decide whether a call can run on Triton."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...precision import get_precision

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# TORCH_DPFAST_TRITON_AUTOTUNE=0 compiles one configuration per kernel instead of tuning
# (test suites, quick runs); the interpreter never tunes.
AUTOTUNE = os.environ.get("TORCH_DPFAST_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Input precision of tl.dot, as a constexpr: full fp32, TF32 tensor cores, or bf16 inputs.
PRECISION_CODES = {"ieee": 0, "tf32": 1, "bf16": 2}


def precision_code() -> int:
    """The dot-product precision of the current ``dpf.set_precision`` setting."""
    return PRECISION_CODES[get_precision()]


def unsupported(*tensors: torch.Tensor) -> str | None:
    """Why these tensors cannot run on the Triton backend, or None if they can."""
    for t in tensors:
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            return f"the Triton kernels take float32, bfloat16 or float16, got {t.dtype}"
        if t.device.type == "cpu" and not INTERPRET:
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                "importing torch_dpfast"
            )
    return None


def configs(full: list[triton.Config]) -> list[triton.Config]:
    """Autotuning candidates; only the first when tuning is off (see AUTOTUNE)."""
    return full if AUTOTUNE else full[:1]


@triton.jit
def round_to_tf32(x):
    """Rounds float32 to the nearest TF32 value (10-bit mantissa). The tensor cores truncate the
    low 13 bits instead, which biases every square toward zero: summed over a norm, that
    under-estimates norms by about 1e-3 and so weakens clipping. Rounding first keeps the error
    unbiased."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(x, y, acc, PRECISION: tl.constexpr):
    """acc + x @ y with fp32 accumulation; inputs rounded as the precision setting says."""
    if PRECISION == 2:
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    elif PRECISION == 1:
        x = round_to_tf32(x.to(tl.float32))
        y = round_to_tf32(y.to(tl.float32))
        return tl.dot(x, y, acc, input_precision="tf32")
    else:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")

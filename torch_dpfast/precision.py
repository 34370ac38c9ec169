"""One precision switch for torch's TF32 flags and the input precision of our kernels.

* ``"ieee"``: float32 matmuls and convolutions in full float32 (TF32 off in cuBLAS and cuDNN).
* ``"tf32"``: TF32 tensor cores for float32 matmuls and convolutions (10-bit mantissa inputs,
  float32 accumulation; about 1e-3 relative error per product).
* ``"bf16"``: as ``"tf32"`` for float32 work, and bfloat16 inputs for our kernels' dot products;
  meant for ``torch.autocast(dtype=torch.bfloat16)`` training.

Until :func:`set_precision` is first called, torch's own flags are left as they are and
:func:`get_precision` reports ``"ieee"``. Lower precision changes the numbers the clip factors
are computed from; see docs/precision.md for what that means for the privacy guarantee.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("ieee", "tf32", "bf16")
_current = "ieee"


def _check(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    return name


def set_precision(name: str) -> None:
    """Sets the precision used by torch_dpfast kernels and torch's TF32 flags."""
    global _current
    _current = _check(name)
    tf32 = name != "ieee"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def get_precision() -> str:
    """The current setting: ``"ieee"``, ``"tf32"`` or ``"bf16"``."""
    return _current


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """Context manager: ``with dpf.precision("tf32"): ...`` restores every flag on exit."""
    global _current
    saved = (_current, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_precision(name)
    try:
        yield
    finally:
        _current = saved[0]
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]

"""Loads the compiled extensions once; a failure becomes one warning, never an import error.

``_C`` holds the C++ CPU kernels and defines the private ``dpfast_C`` op schemas; ``_C_cuda``
registers CUDA kernels on those ops and is only loaded after ``_C``.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch


def _load(name: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(f"torch_dpfast.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"torch_dpfast.{name}":
            return False, f"failed to load: {err}"
        return False, "not built"
    except (ImportError, OSError, RuntimeError) as err:
        return False, f"failed to load: {err}"
    return True, None


cpu_loaded, cpu_error = _load("_C")
if cpu_loaded:
    cuda_loaded, cuda_error = _load("_C_cuda")
else:
    cuda_loaded, cuda_error = False, "needs torch_dpfast._C"

if not cpu_loaded:
    warnings.warn(
        f"torch_dpfast: the compiled extension torch_dpfast._C is unavailable ({cpu_error}); "
        "every op runs on its pure-PyTorch reference. To build it, reinstall from the source "
        "tree with `pip install --no-build-isolation -e .` and a C++ compiler present.",
        RuntimeWarning,
        stacklevel=2,
    )
elif cuda_error and cuda_error != "not built":
    warnings.warn(
        f"torch_dpfast: the CUDA extension torch_dpfast._C_cuda {cuda_error}; CUDA tensors use "
        "the other backends.",
        RuntimeWarning,
        stacklevel=2,
    )


@functools.cache  # the extensions register their kernels once, at import; rules ask per layer
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``dpfast_C::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" or "CUDA");
    False for an op the loaded extension does not define (built from older sources)."""
    if not cpu_loaded:
        return False
    name = f"dpfast_C::{op}"
    if not torch._C._dispatch_has_kernel(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)

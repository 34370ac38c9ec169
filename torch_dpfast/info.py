"""``python -m torch_dpfast.info``: versions, live backends, GPU, precision setting and the CPU
memory setting (cpu_memory.py)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import _ext, cpu_memory, ops
from .precision import get_precision


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_status() -> str:
    version = _version("triton")
    if version == "not installed":
        return "not installed"
    if torch.cuda.is_available():
        return f"live (triton {version}, compiled for the GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"live (triton {version}, interpreter: TRITON_INTERPRET=1)"
    return f"installed (triton {version}); CPU runs need TRITON_INTERPRET=1"


def report() -> str:
    """The text that ``python -m torch_dpfast.info`` prints."""
    import torch_dpfast

    cuda_gpu = torch.cuda.is_available()
    lines = [
        f"torch_dpfast   {torch_dpfast.__version__}",
        f"python         {platform.python_version()}",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"numpy          {_version('numpy')}",
        f"prv-accountant {_version('prv-accountant')}",
        "",
        "backends:",
        "  reference    live (pure PyTorch, every op)",
        f"  cpp          {'live' if _ext.cpu_loaded else _ext.cpu_error} (torch_dpfast._C)",
        f"  cuda         {'live' if _ext.cuda_loaded else _ext.cuda_error} (torch_dpfast._C_cuda)"
        + ("" if cuda_gpu or not _ext.cuda_loaded else "; no GPU to run it on"),
        f"  triton       {_triton_status()}",
        "",
        "ops (backends available):",
    ]
    lines += [f"  {op:22s} {', '.join(ops.available(op))}" for op in ops.OPS]
    lines.append("")
    if cuda_gpu:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"GPU {i}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB"
            )
    else:
        lines.append("GPU: none")
    lines.append(
        f"precision: {get_precision()} (torch matmul TF32 "
        f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32})"
    )
    lines.append(f"CPU memory: {cpu_memory.status()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()

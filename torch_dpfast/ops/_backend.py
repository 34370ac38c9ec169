"""Which implementation (backend) runs an op.

Every op has a ``"reference"`` implementation in pure PyTorch. Compiled or Triton kernels add
``"cpp"`` (C++ CPU kernels in ``torch_dpfast._C``), ``"cuda"`` (CUDA C++ in ``_C_cuda``) and
``"triton"`` implementations. An implementation may declare which calls it cannot run
(``unsupported``) and on which calls ``backend="auto"`` should take it (``prefer``, from measured
timings); otherwise ``auto`` takes the first available one in the order of :data:`AUTO_ORDER`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _ext

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_DEVICE_OF_BACKEND = {"cpp": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    # (*args) -> reason string when this implementation cannot run the call, else None.
    unsupported: Callable[..., str | None] | None = None
    # (*args) -> whether backend="auto" should take it for this call (default: always).
    prefer: Callable[..., bool] | None = None


_impls: dict[str, dict[str, Implementation]] = {}


def custom_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: registers ``fn`` as the ``torch.library`` custom op ``name`` (what
    torch.compile and ``torch.ops.torch_dpfast`` see) and returns a function that takes the op
    while compiling or under a dispatch mode (fake tensors, tracing), and otherwise calls ``fn``
    itself under no_grad, as the op's eager path does, without its Python dispatch (31 us a
    call, measured: 62 us through the op against 31 us for a tiny linear_clipped_sum; the
    engine makes several calls per layer and step); under the profiler the call is recorded by
    the op's name. The returned function keeps the op's ``register_fake``."""

    def decorate(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
                return op(*args, **kwargs)
            with torch.no_grad():
                if torch._C._autograd._profiler_enabled():  # profiles keep the op's name
                    with torch.profiler.record_function(name):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)

        call.register_fake = op.register_fake
        return call

    return decorate


def register(
    op: str,
    backend: str,
    unsupported: Callable[..., str | None] | None = None,
    prefer: Callable[..., bool] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: registers ``fn`` as the ``backend`` implementation of ``op`` (once only)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"cannot register backend {backend!r}; use one of {BACKENDS[1:]}")

    def decorate(fn: Callable) -> Callable:
        table = _impls.setdefault(op, {})
        if backend in table:
            raise RuntimeError(f"op {op!r} already has a {backend!r} implementation")
        table[backend] = Implementation(fn, unsupported, prefer)
        return fn

    return decorate


def available(op: str) -> tuple[str, ...]:
    """The backends that implement ``op`` in this installation."""
    return tuple(_impls.get(op, {}))


def resolve(op: str, backend: str, device: torch.device, *args) -> str:
    """Turns ``backend`` (possibly ``"auto"``) into the backend that will run ``op`` on ``device``
    with the (normalised) arguments ``args``.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`, does not run on ``device``, or
            cannot run these arguments.
        NotImplementedError: ``op`` has no ``backend`` implementation in this installation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = _impls.get(op, {})
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            impl = table.get(candidate)
            if impl is None or (impl.unsupported is not None and impl.unsupported(*args)):
                continue
            if impl.prefer is None or impl.prefer(*args):
                return candidate
        return "reference"
    if backend not in table:
        hint = ""
        if backend in ("cpp", "cuda"):
            hint = " (is the compiled extension built? see `python -m torch_dpfast.info`)"
        raise NotImplementedError(
            f"torch_dpfast.ops.{op} has no {backend!r} kernel in this installation{hint}; "
            f"available: {', '.join(table)}"
        )
    needed = _DEVICE_OF_BACKEND.get(backend)
    if needed is not None and device.type != needed:
        raise ValueError(
            f"torch_dpfast.ops.{op}: backend={backend!r} runs on {needed} tensors, got tensors on "
            f"{device}; use backend='auto' or move the tensors"
        )
    impl = table[backend]
    reason = impl.unsupported(*args) if impl.unsupported is not None else None
    if reason:
        raise ValueError(
            f"torch_dpfast.ops.{op}: backend={backend!r} cannot run this call: {reason}"
        )
    return backend


def run(op: str, backend: str, *args):
    """Calls the ``backend`` implementation of ``op`` (``backend`` already resolved)."""
    return _impls[op][backend].fn(*args)


def never(*args) -> bool:
    """``prefer`` policy of kernels that have not measured faster than the reference path:
    ``backend="auto"`` leaves them alone (they run when asked for by name)."""
    return False


def register_compiled(
    op: str, backend: str, dispatch_key: str, prefer: Callable[..., bool] | None = None
) -> None:
    """Registers the compiled ``torch.ops.dpfast_C.<op>`` as ``backend`` of ``op`` when the
    extension that provides its ``dispatch_key`` kernel ("CPU" or "CUDA") is loaded."""
    if _ext.has_kernel(op, dispatch_key):
        register(op, backend, prefer=prefer)(getattr(torch.ops.dpfast_C, op))

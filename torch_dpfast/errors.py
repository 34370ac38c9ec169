"""Errors users catch by type.

``UnsupportedModuleError`` is what Opacus raises for modules it cannot make private (BatchNorm),
and what Opacus scripts catch. Ours subclasses ``ValueError`` (as Opacus's does); when Opacus is
installed, :func:`unsupported_module` raises an instance that is also Opacus's
``UnsupportedModuleError``, so an ``except opacus.validators.errors.UnsupportedModuleError`` in a
script switched by one import still catches it.
"""

from __future__ import annotations

import functools
import importlib.util


class UnsupportedModuleError(ValueError):
    """A module that per-example clipping cannot handle (e.g. BatchNorm), named with the fix."""


@functools.cache
def _with_opacus_base() -> type:
    """UnsupportedModuleError, or a subclass that is also Opacus's (when Opacus is installed)."""
    if importlib.util.find_spec("opacus") is None:
        return UnsupportedModuleError
    from opacus.validators.errors import UnsupportedModuleError as OpacusError

    return type("UnsupportedModuleError", (UnsupportedModuleError, OpacusError), {})


def unsupported_module(message: str) -> UnsupportedModuleError:
    """The exception to raise for an unsupported module (catchable as ours, ValueError, and
    Opacus's UnsupportedModuleError)."""
    return _with_opacus_base()(message)

"""Triton kernels, registered as the ``"triton"`` backend of the ops they implement.

On CUDA tensors they are compiled; on CPU tensors they run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before torch_dpfast is imported (CI runs them so).
"""

from . import clipped_sum, norms

__all__ = ["clipped_sum", "norms"]

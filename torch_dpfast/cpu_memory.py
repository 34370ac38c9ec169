"""Keeps the memory one CPU training step frees mapped for the next (glibc's malloc, Linux).

A private step holds every captured layer's input and output gradient until the clip; at its
end they are freed at once, and glibc hands the top of its heap back to the operating system
(and serves allocations above a dynamic threshold by fresh mmaps), so the next step page-faults
all of it in again, zero-filled. On the 2-core CPU the private backward of EfficientNet-B0 at
batch 8 took 209-234 ms that way against 168 ms with the thresholds below, its steps ran
0.77-0.80x against 0.95-1.07x non-private (BiT-R50x1: 0.78-0.79x against 0.82-0.84x), and the
non-private steps in the same processes did not change.

With the trim threshold at 2 GiB and the mmap threshold at glibc's maximum (32 MiB) the freed
memory stays in the process: its resident size then stays at the step's peak between steps
instead of dropping and climbing back (the peak moved by +0.1-3.7% on the families measured,
docs/install.md).

``attach`` calls :func:`keep_freed_memory` for models with parameters on CPU; the environment
variable ``DPFAST_KEEP_FREED_MEMORY=0`` turns it off (set it before the first attach)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

TRIM_THRESHOLD = (1 << 31) - 1  # bytes; mallopt takes an int
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit (4 MiB * sizeof(long))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
ENV = "DPFAST_KEEP_FREED_MEMORY"

_state: dict[str, bool | None] = {"kept": None}
logger = logging.getLogger("torch_dpfast")


def keep_freed_memory() -> bool:
    """Sets glibc's trim and mmap thresholds once per process (later calls return the first
    result). True where glibc took them; False on other platforms and C libraries, or when
    ``DPFAST_KEEP_FREED_MEMORY=0``."""
    if _state["kept"] is None:
        _state["kept"] = _set_thresholds()
        if _state["kept"]:
            logger.info(
                "torch_dpfast: glibc keeps freed memory for the next step (trim threshold "
                "2 GiB, mmap threshold 32 MiB; %s=0 turns this off)",
                ENV,
            )
    return bool(_state["kept"])


def _set_thresholds() -> bool:
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return trimmed and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def status() -> str:
    """One line for ``python -m torch_dpfast.info``."""
    if _state["kept"] is None:
        return f"glibc thresholds set when a CPU model is attached ({ENV}=0: never)"
    if _state["kept"]:
        return "freed memory kept for the next step (glibc trim 2 GiB, mmap 32 MiB)"
    return f"left as the C library sets it ({ENV}=0, or not glibc on Linux)"

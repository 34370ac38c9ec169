"""Which layers ``clipping="auto"`` materialises on CPU instead of taking their fast path.

A fast path costs the norm (ghost T^2 (d_in + d_out) or direct T d_in d_out multiply-adds per
example) *plus* the book-keeping clipped sum, a GEMM of T d_in d_out per example. Materialising
the per-example gradients G_i = g_i^T a_i costs that one GEMM (batched per example) and then
only memory passes: the norms are sums of squares of G_i and the clipped sum is one
matrix-vector product sum_i c_i G_i. The norm's multiply-adds are saved; the price is holding
B x (parameter size) values until every layer's norm is known.

On a CPU the GEMMs are compute-bound and memory is plentiful, so this pays whenever the saved
multiply-adds outweigh the extra memory traffic. A fast path also has a fixed cost per layer
and batch, whatever its size: its norm, its certification against the rule's bound and its
clipped sum are a dozen op calls, where a materialised layer joins the one norm pass and the
one scaled sum of all of them; that cost counts as :data:`FAST_PATH_CALL_MACS` saved, so small
layers (a T = 1 head, a character embedding) are materialised too. On a GPU the same trade is
memory-bound and the fast paths win, so nothing is materialised there. The layers are chosen
greedily by saved multiply-adds per byte held, within a byte budget
(``attach(..., materialise_bytes=...)``; by default an eighth of the memory available when the
model is attached).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass

import torch

# materialise_bytes=None (the default): this fraction of the memory available when the model
# is attached (MemAvailable: what can be allocated without swapping), or FALLBACK_BYTES where
# that is unknown.
DEFAULT_MATERIALISE_BYTES = None
DEFAULT_FRACTION = 8  # an eighth: activations, the model and the optimizer need the rest
FALLBACK_BYTES = 1 << 30
# A layer is worth materialising when its norm costs at least this many multiply-adds per byte
# of per-example gradient (16 per float32 value): below it, the extra memory passes cost more
# than the norm (output layers with T = 1, whose ghost norm costs d_in + d_out).
MIN_SAVED_MACS_PER_BYTE = 4.0
# The fixed cost of a layer's fast path on CPU (its norm, certification and clipped-sum calls,
# about 0.1-0.3 ms measured on the char-LSTM's head and embedding at batch 8), as multiply-adds
# at the CPU GEMM rate (~50 per ns): saved by materialising the layer, once per batch.
FAST_PATH_CALL_MACS = 4_000_000


@dataclass(frozen=True)
class Candidate:
    """A layer that could be materialised: ``bytes`` of per-example gradients for the batch,
    ``saved_macs`` the multiply-adds of the norm that materialising saves (for the batch),
    ``values`` per example (the multiply-adds of their sum of squares)."""

    key: Hashable
    bytes: int
    saved_macs: int
    values: int = 0


def candidate(key: Hashable, saving, x, out, rows: int) -> Candidate | None:
    """The layer as a candidate for ``rows`` real examples, given its rule's ``saving``
    (``Rule.materialise_saving``: (norm multiply-adds, values) per example, or None when it
    cannot materialise cheaply), its input ``x`` and its output (or output gradient) ``out``."""
    first_x, first_out = first_tensor(x), first_tensor(out)
    if saving is None or first_x is None or first_out is None:
        return None
    macs, values = saving
    itemsize = gradient_dtype(first_x, first_out).itemsize
    return Candidate(key, rows * values * itemsize, rows * macs + FAST_PATH_CALL_MACS, values)


def gradient_dtype(x: torch.Tensor, out: torch.Tensor) -> torch.dtype:
    """The dtype materialised gradients are held in: the promotion of the layer's input and
    output gradient (float32 input, bfloat16 gradient under autocast: float32); for integer
    inputs (an embedding's ids) the gradient's, at least float32 (positions sharing an id add
    up in it)."""
    if x.is_floating_point():
        return torch.promote_types(x.dtype, out.dtype)
    return torch.promote_types(out.dtype, torch.float32)


def first_tensor(value) -> torch.Tensor | None:
    """A record's x or g: the tensor, or the first of a (nested) tuple of them (rules whose
    records hold several, as the recurrent ones; a recurrent layer's output (out, (h, c)))."""
    while isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def available_bytes() -> int | None:
    """What this process can allocate now, or None where unknown: the least of the system's
    MemAvailable (what can be allocated without swapping), the headroom under the process's
    address-space limit (RLIMIT_AS) and under its cgroup's memory limit (containers; v2 or v1).
    A container or a ``ulimit -v`` sees the system's MemAvailable too, so that alone would
    overshoot its own limit."""
    known = [
        b for b in (_system_available(), _rlimit_headroom(), _cgroup_headroom()) if b is not None
    ]
    return max(0, min(known)) if known else None


def _system_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _rlimit_headroom() -> int | None:
    """RLIMIT_AS minus the address space in use (VmSize), where a limit is set."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError, IndexError):
        return None
    return limit - used


# (limit file, usage file) of the process's memory cgroup, v2 then v1; "max" or a huge number
# means no limit.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_headroom() -> int | None:
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return int(limit) - used
    return None


def resolve_budget(materialise_bytes: int | None) -> int:
    """The budget in bytes: ``materialise_bytes`` validated, or for None the default (an
    eighth of the available memory)."""
    return described_budget(materialise_bytes)[0]


def described_budget(materialise_bytes: int | None) -> tuple[int, str]:
    """(the budget in bytes, how ``dpf.explain`` states it, e.g. "2.9 GiB (default: 1/8 of
    23.1 GiB available)"), from one reading of the available memory."""
    gib = 1 << 30
    if materialise_bytes is not None:
        budget = check_budget(materialise_bytes)
        return budget, f"{budget / gib:.1f} GiB"
    available = available_bytes()
    budget = FALLBACK_BYTES if available is None else available // DEFAULT_FRACTION
    origin = "unknown" if available is None else f"{available / gib:.1f} GiB"
    return budget, f"{budget / gib:.1f} GiB (default: 1/{DEFAULT_FRACTION} of {origin} available)"


def check_budget(materialise_bytes: int | None) -> int | None:
    """``materialise_bytes`` validated: None (the default budget) or an int >= 0 (0 turns
    materialising off)."""
    if materialise_bytes is None:
        return None
    if isinstance(materialise_bytes, bool) or not isinstance(materialise_bytes, int):
        raise TypeError(f"materialise_bytes must be an int, got {type(materialise_bytes)}")
    if materialise_bytes < 0:
        raise ValueError(f"materialise_bytes must be >= 0, got {materialise_bytes}")
    return materialise_bytes


def applies(clipping: str, device: torch.device) -> bool:
    """Only ``clipping="auto"`` on CPU materialises fast-path layers (``"bk"`` is book-keeping
    as published, with ghost norms everywhere)."""
    return clipping == "auto" and device.type == "cpu"


def choose(candidates: list[Candidate], budget: int) -> set[Hashable]:
    """Keys of the candidates to materialise: worth it (:data:`MIN_SAVED_MACS_PER_BYTE`), then
    by saved multiply-adds per byte, best first, as long as their bytes fit in ``budget``."""
    worth = [c for c in candidates if c.saved_macs >= MIN_SAVED_MACS_PER_BYTE * c.bytes]
    worth.sort(key=lambda c: c.saved_macs / max(c.bytes, 1), reverse=True)
    chosen, used = set(), 0
    for c in worth:
        if used + c.bytes <= budget:
            chosen.add(c.key)
            used += c.bytes
    return chosen

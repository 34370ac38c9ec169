"""Argument checks shared by the public entry points (attach, make_private, the sampler, the
ops): one wording for each kind of mistake, naming the argument, what it must be and what was
given."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_choice(name: str, value, choices: Sequence[str], where: str = "") -> str:
    """``value`` if it is one of ``choices``; ``where`` prefixes the message (an op's name)."""
    if value not in choices:
        raise ValueError(f"{where}{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_loss_reduction(value) -> str:
    """ "mean" or "sum": how the training loss reduces over the batch."""
    if value not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {value!r}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value, where: str = "") -> float:
    """``value`` as a float if it is a finite number > 0."""
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value, where: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0."""
    if not _is_number(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` if it is an int >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = " or None" if optional else ""
        raise ValueError(f"{name} must be an int >= {minimum}{suffix}, got {value!r}")
    return value

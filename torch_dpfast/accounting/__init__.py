"""Privacy accounting for DP-SGD with Poisson sampling: PRV (default), RDP and (approximate,
Opacus's "gdp") Gaussian-DP accountants,
``compute_epsilon`` and noise calibration (``get_noise_multiplier``)."""

from __future__ import annotations

from ._base import Accountant, warn_large_delta
from .calibration import get_noise_multiplier, steps_per_epoch
from .factory import ACCOUNTANTS, create_accountant
from .gdp import GaussianAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant="prv"
) -> float:
    """Epsilon after ``steps`` DP-SGD steps with this noise multiplier and sample rate."""
    acc = create_accountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return acc.get_epsilon(delta)


__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "GaussianAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "compute_epsilon",
    "create_accountant",
    "get_noise_multiplier",
    "steps_per_epoch",
    "warn_large_delta",
]

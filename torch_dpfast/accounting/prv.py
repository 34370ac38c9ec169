"""PRV accounting (Gopi, Lee, Wutschitz 2021) through the prv-accountant package.

The privacy loss random variables of the steps are discretised and composed by FFT; the result
is an interval [lower, upper] around the true epsilon of width about 2 * ``eps_error``. We report
the upper end, so the epsilon we state is never below the truth by more than the library's
``delta_error`` (delta / 1000). Where the discretisation fails (very small noise multipliers
with large sample rates), we fall back to the RDP bound with a warning.
"""

from __future__ import annotations

import warnings

from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism
from prv_accountant import PRVAccountant as _PRV

from ._base import Accountant
from .rdp import rdp_epsilon

EPS_ERROR = 0.01
# The PRV discretisation's domain grows with the number of compositions: 10,000 steps took
# 6.5 s and 1 GB (2-core CPU), 100,000 did not finish in 120 s, 10^12 raised MemoryError.
# Beyond this many steps in all the (looser, valid) RDP bound is reported, with a warning.
MAX_STEPS = 30_000


def _mechanism(noise_multiplier: float, sample_rate: float):
    if sample_rate == 1:  # no subsampling: the Gaussian mechanism itself
        return GaussianMechanism(noise_multiplier)
    return PoissonSubsampledGaussianMechanism(sample_rate, noise_multiplier)


def prv_epsilon(history, delta: float, eps_error: float = EPS_ERROR) -> float:
    """Upper bound on epsilon(delta) of ``history`` = [(noise_multiplier, sample_rate, steps)]."""
    steps = [n for _, _, n in history]
    if sum(steps) > MAX_STEPS:
        warnings.warn(
            f"torch_dpfast: {sum(steps)} steps exceed what the PRV accountant computes in "
            f"reasonable time and memory ({MAX_STEPS}); reporting the RDP bound instead, which "
            "is valid but looser",
            RuntimeWarning,
            stacklevel=3,
        )
        return rdp_epsilon(history, delta)[0]
    delta_error = delta / 1000
    try:
        accountant = _PRV(
            prvs=[_mechanism(sigma, q) for sigma, q, _ in history],
            max_self_compositions=steps,
            eps_error=eps_error,
            delta_error=delta_error,
        )
        _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=steps)
    except (RuntimeError, ValueError, OverflowError, FloatingPointError) as error:
        warnings.warn(
            f"torch_dpfast: the PRV accountant failed on {list(history)} ({error}); reporting "
            "the RDP bound instead, which is valid but looser",
            RuntimeWarning,
            stacklevel=3,
        )
        return rdp_epsilon(history, delta)[0]
    return float(max(upper, 0.0))


class PRVAccountant(Accountant):
    """PRV accountant; see the module docstring."""

    mechanism = "prv"

    def __init__(self, eps_error: float = EPS_ERROR):
        super().__init__()
        self.eps_error = eps_error

    def _epsilon(self, history, delta: float) -> float:
        return prv_epsilon(history, delta, self.eps_error)

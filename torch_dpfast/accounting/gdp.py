"""Gaussian-DP accounting by the central limit theorem (Bu, Dong, Long and Su 2020), Opacus's
``accountant="gdp"``.

T steps of the Poisson-subsampled Gaussian mechanism with sampling rate q and noise multiplier
sigma are approximately mu-GDP with mu = q sqrt(T (exp(1 / sigma^2) - 1)), and mu-GDP gives
delta(epsilon) = Phi(-epsilon / mu + mu / 2) - exp(epsilon) Phi(-epsilon / mu - mu / 2); epsilon
at delta is its root. An asymptotic approximation, not an upper bound: it can underestimate
the privacy loss, most for few steps or large q (Gopi, Lee and Wutschitz 2021). Like Opacus's,
it needs one (sigma, q) for the whole run. Prefer "prv" (the default) or "rdp".
"""

from __future__ import annotations

import math
import warnings

from scipy.optimize import brentq
from scipy.stats import norm

from ._base import Accountant

UNDERESTIMATES = (
    "torch_dpfast: the 'gdp' accountant is a central-limit approximation that can underestimate "
    "the privacy loss (it is not an upper bound); prefer accountant='prv' (the default) or 'rdp'"
)


def gdp_mu(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """mu of T Poisson-subsampled Gaussian steps by the CLT."""
    return sample_rate * math.sqrt(steps * math.expm1(1.0 / noise_multiplier**2))


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism."""
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at which a mu-GDP mechanism has this delta (0 if even epsilon 0 does)."""
    if mu == math.inf:
        return math.inf
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2
        if high > 1e6:
            return math.inf
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-10))


class GaussianAccountant(Accountant):
    """CLT Gaussian-DP accountant; see the module docstring."""

    mechanism = "gdp"

    def __init__(self):
        warnings.warn(UNDERESTIMATES, UserWarning, stacklevel=3)
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] != (noise_multiplier, sample_rate):
            raise ValueError(
                "the 'gdp' accountant needs one noise multiplier and sample rate for the whole "
                "run (as Opacus's); use accountant='prv' or 'rdp' with a noise scheduler"
            )
        super().step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

    def _epsilon(self, history, delta: float) -> float:
        (sigma, q, steps), *_ = history
        return gdp_epsilon(gdp_mu(sigma, q, steps), delta)

"""Calibrating the noise multiplier to a privacy budget.

``get_noise_multiplier`` finds, by bisection on sigma, the smallest noise multiplier (to within
``epsilon_tolerance``) whose epsilon after ``steps`` steps is at most the target. The answer is
always one whose epsilon was computed and found <= target (never over the budget), and the
search stops once that epsilon is within ``epsilon_tolerance`` of the target (little budget
wasted). The fast RDP bound, which is never below PRV's, gives the starting bracket.
"""

from __future__ import annotations

import math
import warnings

from ._base import check_delta, check_mechanism
from .factory import create_accountant
from .gdp import UNDERESTIMATES

#: Beyond this noise multiplier we give up: the budget is out of reach.
MAX_NOISE_MULTIPLIER = 1e4
_MAX_ITERATIONS = 100


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier sigma that spends just under ``target_epsilon`` at ``target_delta``.

    Args:
        target_epsilon: the budget's epsilon (> 0).
        target_delta: the budget's delta, in (0, 1).
        sample_rate: q, the Poisson sampling probability of each example in each step.
        steps: the number of DP-SGD steps; or give ``epochs`` (steps = round(epochs / q)).
        accountant: "prv", "rdp" or "gdp" (an approximation; see accounting/gdp.py).
        epsilon_tolerance: stop when target - tolerance <= epsilon(sigma) <= target.

    Raises:
        ValueError: bad arguments, or a target no noise multiplier up to 1e4 reaches.
    """
    if not isinstance(target_epsilon, (int, float)) or not (
        target_epsilon > 0 and math.isfinite(target_epsilon)
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    target_delta = check_delta(target_delta)
    check_mechanism(1.0, sample_rate)
    steps = steps_for(sample_rate, steps, epochs)
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")

    if accountant == "gdp":
        warnings.warn(UNDERESTIMATES, UserWarning, stacklevel=2)

    def epsilon(sigma: float) -> float:
        # PRV falling back to the (larger) RDP bound is fine here; gdp's warning was given once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*'gdp' accountant")
            acc = create_accountant(accountant)
            acc.step(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
            return acc.get_epsilon(target_delta)

    # Bracket [low, high] with epsilon(low) > target >= epsilon(high), from the RDP bound.
    high = _rdp_bracket(target_epsilon, target_delta, sample_rate, steps)
    eps_high = epsilon(high)
    low, eps_low = high / 2, epsilon(high / 2)
    while eps_low <= target_epsilon:
        high, eps_high = low, eps_low
        low, eps_low = low / 2, epsilon(low / 2)
        if low < 1e-4:
            return high
    for _ in range(_MAX_ITERATIONS):
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        mid = _interpolate(low, eps_low, high, eps_high, target_epsilon)
        eps_mid = epsilon(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low, eps_low = mid, eps_mid
    return high


def _interpolate(low, eps_low, high, eps_high, target) -> float:
    """The next sigma to try: log-log interpolation of epsilon(sigma) aiming just under the
    target, kept 10% inside the bracket so the bisection always shrinks it."""
    t = 0.5
    if math.isfinite(eps_low) and eps_high > 0:
        aim = math.log(target * 0.999 / eps_low) / math.log(eps_high / eps_low)
        t = min(max(aim, 0.1), 0.9)
    return math.exp(math.log(low) + t * (math.log(high) - math.log(low)))


def _rdp_bracket(target_epsilon, target_delta, sample_rate, steps) -> float:
    """A sigma whose RDP epsilon (an upper bound on PRV's) is <= target, by doubling."""
    sigma = 0.5
    acc = create_accountant("rdp")
    while True:
        acc.history = [(sigma, sample_rate, steps)]
        if acc.get_epsilon(target_delta) <= target_epsilon:
            return sigma
        sigma *= 2
        if sigma > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches target_epsilon="
                f"{target_epsilon} at delta={target_delta} with sample_rate={sample_rate} over "
                f"{steps} steps; raise target_epsilon or target_delta, or train fewer steps"
            )


def steps_for(sample_rate: float, steps: int | None, epochs: float | None) -> int:
    """The number of steps from ``steps`` or ``epochs`` (one epoch = round(1/q) steps)."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        return steps
    if not isinstance(epochs, (int, float)) or not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
    return max(1, round(epochs * steps_per_epoch(sample_rate)))


def steps_per_epoch(sample_rate: float) -> int:
    """Logical steps per epoch: 1/q, rounded (at least 1)."""
    return max(1, round(1 / sample_rate))

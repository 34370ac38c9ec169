"""The accountant interface: a history of DP-SGD steps and the epsilon it has spent.

The mechanism is the Poisson-subsampled Gaussian mechanism: each step samples every example
independently with probability q (``sample_rate``) and adds N(0, sigma^2 C^2) noise to the sum of
clipped gradients. The history is a list of ``(noise_multiplier, sample_rate, steps)`` entries;
consecutive steps with the same parameters share one entry.
"""

from __future__ import annotations

import math
import warnings


def check_delta(delta: float) -> float:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def warn_large_delta(delta: float, dataset_size: int, stacklevel: int = 3) -> None:
    """Warns when delta > 1/N: a mechanism that publishes one random example outright is
    (0, 1/N)-DP, so such a delta permits leaking examples and the epsilon means little."""
    if dataset_size > 0 and delta > 1 / dataset_size:
        warnings.warn(
            f"torch_dpfast: delta = {delta:g} exceeds 1/N = {1 / dataset_size:.3g} for N = "
            f"{dataset_size} examples; with delta > 1/N a mechanism may reveal whole examples "
            "and still meet (epsilon, delta). Use delta well below 1/N (e.g. 1/(10 N))",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_mechanism(noise_multiplier: float, sample_rate: float) -> None:
    """sigma >= 0 (inf allowed: such steps release nothing) and q in (0, 1]; NaN refused."""
    if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
        raise ValueError(
            f"noise_multiplier must be a number >= 0 (or inf), got {noise_multiplier!r}"
        )
    if not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


class Accountant:
    """Base class: records steps; subclasses turn the history into epsilon."""

    mechanism = ""

    def __init__(self):
        self.history: list[tuple[float, float, int]] = []
        self._cache: dict = {}

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records ``steps`` DP-SGD steps taken with this noise multiplier and sample rate."""
        check_mechanism(noise_multiplier, sample_rate)
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def __len__(self) -> int:
        """The number of steps taken."""
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        """The epsilon of the steps taken so far, at this delta (an upper bound)."""
        delta = check_delta(delta)
        # Steps with infinite noise release nothing: they add no privacy loss.
        history = tuple(
            (sigma, q, n) for sigma, q, n in self.history if n > 0 and sigma != math.inf
        )
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf
        key = (history, delta)
        if key not in self._cache:
            self._cache = {key: self._epsilon(history, delta)}
        return self._cache[key]

    def _epsilon(self, history, delta: float) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mechanism") != self.mechanism:
            raise ValueError(
                f"this state was saved by the {state.get('mechanism')!r} accountant, not "
                f"{self.mechanism!r}; create the PrivacyEngine with accountant="
                f"{state.get('mechanism')!r} to resume it"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, history={self.history})"

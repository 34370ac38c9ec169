"""Renyi-DP accounting (Mironov 2017; Mironov, Talwar, Zhang 2019) through the prv-accountant
package's implementation of TF Privacy's analysis of the subsampled Gaussian mechanism.

For each order alpha, the RDP of the steps add up; epsilon at delta is the best over the orders
of rdp(alpha) - log(delta alpha) / (alpha - 1) + log(1 - 1/alpha) (Balle et al. 2020). A valid
upper bound, looser than PRV accounting.
"""

from __future__ import annotations

import math

import numpy as np
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant.other_accountants import RDP

from ._base import Accountant, check_delta

#: The orders alpha searched, as in TF Privacy and Opacus.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def rdp_epsilon(history, delta: float, orders=ORDERS) -> tuple[float, float]:
    """(epsilon(delta), the best order alpha) of the steps in ``history`` = [(noise_multiplier,
    sample_rate, steps)]: min over alpha of rdp(alpha) - log(delta alpha) / (alpha - 1) +
    log(1 - 1/alpha)."""
    mechanisms = [PoissonSubsampledGaussianMechanism(q, sigma) for sigma, q, _ in history]
    accountant = RDP(mechanisms, orders=list(orders))
    alphas = np.asarray(accountant.orders, dtype=np.float64)
    rdp = sum(r * n for r, (_, _, n) in zip(accountant.rdps, history))
    epsilons = rdp - np.log(delta * alphas) / (alphas - 1) + np.log1p(-1 / alphas)
    best = int(np.nanargmin(epsilons))
    return float(max(epsilons[best], 0.0)), float(alphas[best])


class RDPAccountant(Accountant):
    """Renyi-DP accountant; see the module docstring."""

    mechanism = "rdp"

    def _epsilon(self, history, delta: float) -> float:
        return rdp_epsilon(history, delta)[0]

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        """(epsilon, the best order alpha) at ``delta``, over ``alphas`` (default: the orders
        of Opacus and TF Privacy): Opacus's ``RDPAccountant.get_privacy_spent``."""
        delta = check_delta(delta)
        history = [(s, q, n) for s, q, n in self.history if n > 0 and s != math.inf]
        if not history:
            return 0.0, 0.0
        if any(s == 0 for s, _, _ in history):
            return math.inf, 0.0
        return rdp_epsilon(history, delta, ORDERS if alphas is None else alphas)

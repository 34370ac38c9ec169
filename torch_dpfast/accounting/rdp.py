"""Renyi-DP accounting (Mironov 2017; Mironov, Talwar, Zhang 2019) through the prv-accountant
package's implementation of TF Privacy's analysis of the subsampled Gaussian mechanism.

For each order alpha, the RDP of the steps add up; epsilon at delta is the best over the orders
of rdp(alpha) - log(delta alpha) / (alpha - 1) + log(1 - 1/alpha) (Balle et al. 2020). A valid
upper bound, looser than PRV accounting.
"""

from __future__ import annotations

from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant.other_accountants import RDP

from ._base import Accountant

#: The orders alpha searched, as in TF Privacy and Opacus.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def rdp_epsilon(history, delta: float) -> float:
    """epsilon(delta) of the steps in ``history`` = [(noise_multiplier, sample_rate, steps)]."""
    mechanisms = [PoissonSubsampledGaussianMechanism(q, sigma) for sigma, q, _ in history]
    _, _, epsilon = RDP(mechanisms, orders=ORDERS).compute_epsilon(
        delta=delta, num_self_compositions=[n for _, _, n in history]
    )
    return float(max(epsilon, 0.0))


class RDPAccountant(Accountant):
    """Renyi-DP accountant; see the module docstring."""

    mechanism = "rdp"

    def _epsilon(self, history, delta: float) -> float:
        return rdp_epsilon(history, delta)

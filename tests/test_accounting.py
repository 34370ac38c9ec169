"""Accountants and noise calibration against the libraries' own results."""

from __future__ import annotations

import math
import random

import pytest
from prv_accountant.dpsgd import DPSGDAccountant

from torch_dpfast import accounting

CASES = [
    (1.1, 0.01, 300, 1e-5),
    (0.8, 0.004, 1000, 1e-6),
    (2.3, 0.1, 50, 1e-5),
    (1.0, 1.0, 7, 1e-5),
]


def _random_case(seed: int):
    rng = random.Random(seed)
    return (
        rng.uniform(0.7, 3.0),
        rng.uniform(0.002, 0.2),
        rng.randint(1, 400),
        10 ** -rng.randint(4, 7),
    )


@pytest.mark.parametrize("case", CASES + [_random_case(s) for s in range(3)])
def test_prv_epsilon_is_prv_accountants_upper_bound(case):
    sigma, q, steps, delta = case
    ours = accounting.compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="prv"
    )
    if q == 1:  # no subsampling: compare against the RDP bound, which is never below it
        rdp = accounting.compute_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp"
        )
        assert 0.8 * rdp < ours <= rdp
        return
    reference = DPSGDAccountant(
        noise_multiplier=sigma,
        sampling_probability=q,
        max_steps=steps,
        eps_error=0.01,
        delta_error=delta / 1000,
    ).compute_epsilon(delta=delta, num_steps=steps)
    assert ours == pytest.approx(reference[2], rel=1e-9)


@pytest.mark.parametrize("case", CASES + [_random_case(s) for s in range(10, 13)])
def test_rdp_epsilon_matches_opacus(case):
    from opacus.accountants import RDPAccountant as OpacusRDP

    sigma, q, steps, delta = case
    ours = accounting.compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp"
    )
    theirs = OpacusRDP()
    theirs.history = [(sigma, q, steps)]
    assert ours == pytest.approx(theirs.get_epsilon(delta), rel=1e-6)


def test_prv_matches_opacus_prv_and_is_below_rdp():
    from opacus.accountants import PRVAccountant as OpacusPRV

    sigma, q, steps, delta = 1.3, 0.02, 500, 1e-5
    ours = accounting.PRVAccountant()
    ours.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    theirs = OpacusPRV()
    theirs.history = [(sigma, q, steps)]
    assert ours.get_epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), abs=0.02)
    rdp = accounting.RDPAccountant()
    rdp.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert ours.get_epsilon(delta) < rdp.get_epsilon(delta)


def test_history_merges_repeated_steps_and_composes_heterogeneous_ones():
    acc = accounting.PRVAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    for _ in range(20):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
    assert acc.history == [(1.0, 0.05, 30), (2.0, 0.05, 20)] and len(acc) == 50
    both = acc.get_epsilon(1e-5)
    first = accounting.compute_epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=30, delta=1e-5)
    assert (
        first
        < both
        < first
        + accounting.compute_epsilon(noise_multiplier=2.0, sample_rate=0.05, steps=20, delta=1e-5)
    )


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_edge_cases_and_state_round_trip(name):
    acc = accounting.create_accountant(name)
    assert acc.get_epsilon(1e-5) == 0.0  # no step taken, nothing spent
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    fresh = accounting.create_accountant(name)
    fresh.load_state_dict(acc.state_dict())
    assert fresh.history == acc.history and fresh.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.get_epsilon(1e-5) == math.inf  # a step without noise is not private at all
    other = "rdp" if name == "prv" else "prv"
    with pytest.raises(ValueError, match=f"accountant='{name}'"):
        accounting.create_accountant(other).load_state_dict(fresh.state_dict())


def test_bad_arguments_are_named():
    acc = accounting.PRVAccountant()
    for delta in (0, 1, -1e-5, 2):
        with pytest.raises(ValueError, match="delta"):
            acc.get_epsilon(delta)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(noise_multiplier=-1, sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1, sample_rate=1.5)
    with pytest.raises(ValueError, match="accountant"):
        accounting.create_accountant("moments")


def test_prv_failure_falls_back_to_rdp_with_a_warning():
    with pytest.warns(RuntimeWarning, match="RDP bound instead"):
        eps = accounting.compute_epsilon(
            noise_multiplier=0.3, sample_rate=0.1, steps=100, delta=1e-5
        )
    rdp = accounting.compute_epsilon(
        noise_multiplier=0.3, sample_rate=0.1, steps=100, delta=1e-5, accountant="rdp"
    )
    assert eps == rdp


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize("target, q, epochs", [(8.0, 0.01, 2), (1.0, 0.05, 3), (3.0, 0.5, 1)])
def test_calibration_never_overspends_and_wastes_under_five_percent(name, target, q, epochs):
    sigma = accounting.get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, epochs=epochs, accountant=name
    )
    steps = epochs * accounting.steps_per_epoch(q)
    eps = accounting.compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=name
    )
    assert 0.95 * target <= eps <= target


def test_calibration_takes_steps_or_epochs_and_refuses_unreachable_targets():
    by_steps = accounting.get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.1, steps=30, accountant="rdp"
    )
    by_epochs = accounting.get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.1, epochs=3, accountant="rdp"
    )
    assert by_steps == by_epochs
    with pytest.raises(ValueError, match="no noise multiplier"):
        accounting.get_noise_multiplier(
            target_epsilon=1e-3, target_delta=1e-10, sample_rate=1.0, steps=10**6, accountant="rdp"
        )
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        accounting.get_noise_multiplier(target_epsilon=1, target_delta=1e-5, sample_rate=0.1)
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.get_noise_multiplier(
            target_epsilon=0, target_delta=1e-5, sample_rate=0.1, steps=3
        )
    with pytest.raises(ValueError, match="delta"):
        accounting.get_noise_multiplier(
            target_epsilon=1, target_delta=1.0, sample_rate=0.1, steps=3
        )

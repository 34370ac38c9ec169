"""torch_dpfast/validation.py: every check refuses what an attacker or a typo would pass
(bools as numbers, NaN, inf, negatives, wrong choices) and names the argument."""

import math

import pytest

from torch_dpfast import validation as v


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, -math.inf, True, "1", None])
def test_positive_numbers_only(bad):
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        v.check_positive("max_grad_norm", bad)


def test_positive_and_non_negative_return_floats():
    assert v.check_positive("c", 2) == 2.0 and isinstance(v.check_positive("c", 2), float)
    assert v.check_non_negative("sigma", 0) == 0.0


@pytest.mark.parametrize("bad", [-1e-9, math.nan, math.inf, False, "0"])
def test_non_negative_numbers_only(bad):
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        v.check_non_negative("noise_multiplier", bad)


def test_op_prefix_names_the_op():
    with pytest.raises(ValueError, match="^clip_factors: max_norm must be"):
        v.check_positive("max_norm", -1, where="clip_factors: ")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4"])
def test_counts_are_ints_at_least_the_minimum(bad):
    with pytest.raises(ValueError, match="physical_batch_size must be an int >= 1"):
        v.check_count("physical_batch_size", bad)


def test_optional_count_takes_none():
    assert v.check_count("physical_batch_size", None, optional=True) is None
    with pytest.raises(ValueError, match="or None"):
        v.check_count("physical_batch_size", 0, optional=True)
    with pytest.raises(ValueError):
        v.check_count("physical_batch_size", None)


def test_choices_and_loss_reduction():
    assert v.check_choice("padding", "pow2", ("full", "pow2")) == "pow2"
    with pytest.raises(ValueError, match=r"padding must be one of \('full', 'pow2'\), got 'half'"):
        v.check_choice("padding", "half", ("full", "pow2"))
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        v.check_loss_reduction("none")

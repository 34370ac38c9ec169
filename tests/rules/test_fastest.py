"""rules/_fastest.py: the faster way is chosen per key by timing, kept, and run alone after."""

import itertools

import pytest
import torch

from torch_dpfast.rules import _fastest


@pytest.fixture
def clock(monkeypatch):
    """charge(seconds, value): a way's run, moving the clock _fastest reads by ``seconds``."""
    state = {"now": 0.0}

    def charge(seconds, value):
        state["now"] += seconds
        return torch.tensor(value)

    monkeypatch.setattr(_fastest, "perf_counter", lambda: state["now"])
    monkeypatch.setattr(_fastest, "_choices", _fastest.OrderedDict())
    return charge


def test_the_faster_way_is_chosen_kept_and_run_alone(clock):
    calls = []

    def way(name, seconds):
        return lambda: (calls.append(name), clock(seconds, float(len(name))))[1]

    ways = {"slow": way("slow", 3.0), "quick": way("quick", 1.0)}
    assert _fastest.fastest("k", ways).item() == 5.0  # the winner's own result
    assert calls == ["slow", "slow", "quick", "quick"]
    assert _fastest.chosen("k") == "quick"
    calls.clear()
    _fastest.fastest("k", ways)
    assert calls == ["quick"]
    assert _fastest.chosen("other") is None


def test_at_most_max_shapes_choices_are_kept(clock, monkeypatch):
    monkeypatch.setattr(_fastest, "MAX_SHAPES", 3)
    ways = {"only": lambda: clock(1.0, 0.0)}
    for key in itertools.islice(itertools.count(), 5):
        _fastest.fastest(key, ways)
    assert [_fastest.chosen(k) for k in range(5)] == [None, None, "only", "only", "only"]

"""cpu_memory.py: glibc's trim and mmap thresholds set once per process when a CPU model is
attached, the settings passed, the opt-out, and C libraries without mallopt."""

import sys

import pytest
import torch
from torch import nn

import torch_dpfast as dpf
from torch_dpfast import cpu_memory


class _FakeLibc:
    def __init__(self, result=1):
        self.calls = []
        self.result = result

        def mallopt(param, value):
            self.calls.append((param, value))
            return self.result

        self.mallopt = mallopt


@pytest.fixture
def fresh(monkeypatch):
    """The process-wide state forgotten, and ctypes.CDLL(None) answering with a fake libc."""
    monkeypatch.setitem(cpu_memory._state, "kept", None)
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    libc = _FakeLibc()
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    return libc


def test_sets_both_thresholds_once(fresh):
    assert cpu_memory.keep_freed_memory()
    assert fresh.calls == [(-1, 2**31 - 1), (-3, 32 << 20)]
    assert cpu_memory.keep_freed_memory()
    assert len(fresh.calls) == 2
    assert "kept" in cpu_memory.status()


def test_the_environment_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV, "0")
    assert not cpu_memory.keep_freed_memory()
    assert fresh.calls == []
    assert cpu_memory.ENV in cpu_memory.status()


def test_a_refused_setting_or_no_mallopt_reports_false(fresh, monkeypatch):
    fresh.result = 0
    assert not cpu_memory.keep_freed_memory()
    monkeypatch.setitem(cpu_memory._state, "kept", None)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: object())  # musl: no mallopt
    assert not cpu_memory.keep_freed_memory()


def test_other_platforms_are_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not cpu_memory.keep_freed_memory()
    assert fresh.calls == []


def test_attaching_a_cpu_model_sets_it(fresh):
    model = nn.Linear(3, 2)
    attachment = dpf.attach(model, probe_coupling=False)
    try:
        assert fresh.calls == [(-1, 2**31 - 1), (-3, 32 << 20)]
    finally:
        attachment.detach()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")
def test_glibc_takes_the_settings(monkeypatch):
    monkeypatch.setitem(cpu_memory._state, "kept", None)
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    import ctypes

    if getattr(ctypes.CDLL(None), "mallopt", None) is None:
        pytest.skip("not glibc")
    assert cpu_memory.keep_freed_memory()
    torch.empty(64 << 20, dtype=torch.uint8)  # allocations still work

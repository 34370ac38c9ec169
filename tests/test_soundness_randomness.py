"""Secure mode draws every privacy-relevant random number from a cryptographically secure
source with a full-entropy key: never from a torch.Generator (whose CPU Mersenne Twister keeps
32 bits of a seed: before this, one step's noise was reproducible from 32 bits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import torch_dpfast as dpf
from tests.helpers import private
from torch_dpfast import random_source
from torch_dpfast.random_source import RandomSource


def test_a_torch_generator_keeps_only_32_bits_of_its_seed():
    """Why secure mode must not reseed one: seeds 5 and 5 + 2^32 give the same stream."""
    a = torch.Generator().manual_seed(5)
    b = torch.Generator().manual_seed(5 + 2**32)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def _forbid_torch_randomness(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("secure mode drew from a torch generator")

    for name in ("randn", "randperm", "binomial", "randint", "normal"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(dpf.ops, "add_noise_", refuse)


def test_a_secure_training_run_draws_nothing_from_torch_generators(gen, monkeypatch):
    data = TensorDataset(torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,)))
    engine, model, optimizer, loader = private(
        nn.Linear(4, 3), data, 6, physical_batch_size=4, secure_mode=True
    )
    model(torch.randn(2, 4))  # the independence probe's (not privacy-relevant) draws
    urandom_calls = []
    real = random_source.os.urandom
    monkeypatch.setattr(random_source.os, "urandom", lambda n: urandom_calls.append(n) or real(n))
    _forbid_torch_randomness(monkeypatch)
    before = model.weight.detach().clone()
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert not torch.equal(before, model.weight)
    assert sum(urandom_calls) >= 8 * model.weight.numel()  # noise bytes came from the OS
    assert engine.state_dict()["data_loader"]["random"] == {}


def test_secure_noise_is_the_box_muller_transform_of_os_bytes(monkeypatch):
    words = np.arange(1, 9, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    monkeypatch.setattr(random_source.os, "urandom", lambda n: words.tobytes()[:n])
    z = RandomSource(secure=True).normal(7)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius, angle = np.sqrt(-2 * np.log1p(-u[:4])), 2 * math.pi * u[4:]
    expected = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:7]
    np.testing.assert_allclose(z.numpy(), expected, rtol=0, atol=0)


def test_secure_draws_have_the_right_distributions():
    source = RandomSource(secure=True)
    z = source.normal(200_000)
    assert abs(z.mean().item()) < 5 / math.sqrt(2e5)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / 2e5)
    assert bool(torch.isfinite(z).all())
    counts = source.binomial(torch.full((200,), 1000.0), torch.full((200,), 0.3))
    assert counts.dtype == torch.float32 and abs(counts.mean().item() - 300) < 5 * 14.5 / 14.1
    first = torch.stack([source.randperm(5) for _ in range(2000)])
    assert all(sorted(row.tolist()) == list(range(5)) for row in first[:50])
    frequency = torch.bincount(first[:, 0], minlength=5).double() / 2000
    assert bool(((frequency - 0.2).abs() < 0.05).all())


def test_the_shared_stream_is_keyed_with_at_least_128_bits():
    key = bytes(range(32))
    a, b = RandomSource(key=key), RandomSource(key=key)
    assert torch.equal(a.randperm(50), b.randperm(50))  # every rank draws the same sizes
    assert not torch.equal(RandomSource(key=bytes(32)).randperm(50), a.randperm(50))
    with pytest.raises(ValueError, match="128 bits"):
        RandomSource(key=b"short")
    with pytest.raises(RuntimeError, match="no torch.Generator"):
        a.draw()


def test_two_secure_runs_with_the_same_torch_seed_differ():
    def noise():
        torch.manual_seed(0)
        optimizer = dpf.DPOptimizer(
            torch.optim.SGD([nn.Parameter(torch.zeros(64))], lr=1.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1.0,
            secure_mode=True,
        )
        sums = [torch.zeros(64)]
        optimizer._noise_and_scale(sums)
        return sums[0]

    assert not torch.equal(noise(), noise())


@pytest.mark.cuda
def test_secure_noise_reaches_gpu_tensors(gen):
    """Secure normals are drawn on the CPU from OS bytes and copied to the gradients' device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    grads = [
        torch.zeros(4096, device="cuda"),
        torch.zeros(3, 5, device="cuda", dtype=torch.bfloat16),
    ]
    random_source.add_secure_noise_(grads, std=2.0, scale=0.5, source=RandomSource(secure=True))
    assert grads[0].device.type == "cuda" and grads[1].dtype == torch.bfloat16
    assert abs(grads[0].std().item() - 1.0) < 0.1  # std 2 scaled by 0.5

"""add_noise_: distribution, independence between tensors, reproducibility from a generator.

Statistical thresholds sit near the 1e-6 tail so that fresh random seeds do not make them
flaky, yet a wrong std, a shared stream or a missing scale fails by orders of magnitude."""

import math

import pytest
import torch

import torch_dpfast as dpf
from tests.helpers import backends


def _noise(backend, device, shapes, std, scale, seed, dtype=torch.float32):
    grads = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    dpf.ops.add_noise_(grads, std, scale, torch.Generator().manual_seed(seed), backend)
    return grads


def _ks_statistic(sample: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample and the standard normal."""
    x = sample.double().sort().values
    cdf = torch.special.ndtr(x)
    n = x.numel()
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lower = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_gaussian_with_the_requested_std_and_scale(dtype, device, gen):
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    std, scale = 2.5, 0.1
    for backend in backends("add_noise_", device):
        (z,) = _noise(backend, device, [(301, 333)], std, scale, seed, dtype)
        z = z.cpu().double().flatten() / (std * scale)
        n = z.numel()
        assert abs(z.mean().item()) < 5.5 / math.sqrt(n)
        assert abs(z.std().item() - 1.0) < 5.5 * math.sqrt(0.5 / n)
        assert _ks_statistic(z) < 2.7 / math.sqrt(n)


def test_tensors_get_independent_noise(device, gen):
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    for backend in backends("add_noise_", device):
        a, b, c = _noise(backend, device, [(50_000,), (50_000,), (3, 7)], 1.0, 1.0, seed)
        correlation = torch.corrcoef(torch.stack([a, b]).cpu())[0, 1].item()
        assert abs(correlation) < 5.5 / math.sqrt(a.numel())
        assert not torch.equal(a[:21], c.flatten())


def test_noise_is_added_then_scaled_in_place(device, gen):
    for backend in backends("add_noise_", device):
        g = torch.full((40_000,), 3.0, device=device)
        dpf.ops.add_noise_([g], 0.5, 2.0, gen, backend)
        assert abs(g.mean().item() - 6.0) < 5.5 * 1.0 / math.sqrt(g.numel())
        h = torch.full((5,), 3.0, device=device)
        dpf.ops.add_noise_([h], 0.0, 0.25, gen, backend)
        assert torch.equal(h, torch.full((5,), 0.75, device=device))


def test_same_generator_state_reproduces_and_advancing_changes(device):
    for backend in backends("add_noise_", device):
        first = _noise(backend, device, [(9,), (2, 3)], 1.0, 1.0, seed=1234)
        again = _noise(backend, device, [(9,), (2, 3)], 1.0, 1.0, seed=1234)
        assert all(torch.equal(x, y) for x, y in zip(first, again))
        generator = torch.Generator().manual_seed(1234)
        grads = [torch.zeros(9, device=device)]
        dpf.ops.add_noise_(grads, 1.0, 1.0, generator, backend)
        second = [torch.zeros(9, device=device)]
        dpf.ops.add_noise_(second, 1.0, 1.0, generator, backend)
        assert not torch.equal(grads[0], second[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype, device, gen):
    for backend in backends("add_noise_", device):
        g = torch.ones(20_000, dtype=dtype, device=device)
        dpf.ops.add_noise_([g, g[:0]], 1.0, 1.0, gen, backend)
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert abs(g.float().std().item() - 1.0) < 0.05


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="std must be >= 0"):
        dpf.ops.add_noise_([torch.zeros(3)], -1.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        dpf.ops.add_noise_([torch.zeros(3)], 1.0, float("inf"))
    with pytest.raises(TypeError, match="floating-point"):
        dpf.ops.add_noise_([torch.zeros(3, dtype=torch.long)], 1.0)
    dpf.ops.add_noise_([], 1.0)  # nothing to do is not an error


def test_op_traces_under_torch_compile_and_passes_opcheck(device):
    def step(grads, generator):
        dpf.ops.add_noise_(grads, 1.0, 0.5, generator)
        return grads

    eager = step([torch.ones(4, 3, device=device)], torch.Generator().manual_seed(7))
    compiled = torch.compile(step, backend="aot_eager")(
        [torch.ones(4, 3, device=device)], torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(compiled, eager)
    for backend in backends("add_noise_", device):
        grads = [torch.ones(4, 3, device=device), torch.ones(5, device=device)]
        torch.library.opcheck(torch.ops.torch_dpfast.add_noise_, (grads, 1.0, 0.5, 42, backend))

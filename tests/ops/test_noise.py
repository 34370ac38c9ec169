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


# An independent reference of the compiled kernels' noise: Philox4x32-10 in Python integers and
# Box-Muller in float64 libm. Element j of tensor k is normal j % 2 of the block with counter
# (j // 2, stream k) under the 64-bit seed: radius sqrt(-2 ln u) from words 0-1 (52 bits,
# u = 1 - bits / 2^52 in (0, 1], so the tail reaches 8.49 sigma), angle 2 pi t from words 2-3.
_MASK = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    a, b, c, d = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * a, 0xCD9E8D57 * c
        a, b, c, d = (p1 >> 32) ^ b ^ k0, p1 & _MASK, (p0 >> 32) ^ d ^ k1, p0 & _MASK
        k0, k1 = (k0 + 0x9E3779B9) & _MASK, (k1 + 0xBB67AE85) & _MASK
    return a, b, c, d


def test_python_philox_matches_the_random123_known_answers():
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox4x32_10((_MASK,) * 4, (_MASK,) * 2) == (
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    )


def _reference_noise(seed: int, stream: int, numel: int) -> list[float]:
    seed %= 2**64
    out = []
    for pair in range((numel + 1) // 2):
        a, b, c, d = _philox4x32_10(
            (pair & _MASK, pair >> 32, stream, 0), (seed & _MASK, seed >> 32)
        )
        u = 1.0 - (((a << 32) | b) >> 12) / 2.0**52
        t = (((c << 32) | d) >> 12) / 2.0**52
        radius = math.sqrt(-2.0 * math.log(u))
        out += [radius * math.cos(2 * math.pi * t), radius * math.sin(2 * math.pi * t)]
    return out[:numel]


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_compiled_noise_is_philox_box_muller_to_1e_12(backend, gen):
    if backend not in dpf.ops.available("add_noise_"):
        pytest.skip(f"no {backend} add_noise_ in this installation")
    device = "cuda" if backend == "cuda" else "cpu"
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=gen))
    shapes = [(3,), (1,), (2, 263)]  # odd sizes, a single element, more than one chunk
    grads = [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes]
    torch.ops.torch_dpfast.add_noise_(grads, 1.0, 1.0, seed, backend)
    for k, g in enumerate(grads):
        expected = torch.tensor(_reference_noise(seed, k, g.numel()), dtype=torch.float64)
        torch.testing.assert_close(g.cpu().flatten(), expected, rtol=1e-12, atol=1e-12)

"""Fused multi-tensor Gaussian noise for the DP-SGD step: g_k <- (g_k + std * z_k) * scale.

The kernels draw from a counter-based generator keyed by one 64-bit seed, which is taken from
the caller's ``torch.Generator`` (advancing it), so a run is reproducible from the generator's
state and no two calls share noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from ._checks import accumulation_dtype, check_floating


@_backend.custom_op("torch_dpfast::add_noise_", mutates_args=("grads",))
def _add_noise_(grads: list[Tensor], std: float, scale: float, seed: int, backend: str) -> None:
    _backend.run("add_noise_", backend, grads, std, scale, seed)


@_add_noise_.register_fake
def _(grads, std, scale, seed, backend) -> None:
    return None


@_backend.register("add_noise_", "reference")
def add_noise_reference(grads: list[Tensor], std: float, scale: float, seed: int) -> None:
    """Reference: torch.randn from a generator seeded with ``seed``, tensor after tensor."""
    generator = torch.Generator(device=grads[0].device)
    generator.manual_seed(seed % 2**64)
    for g in grads:
        acc = accumulation_dtype(g)
        noise = torch.randn(g.shape, generator=generator, dtype=acc, device=g.device)
        g.copy_((g.to(acc) + std * noise) * scale)


_backend.register_compiled("add_noise_", "cpp", "CPU")
_backend.register_compiled("add_noise_", "cuda", "CUDA")


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit seed from ``generator`` (torch's default CPU generator if None), advancing it."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=device)
    return int(seed)


def add_noise_(
    grads: list[Tensor],
    std: float,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> None:
    """Adds Gaussian noise and rescales every tensor in place: g <- (g + std * N(0, I)) * scale.

    In DP-SGD, ``std = noise_multiplier * max_norm`` and ``scale = 1 / expected_batch_size``.
    Noise is drawn in float64 (``cpp`` and ``cuda``: the same Philox Box-Muller function, so
    both give the same numbers) or float32 (reference) and added in at least float32.

    Args:
        grads: summed clipped gradients, any shapes and floating dtypes, on one device.
        std: standard deviation of the noise, >= 0.
        scale: factor applied after adding the noise.
        generator: source of the seed (advanced by one draw); torch's default if None.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"cuda"``.
    """
    op = "add_noise_"
    grads = list(grads)
    for name, value in (("std", std), ("scale", scale)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    if std < 0:
        raise ValueError(f"{op}: std must be >= 0, got {std}")
    if not grads:
        return
    check_floating(op, **{f"grads[{k}]": g for k, g in enumerate(grads)})
    devices = {g.device for g in grads}
    if len(devices) != 1:
        raise ValueError(
            f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    seed = draw_seed(generator)
    backend = _backend.resolve(op, backend, devices.pop(), grads, float(std), float(scale), seed)
    _add_noise_(grads, float(std), float(scale), seed, backend)

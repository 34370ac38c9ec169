"""Test helpers: random tensors, tolerances and the backends to test on a device."""

from __future__ import annotations

import os

import torch

import torch_dpfast as dpf

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (rtol, atol) of a result computed from inputs of this dtype against the float64 truth of the
# same (rounded) inputs; float32 accumulation over the test sizes stays well inside these.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-5, 1e-5),  # inputs are rounded to bf16 but accumulated in float32
    torch.float16: (2e-5, 1e-5),
}


def randn(*shape, gen: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Normal draws from the CPU generator ``gen``, then cast and moved."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def backends(op: str, device: str, dtype: torch.dtype | None = None) -> list[str]:
    """Every backend of ``op`` that runs on ``device`` (and inputs of ``dtype``) here: Triton
    takes no float64 and runs on CPU only in its interpreter (TRITON_INTERPRET=1); the CUDA
    linear-layer kernels run on tensor cores, at the tf32 and bf16 settings only."""
    runs_on = {"cpp": "cpu", "cuda": "cuda"}
    found = [b for b in dpf.ops.available(op) if runs_on.get(b, device) == device]
    if "triton" in found and (dtype == torch.float64 or (device == "cpu" and not INTERPRET)):
        found.remove("triton")
    tensor_cores = op in ("linear_norm_sq", "linear_clipped_sum")  # TF32/bf16 only
    if (
        "cuda" in found
        and tensor_cores
        and (dpf.get_precision() == "ieee" or dtype == torch.float64)
    ):
        found.remove("cuda")  # tests/ops/test_cuda_layers.py tests them at their precisions
    return found


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
    """``actual`` (from ``dtype`` inputs) against the float64 ``expected``; ``scale`` widens the
    absolute tolerance for results whose magnitude grows with the problem size."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().to(torch.float64),
        expected.detach().cpu().to(torch.float64),
        rtol=rtol,
        atol=atol * scale,
    )


def private(model, dataset, batch_size: int, lr: float = 0.1, collate_fn=None, **kwargs):
    """(engine, model, optimizer, loader) of ``make_private`` on SGD and a DataLoader of
    ``dataset`` (with ``collate_fn``); ``kwargs`` go to make_private (noise_multiplier 1.0 and
    C 1.0 by default)."""
    from torch.utils.data import DataLoader

    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    engine = dpf.PrivacyEngine(secure_mode=kwargs.pop("secure_mode", False))
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn),
        **kwargs,
    )
    return engine, model, optimizer, loader


def train_epoch(model, optimizer, loader) -> None:
    """One pass over ``loader``'s (input, label) batches with cross-entropy, the usual loop."""
    import torch.nn.functional as F

    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def clipped_reference(per_example: torch.Tensor, max_norm: float):
    """(sum_i c_i G_i, ||G_i||^2) of flattened per-example gradients (K, P), with c_i =
    min(1, C / (||G_i|| + 1e-6)): the clipped update every mode must reproduce."""
    norms = per_example.norm(dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * per_example).sum(0), norms.square()


def watch_ran(monkeypatch, owner, name: str) -> list[bool]:
    """A list that every call of ``owner.<name>`` (an optional fast path returning None where
    it does not run) appends to: whether it ran."""
    original, ran = getattr(owner, name), []

    def watched(*args, **kwargs):
        result = original(*args, **kwargs)
        ran.append(result is not None)
        return result

    monkeypatch.setattr(owner, name, watched)
    return ran


def watch_normed_materialising(monkeypatch) -> list[bool]:
    """Whether each call of LinearUsesRule.normed_per_example_grads (the recurrent rules'
    per-example gradients with their norms, by the compiled kernel) ran (False: it fell back
    to batched GEMMs)."""
    from torch_dpfast.rules._linear_uses import LinearUsesRule

    return watch_ran(monkeypatch, LinearUsesRule, "normed_per_example_grads")


def watch_ghost_kernel(monkeypatch) -> list[bool]:
    """Whether each call of LinearUsesRule.norm_sq_and_bound (the recurrent rules' ghost norms
    and bounds by the compiled kernel) ran."""
    from torch_dpfast.rules._linear_uses import LinearUsesRule

    return watch_ran(monkeypatch, LinearUsesRule, "norm_sq_and_bound")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, T, C) with the same values: contiguous ("batch_first"), a view of time-major memory
    ("time_major"), or ("columns") columns 3.. of a wider tensor (rows further apart than C, as
    the recurrent rule's joined input)."""
    if layout == "time_major":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "columns":
        wide = torch.zeros(*t.shape[:2], t.shape[2] + 5, dtype=t.dtype)
        wide[..., 3 : 3 + t.shape[2]] = t
        return wide[..., 3 : 3 + t.shape[2]]
    return t

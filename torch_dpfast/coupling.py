"""The independence probe: does changing one example move another example's numbers?

Per-example clipping bounds each example's own gradient; it says nothing if the model lets one
example change what another computes. A parameter-free op such as ``h - h.mean(0)`` between two
layers, or a layer that sees the batch in another dimension than 0 (sequence-first with T equal
to the batch), moved the clipped sum by several C while every norm was clipped.

On the first forward with gradients on and a batch of at least two rows, before the real
forward runs, the probe runs the model twice without gradients on the same arguments, the
second time with example ``PROBE_ROW`` replaced by other values (floats: a large random change;
integer ids: shifted by one), both times from the same random state (so dropout draws the same
masks). Every tensor that dim-0 indexes the batch (the inputs of the captured layers, in call
order, and the model's outputs) must keep all other rows; the first that does not is named in
the error. Two no-grad forwards of one batch, once per attachment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map_only

from .explain import check_no_batch_statistics

PROBE_ROW = 1
_SEED = 20261202


def install(model: nn.Module, modules: dict[str, nn.Module]):
    """Runs :func:`probe` on the first forward of ``model`` that qualifies; returns the hook
    handle (removed once the probe ran)."""

    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        batch = _batch_size(args, kwargs)
        if batch is None or batch < 2:
            return
        handle.remove()
        probe(model, modules, args, kwargs, batch)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle


def probe(model: nn.Module, modules: dict[str, nn.Module], args, kwargs, batch: int) -> None:
    """Raises if example ``PROBE_ROW`` of the batch moves another example's layer inputs or
    outputs (module docstring). BatchNorm with batch statistics is named first, before any
    forward (which would also update its running statistics)."""
    check_no_batch_statistics(model)
    changed_args, changed_kwargs = _perturbed((args, kwargs), batch)
    clean = _run(model, modules, args, kwargs)
    changed = _run(model, modules, changed_args, changed_kwargs)
    for (path, a), (_, b) in zip(clean[0], changed[0]):
        if _others_moved(a, b, batch):
            raise RuntimeError(
                f"torch_dpfast: the model couples the examples of a batch: changing example "
                f"{PROBE_ROW} changed the input rows of other examples at {path!r} "
                f"({type(modules[path]).__name__}). Either something before it mixes examples "
                "(an operation over the batch dimension, such as x - x.mean(0), or BatchNorm-like "
                "statistics), or it sees the batch in another dimension than 0 (a sequence-first "
                "layer). Per-example clipping cannot bound such a model; make every example's "
                "computation independent and batch-first"
            )
    for a, b in zip(clean[1], changed[1]):
        if _others_moved(a, b, batch):
            raise RuntimeError(
                "torch_dpfast: the model couples the examples of a batch: changing example "
                f"{PROBE_ROW} changed other examples' outputs after the last captured layer (an "
                "operation over the batch dimension, such as a normalisation by batch "
                "statistics). Per-example clipping cannot bound such a model; make every "
                "example's computation independent"
            )


def _run(model, modules, args, kwargs) -> tuple[list[tuple[str, Tensor]], list[Tensor]]:
    """(the first tensor input of every captured layer call, in order; the output tensors)."""
    seen: list[tuple[str, Tensor]] = []
    handles = [
        module.register_forward_pre_hook(_recorder(path, seen)) for path, module in modules.items()
    ]
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(_SEED)
            out = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, _tensors(out)


def _recorder(path: str, seen: list):
    def record(module, inputs):
        first = next(iter(_tensors(inputs)), None)
        if first is not None:
            seen.append((path, first.detach().clone()))

    return record


def _others_moved(a: Tensor, b: Tensor, batch: int) -> bool:
    """Whether any row other than PROBE_ROW differs (beyond rounding) between ``a`` and ``b``."""
    if a.shape != b.shape or a.dim() == 0 or a.shape[0] != batch:
        return False
    keep = torch.ones(batch, dtype=torch.bool, device=a.device)
    keep[PROBE_ROW] = False
    a, b = a[keep], b[keep]
    if not a.is_floating_point():
        return not torch.equal(a, b)
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return True
    scale = a[finite].abs().max().item() if finite.any() else 0.0
    return bool(((a - b)[finite].abs() > 1e-6 * scale + 1e-30).any())


def _perturbed(tree, batch: int):
    """``tree`` with row PROBE_ROW of every batch-first tensor changed."""
    return tree_map_only(Tensor, lambda t: _perturbed_rows(t, batch), tree)


def _perturbed_rows(t: Tensor, batch: int) -> Tensor:
    if t.dim() == 0 or t.shape[0] != batch:
        return t
    out = t.clone()
    row = out[PROBE_ROW]
    if out.is_floating_point():
        generator = torch.Generator(device=out.device).manual_seed(_SEED)
        noise = torch.randn(row.shape, generator=generator, device=out.device)
        out[PROBE_ROW] = row + (10 * (row.float().std().nan_to_num() + 1) * noise).to(out.dtype)
    elif out.dtype != torch.bool:
        top = int(out.max()) + 1 if out.numel() else 1
        out[PROBE_ROW] = (row + 1) % max(top, 1)
    else:
        out[PROBE_ROW] = ~row
    return out


def _tensors(tree) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (and registered containers such as
    transformers' ModelOutput), in order."""
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def _batch_size(args, kwargs) -> int | None:
    first = next((t for t in _tensors((args, kwargs)) if t.dim() > 0), None)
    return None if first is None else first.shape[0]

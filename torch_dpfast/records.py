"""What one physical batch's captured layer calls become before clipping: a Record per call; the
batch checks (B or k B rows per layer, sequence-first layouts), calls of one module joined,
which records take their rule's fast path, and the materialised per-example gradients of the
others (summed over a parameter's uses)."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import ops
from .rules._registry import Rule, keeps_output, leading
from .rules.fallback import FALLBACK, WINDOW_ATTENTION, batch_dim

if TYPE_CHECKING:
    from .engine import Attachment


@dataclass(eq=False)
class Record:
    """One call of a captured layer: its input, and the output gradient once backward ran."""

    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]
    x: object = None  # the layer input (or what the rule's capture kind records)
    g: Tensor | None = None  # the output gradient, once backward ran
    batch_grads: dict[str, Tensor] | None = None  # fallback: the batch gradient, for checking
    generation: int = 0  # which physical batch (Attachment.begin_batch) the call belongs to
    task: int = -1  # the autograd graph task (one backward() call) that recorded g
    fold: int = 1  # rows of dim 0 per example (window attention: windows per image)
    seq_first: bool = False  # x and g hold the batch in dim 1 (attach(batch_first=False))
    owner: Attachment | None = None  # told (_on_backward) once the backward ran
    out_version: int = 0  # rules keeping outputs: the kept tensor's version when recorded

    @property
    def device(self) -> torch.device:
        return leading(self.g).device

    @property
    def batch(self) -> int:
        g = leading(self.g)
        return g.shape[batch_dim(self.module, g) if self.rule is FALLBACK else 0]


def to_batch_first(record: Record) -> None:
    """Under ``batch_first=False`` (Opacus's sequence-first models): a layer of the usual kind
    that saw (T, B, ...) inputs (``record.seq_first``) gets x and g as (B, T, ...) views, which
    is what its rule takes (every such rule is position-wise). Rules that re-implement a
    forward (attention, recurrent) make their records batch-first themselves, and call their
    children on batch-first tensors (``rules.batch_first_calls``); the generic fallback slices
    examples by the module's own ``batch_first`` and is refused without it."""
    if record.rule is FALLBACK:
        if getattr(record.module, "batch_first", None) is not False:
            raise ValueError(
                f"batch_first=False: {type(record.module).__name__} has no rule and the "
                "generic fallback cannot tell where its batch is; give it a rule "
                "(torch_dpfast.rules.register_rule), or feed the model batch-first inputs"
            )
        return
    if not record.seq_first:
        return
    x, g = record.x, record.g
    if isinstance(x, Tensor) and isinstance(g, Tensor) and x.dim() >= 2 and g.dim() >= 2:
        record.x, record.g = x.transpose(0, 1), g.transpose(0, 1)


def check_batch(record: Record, batch: int, mask: Tensor | None) -> None:
    """Every layer must see the batch of B examples in dim 0 (B = the mask's length), or k B
    rows, example-major (example i owns rows i k .. i k + k - 1): position-wise layers fed a
    flattened (B T, d) batch (OPT's MLP) get x and g viewed as (B, k, ...) (their fast path
    stays); any other layer (LeViT's norms on flattened tokens, timm Swin's window attention
    under the fallback) gets ``record.fold = k``: its per-row gradients are materialised and
    summed over each example's k rows. The independence probe checks the example-major order
    on the first forward (coupling.py)."""
    rows = record.batch
    if rows != batch:
        if rows % batch:
            raise ValueError(
                f"layers saw different batch sizes ({batch} and {rows}, the latter in "
                f"{type(record.module).__name__}); per-example clipping needs dim 0 of every "
                "layer input to be the batch (or k B rows, example-major): the model must take "
                "its inputs batch first, or be made private with batch_first=False if it is "
                "sequence-first"
            )
        if record.rule.position_wise:
            record.x, record.g = _unfolded(record.x, batch), _unfolded(record.g, batch)
        elif record.rule is FALLBACK and not isinstance(record.module, WINDOW_ATTENTION):
            raise ValueError(
                f"{type(record.module).__name__} saw {rows} rows for a batch of {batch}: the "
                "generic fallback runs one example at a time and needs each example's rows; "
                "give the module a rule (torch_dpfast.rules.register_rule)"
            )
        else:
            record.fold = rows // batch
    if mask is not None and mask.shape != (batch,):
        raise ValueError(
            f"the layers saw a batch of {batch} examples in dim 0, but the physical batch has "
            f"{mask.shape[0]} rows: the model must take its inputs batch first"
        )


def drop_stale_output(record: Record) -> None:
    """The record of a rule that keeps outputs holds x = (input, kept); if what was kept (the output
    itself, for GroupNormAct) was changed in place since the backward recorded it, x becomes the
    input alone (the rule recomputes what it would have read from it)."""
    if isinstance(record.x, tuple) and keeps_output(record.rule):
        if record.x[1]._version != record.out_version:
            record.x = record.x[0]


def _unfolded(t: Tensor, batch: int) -> Tensor:
    """(k B, ...) example-major -> (B, k, ...)."""
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


def plain_records(records: list[Record]) -> list[Record]:
    """The layer calls that can take their rule's fast path: a rule of their own (not the
    fallback), one row per example, and parameters used by no other call. The others
    materialise per-example gradients, summed over the uses."""
    uses = Counter(id(p) for r in records for p in r.params.values())
    return [
        r
        for r in records
        if r.rule is not FALLBACK
        and r.fold == 1
        and all(uses[id(p)] == 1 for p in r.params.values())
    ]


def merge_repeated(records: list[Record]) -> list[Record]:
    """The calls of one module with a ``mergeable`` rule (linear maps: Linear, recurrent cells
    called once per step) joined into one record: their inputs and output gradients, as
    (B, T_k, d), concatenated along T. Example i's gradient is sum_k sum_t g_ikt x_ikt^T, the
    gradient of one call over all the steps, so the fast path applies to the parameters used
    T times (the calls are otherwise materialised and summed)."""
    calls: dict[int, list[Record]] = {}
    for r in records:
        if r.rule.mergeable and r.fold == 1:
            calls.setdefault(id(r.module), []).append(r)
    merged = {}
    for group in calls.values():
        if len(group) > 1:
            first = group[0]
            x = _joined([r.x for r in group])
            g = _joined([r.g for r in group])
            merged[id(first)] = Record(
                first.module,
                first.rule,
                first.params,
                x=x,
                g=g,
                generation=first.generation,
                task=first.task,
                owner=first.owner,
            )
    skip = {id(r) for group in calls.values() if len(group) > 1 for r in group}
    out = []
    for r in records:
        if id(r) in merged:
            out.append(merged[id(r)])
        elif id(r) not in skip:
            out.append(r)
    return out


def _joined(parts: list):
    """Tensors (B, *, d) -> (B, sum_k T_k, d); tuples of them position-wise."""
    if isinstance(parts[0], tuple):
        return tuple(_joined(list(column)) for column in zip(*parts))
    rows = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in parts]
    return torch.cat(rows, dim=1)


def kept_prefix(mask: Tensor | None, batch: int) -> int:
    """k when exactly the first k of the ``batch`` rows are kept (a physical batch's padding
    rows are its last ones) and 0 < k < batch, else ``batch``. Only CPU masks are read: reading
    a device mask would synchronise."""
    if mask is None or mask.device.type != "cpu":
        return batch
    keep = mask.to(torch.bool)
    k = int(keep.sum())
    return k if 0 < k < batch and bool(keep[:k].all()) else batch


def leading_rows(record: Record, rows: int) -> tuple[object, object]:
    """(x, g) of a layer call cut to its first ``rows`` examples (views) where both are
    batch-first tensors, or tuples of them (the recurrent rules'); (x, g) unchanged otherwise
    (tuples of other inputs, folded windows)."""
    x, g = record.x, record.g
    batch = _batch_of(g)
    if record.fold != 1 or batch is None or rows >= batch or _batch_of(x) != batch:
        return x, g
    return _cut(x, rows), _cut(g, rows)


def _batch_of(value) -> int | None:
    """The common leading size of a tensor or a tuple of tensors; None if there is none."""
    parts = value if isinstance(value, tuple) else (value,)
    if not parts or not all(isinstance(p, Tensor) and p.dim() > 0 for p in parts):
        return None
    sizes = {p.shape[0] for p in parts}
    return sizes.pop() if len(sizes) == 1 else None


def _cut(value, rows: int):
    if isinstance(value, tuple):
        return tuple(p[:rows] for p in value)
    return value[:rows]


def zero_padded(per_example: Tensor, batch: int) -> Tensor:
    """(k, ...) values of the first k examples -> (batch, ...), zeros for the rest."""
    if per_example.shape[0] == batch:
        return per_example
    missing = per_example.new_zeros(batch - per_example.shape[0], *per_example.shape[1:])
    return torch.cat([per_example, missing])


def has_fast_path(rule: Rule) -> bool:
    """Whether ``rule`` computes norms without materialising per-example gradients: it
    overrides the default :meth:`Rule.norm_sq`, and gives the ``norm_bound`` that certifies
    them (certify.py)."""
    return type(rule).norm_sq is not Rule.norm_sq and hasattr(rule, "norm_bound")


def materialise(
    records: list[Record],
    buffers: dict[int, dict[str, Tensor]] | None = None,
    rows: int = 0,
    normed: dict[int, tuple[set[int], Tensor]] | None = None,
) -> dict[int, tuple[nn.Parameter, Tensor]]:
    """{id(p): (p, (B, *p.shape) per-example gradient summed over p's uses)}; the records
    with buffers (``buffers[id(record)]``, single-use parameters) are materialised on their
    first ``rows`` examples only, (rows, *p.shape), into those buffers. With ``normed`` (a
    dict to fill), those whose rule computes the gradients' squared norms as it writes them
    (``normed_per_example_grads``) put them there, {id(record): (ids of its parameters, (rows,)
    squared norms)}: their norms are not taken again."""
    buffers = buffers or {}
    per_example: dict[int, tuple[nn.Parameter, Tensor]] = {}
    with torch.profiler.record_function("torch_dpfast::per_example_gradients"):
        for r in records:
            _materialise_one(r, buffers, rows, per_example, normed)
    return per_example


def _materialise_one(r: Record, buffers, rows: int, per_example: dict, normed) -> None:
    """Adds the per-example gradients of one layer call to ``per_example`` (see materialise)."""
    if r.rule is FALLBACK:
        grads = FALLBACK.per_example_grads(r.module, r.x, r.g, rows=r.fold)
        _check_examples_independent(r, grads)
    elif id(r) in buffers:
        x, g = leading_rows(r, rows)
        with_norms = None
        if normed is not None and hasattr(r.rule, "normed_per_example_grads"):
            with_norms = r.rule.normed_per_example_grads(r.module, x, g, out=buffers[id(r)])
        if with_norms is None:
            grads = r.rule.per_example_grads(r.module, x, g, out=buffers[id(r)])
        else:
            grads, norm_sq = with_norms
            normed[id(r)] = ({id(r.params[name]) for name in grads}, norm_sq)
    elif r.fold > 1:  # per row, then summed over each example's rows
        grads = {
            name: grad.reshape(-1, r.fold, *grad.shape[1:]).sum(dim=1)
            for name, grad in r.rule.per_example_grads(r.module, r.x, r.g).items()
        }
    else:
        grads = r.rule.per_example_grads(r.module, r.x, r.g)
    taken = normed_ids(normed) if normed else set()
    for name, grad in grads.items():
        p = r.params[name]
        prev = per_example.get(id(p))
        if prev is not None and id(p) in taken:
            raise RuntimeError(
                f"torch_dpfast: internal error: {name!r} of {type(r.module).__name__} was "
                "materialised with its norms and used again; its norms would miss a use"
            )
        per_example[id(p)] = (p, grad if prev is None else prev[1] + grad)


def normed_ids(normed: dict[int, tuple[set[int], Tensor]]) -> set[int]:
    """ids of the parameters whose per-example norms ``materialise`` put in ``normed``."""
    return {i for ids, _ in normed.values() for i in ids}


def _check_examples_independent(record: Record, grads: dict[str, Tensor]) -> None:
    """The fallback is exact only if the module treats examples independently: then the
    per-example gradients add up to the batch gradient."""
    for name, grad in grads.items():
        batch_grad = record.batch_grads.get(name)
        total = grad.sum(dim=0)
        if batch_grad is None:
            batch_grad = torch.zeros_like(total)
        tol = 1e-8 if total.dtype == torch.float64 else 1e-3
        scale = batch_grad.abs().max().item() + total.abs().max().item() + 1e-30
        if (total - batch_grad).abs().max().item() > tol * scale:
            raise RuntimeError(
                f"torch_dpfast: {type(record.module).__name__} couples the examples of a batch "
                f"(the per-example gradients of {name!r} do not add up to the batch gradient), so "
                "its gradient cannot be clipped per example. Give it a rule, or freeze it"
            )


def mask_on(mask: Tensor | None, device: torch.device) -> Tensor | None:
    return None if mask is None else mask.to(device=device, dtype=torch.bool)


def warn_non_finite(norm_sq: Tensor, mask: Tensor | None) -> None:
    bad = ~torch.isfinite(norm_sq)
    if mask is not None:
        bad &= mask.to(device=bad.device, dtype=torch.bool)
    count = int(bad.sum())
    if count:
        warnings.warn(
            f"torch_dpfast: {count} example(s) had non-finite gradients; their clip factor is 0, "
            "so they contribute nothing to this step",
            RuntimeWarning,
            stacklevel=3,
        )


def accumulate(p: nn.Parameter, summed: Tensor) -> None:
    summed = summed.to(p.dtype)
    p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed


def accumulate_scaled(per_example: list[tuple[nn.Parameter, Tensor]], scale: Tensor) -> None:
    """p.summed_grad += sum_i scale_i grad[i] for every (p, grad (rows, *p.shape)), rows of
    scale 0 left out: one ops.scaled_accumulate_ per row count, into each p.summed_grad (a
    fresh zero tensor where there is none yet)."""
    groups: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    for p, grad in per_example:
        if p.summed_grad is None:
            p.summed_grad = torch.zeros_like(p)
        grads, sums = groups.setdefault(grad.shape[0], ([], []))
        grads.append(grad)
        sums.append(p.summed_grad)
    for rows, (grads, sums) in groups.items():
        ops.scaled_accumulate_(grads, sums, scale[:rows])

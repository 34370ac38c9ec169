"""The independence probe: does changing one example move another example's numbers?

Per-example clipping bounds each example's own gradient; it says nothing if the model lets one
example change what another computes. A parameter-free op such as ``h - h.mean(0)`` between two
layers, or a layer that sees the batch in another dimension than 0 (sequence-first with T equal
to the batch), moved the clipped sum by several C while every norm was clipped.

On the first forward with gradients on and a batch of at least two rows, before the real
forward runs, the probe runs the model twice without gradients on the same arguments, the
second time with example ``PROBE_ROW`` replaced by other values (floats: a large random change;
integer ids: shifted by one), both times from the same random state (so dropout draws the same
masks). Every captured layer's input (in call order, its batch in dim 0, or dim 1 for a
sequence-first layer) must keep all other examples' rows, and so must the model's outputs (in
any dim of size B: an RNN returns h_n (layers, B, H)); the first that does not is named in the
error.

Then the backward probe: two more forwards, with gradients, and the gradients of a fixed random
projection of the outputs with respect to every captured layer's output. A layer whose rows are
examples has row j of that gradient depend on example j only; a layer whose output the model
shares across the batch (a position table looked up with ``torch.arange(T)`` and broadcast,
T equal to B by chance) has rows that sum every example's gradient, which moving example
``PROBE_ROW`` reveals. No parameter's gradient is touched (autograd.grad to the outputs only).
Four forwards and two backwards of one batch, once per attachment.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map_only

from . import tracing
from .assign import check_no_batch_statistics
from .batch_layout import LoaderBatch, check_arguments
from .rules.fallback import batch_dim

PROBE_ROW = 1
_SEED = 20261202
_PROBING = contextvars.ContextVar("torch_dpfast_probing", default=False)


@dataclass(frozen=True)
class Layout:
    """Where the batch is: its size, whether that size is known (a make_private loader's
    physical batch) or guessed from the first argument, and whether layers take it in dim 0
    (``batch_first``) or dim 1 (Opacus's ``batch_first=False``)."""

    batch: int
    known: bool = False
    batch_first: bool = True

    def layer_dim(self, module: nn.Module, t: Tensor) -> int:
        """The batch dim of a captured layer's input or output ``t``."""
        if not self.batch_first and t.dim() >= 2:
            return 1
        return batch_dim(module, t)

    def argument_dim(self, t: Tensor) -> int | None:
        """The dim of a model argument that holds the batch, or None. Batch-first: dim 0 of
        size B, or, with B known, dim 1 of a (T, B, ...) tensor. Sequence-first: dim 1 of a
        tensor of 2+ dims, dim 0 of a (B,) one."""
        if self.batch_first:
            if t.dim() and t.shape[0] == self.batch:
                return 0
            return 1 if self.known and t.dim() >= 3 and t.shape[1] == self.batch else None
        if t.dim() >= 2:
            return 1 if t.shape[1] == self.batch else None
        return 0 if t.dim() == 1 and t.shape[0] == self.batch else None


def probing() -> bool:
    """Whether the forward running now is one of the probe's (for hooks that count the
    training forwards)."""
    return _PROBING.get()


def install(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch_hint=lambda: None,
    bypassed=contextlib.nullcontext,
    batch_first: bool = True,
    retrace=lambda paths: False,
    loader_batch=LoaderBatch,
):
    """Runs :func:`probe` on the first forward of ``model`` that qualifies; returns the hook
    handle (removed once the probe ran). ``batch_hint()`` gives the batch size when it is known
    (a make_private loader's physical batch), else None: then it is dim 0 of the first tensor
    argument. ``bypassed()`` makes the captured layers run their original forwards while
    gradients are on (for the backward probe). ``retrace(paths)`` is told of the captured
    layers that the first run saw called on constants rather than on the batch (T5's
    relative-position embedding, looked up with bucket ids (Q, K)); it returns whether it
    changed how the model is captured (engine: their callers are traced), and the probe then
    runs again. ``loader_batch()`` gives the batch the data loader yielded last: a model
    argument that is one of its tensors with the batch moved to another dim, or reordered where
    the loader pads, is refused (batch_layout.check_arguments)."""

    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        known = batch_hint()
        batch = known or batch_size(args, kwargs, 0 if batch_first else 1)
        if batch is None or batch < 2:
            return
        handle.remove()
        token = _PROBING.set(True)
        layout = Layout(batch, known is not None, batch_first)
        if known is not None:
            check_arguments((args, kwargs), loader_batch(), batch, batch_first)
        try:
            probe(model, modules, args, kwargs, layout, retrace)
            probe_gradients(model, modules, args, kwargs, layout, bypassed)
        finally:
            _PROBING.reset(token)

    # Run eagerly under torch.compile: the probe is one-off bookkeeping, not the model.
    handle = model.register_forward_pre_hook(torch.compiler.disable(hook), with_kwargs=True)
    return handle


def probe(
    model: nn.Module,
    modules: dict[str, nn.Module],
    args,
    kwargs,
    layout: Layout,
    retrace=lambda paths: False,
) -> None:
    """Raises if example ``PROBE_ROW`` of the batch moves another example's layer inputs or
    outputs (module docstring). BatchNorm with batch statistics is named first, before any
    forward (which would also update its running statistics)."""
    check_no_batch_statistics(model)
    batch = layout.batch
    changed_args, changed_kwargs = _perturbed((args, kwargs), layout)
    clean, changed = _runs(model, modules, args, kwargs, changed_args, changed_kwargs, layout)
    constants = [path for path, constant, _ in changed[0] if constant]
    if layout.batch_first and retrace(constants):
        clean, changed = _runs(model, modules, args, kwargs, changed_args, changed_kwargs, layout)
    for path, _, moved in changed[0]:
        if moved:
            raise RuntimeError(
                f"torch_dpfast: the model couples the examples of a batch: changing example "
                f"{PROBE_ROW} changed the input rows of other examples at {path!r} "
                f"({type(modules[path]).__name__}). Either something before it mixes examples "
                "(an operation over the batch dimension, such as x - x.mean(0), or BatchNorm-like "
                "statistics), or it sees the batch in another dimension than 0 (a sequence-first "
                "layer). Per-example clipping cannot bound such a model; make every example's "
                "computation independent and batch-first"
            )
    for a, b in zip(clean, changed[1]):
        if _others_moved(a, b, batch):
            raise RuntimeError(
                "torch_dpfast: the model couples the examples of a batch: changing example "
                f"{PROBE_ROW} changed other examples' outputs after the last captured layer (an "
                "operation over the batch dimension, such as a normalisation by batch "
                "statistics). Per-example clipping cannot bound such a model; make every "
                "example's computation independent"
            )


def probe_gradients(model: nn.Module, modules, args, kwargs, layout: Layout, bypassed) -> None:
    """Raises if example ``PROBE_ROW`` moves another row of a captured layer's output
    gradient g (the gradient of L = sum_k <out_k, R_k> over the model's outputs, R fixed):
    for a layer whose rows are examples, row j of g depends on example j only. A layer whose
    output the model shares across the batch (a table indexed by positions (T,) and broadcast,
    with T equal to B by chance) has rows that sum every example's gradient. Each run's
    gradients are reduced to row fingerprints (:class:`RowPrints`) as the backward reaches
    them, so neither run's are held: the probe takes the memory of one training step."""
    changed_args, changed_kwargs = _perturbed((args, kwargs), layout)
    prints: dict[int, RowPrints | None] = {}

    def keep(k: int, path: str, g: Tensor) -> None:
        prints[k] = RowPrints.of(g, layout.batch, layout.layer_dim(modules[path], g))

    _gradients(model, modules, args, kwargs, bypassed, keep)
    moved: dict[int, bool] = {}

    def compare(k: int, path: str, g: Tensor) -> None:
        clean = prints.get(k)
        if clean is not None:
            moved[k] = clean.others_moved(g)

    paths = _gradients(model, modules, changed_args, changed_kwargs, bypassed, compare)
    for k, path in enumerate(paths):
        if moved.get(k):
            raise RuntimeError(
                f"torch_dpfast: the rows of {path!r} ({type(modules[path]).__name__}) are not "
                f"the examples of the batch: changing example {PROBE_ROW} changed the gradient "
                "of its output in other rows. Its output is shared by the examples (e.g. a "
                "position table looked up with torch.arange(T) and broadcast over the batch), "
                "so its gradient cannot be clipped per example. Give the layer a batch "
                "dimension: look it up with positions[None] (shape (1, T)) or "
                "positions.expand(B, T)"
            )


@dataclass
class RowPrints:
    """Fingerprints of the example rows of a captured layer's output gradient g along its
    batch dim (k B rows folded example-major taken as B rows): FINGERPRINTS seeded random
    projections of each row, in float64, each row's norm, whether it is finite, and max |g|.
    A row of another gradient moved (beyond rounding) when a projection differs by more than
    1e-6 (max |g| sqrt(n) + its row's norm) for rows of n values, or its finiteness does: a
    change as large as the gradient itself (what coupling makes) shows in every projection;
    rounding (1e-7 relative) in none."""

    projections: Tensor  # (B, FINGERPRINTS)
    norms: Tensor  # (B,)
    finite: Tensor  # (B,) bool
    scale: float
    batch: int
    dim: int
    shape: tuple[int, ...]

    @staticmethod
    def rows(g: Tensor, batch: int, dim: int) -> Tensor | None:
        """(B, n) float64 example rows of g along ``dim``, or None if it holds no batch."""
        if dim >= g.dim() or g.shape[dim] % batch:
            return None
        return g.movedim(dim, 0).reshape(batch, -1).double()

    @classmethod
    def of(cls, g: Tensor, batch: int, dim: int) -> RowPrints | None:
        rows = cls.rows(g, batch, dim)
        if rows is None:
            return None
        finite = torch.isfinite(rows)
        safe = rows.where(finite, torch.zeros((), dtype=rows.dtype, device=rows.device))
        scale = safe.abs().max().item() if safe.numel() else 0.0
        norms, all_finite = safe.norm(dim=1), finite.all(dim=1)
        return cls(_project(safe), norms, all_finite, scale, batch, dim, tuple(g.shape))

    def others_moved(self, g: Tensor) -> bool:
        """Whether g (the changed run's gradient) moved a row other than PROBE_ROW."""
        if tuple(g.shape) != self.shape:
            return False
        rows = self.rows(g, self.batch, self.dim)
        finite = torch.isfinite(rows)
        safe = rows.where(finite, torch.zeros((), dtype=rows.dtype, device=rows.device))
        n = rows.shape[1]
        tolerance = 1e-6 * (self.scale * n**0.5 + self.norms) + 1e-30
        moved = ((_project(safe) - self.projections).abs() > tolerance[:, None]).any(dim=1)
        moved = moved | (finite.all(dim=1) != self.finite)
        moved[PROBE_ROW] = False
        return bool(moved.any())


FINGERPRINTS = 4


def _project(rows: Tensor) -> Tensor:
    """(B, n) -> (B, FINGERPRINTS): the rows against seeded normal vectors."""
    generator = torch.Generator(device=rows.device).manual_seed(_SEED)
    directions = torch.randn(
        rows.shape[1], FINGERPRINTS, generator=generator, device=rows.device, dtype=rows.dtype
    )
    return rows @ directions


def _on_constant(a: Tensor, b: Tensor, layout: Layout, module: nn.Module) -> bool:
    """Whether a layer call's input (``a`` clean, ``b`` changed) is not the batch: no B or k B
    rows in its batch dim (nor one row broadcast over the batch), or not moved at all by the
    changed example."""
    dim = layout.layer_dim(module, a)
    rows = a.shape[dim] if dim < a.dim() else 0
    if rows == 0 or (rows % layout.batch and rows != 1):
        return True
    return a.shape == b.shape and rows != 1 and not _moved(a, b).any()


def _gradients(model, modules, args, kwargs, bypassed, compare=None) -> list:
    """[(path, output gradient) or None] of every captured layer call whose output needs one
    (None where none reached it), for L = sum_k <out_k, R_k> with R_k seeded normals: a plain
    graph (``bypassed``), dropout drawn from one seed, no parameter's .grad touched
    (autograd.grad to the outputs only). With ``compare``, each call's gradient is handed to
    ``compare(k, path, g)`` as the backward reaches it and is not kept; the paths are
    returned."""
    seen: list[tuple[str, Tensor]] = []

    def recorder(path):
        def record(module, inputs, out):
            first = next(iter(_tensors(out)), None)
            tracer = tracing.active()
            if tracer is not None and tracer.is_derived(first):
                return  # a layer on constants in a traced module: part of a derivation
            if first is not None and first.requires_grad:
                seen.append((path, first))

        return record

    handles = [m.register_forward_hook(recorder(path)) for path, m in modules.items()]
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.is_cuda})
    try:
        with (
            torch.enable_grad(),
            bypassed(),
            tracing.probe_log(seen, "outputs"),
            torch.random.fork_rng(devices=devices),
        ):
            torch.manual_seed(_SEED)
            out = [t for t in _tensors(model(*args, **kwargs)) if t.requires_grad]
            if not out or not seen:
                return [path for path, _ in seen] if compare else []
            generator = torch.Generator(device=out[0].device).manual_seed(_SEED)
            loss = sum(
                (
                    t * torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
                ).sum()
                for t in out
            )
            if compare is not None:
                for k, (path, t) in enumerate(seen):
                    t.register_hook(lambda g, k=k, path=path: compare(k, path, g))
            grads = torch.autograd.grad(loss, [t for _, t in seen], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if compare is not None:
        return [path for path, _ in seen]
    return [None if g is None else (path, g) for (path, _), g in zip(seen, grads)]


def _runs(model, modules, args, kwargs, changed_args, changed_kwargs, layout: Layout):
    """The clean run's outputs, and the changed run's ([(path, on constants, others moved)]
    per captured layer call, outputs); each input of the changed run is compared with the clean
    run's as it comes and then dropped, so that one run's inputs are held, not two."""
    clean, clean_out = _run(model, modules, args, kwargs)

    def compare(k: int, item: tuple[str, Tensor]):
        path, b = item
        if k >= len(clean):  # the runs took different paths: nothing to pair this call with
            return path, True, False
        a = clean[k][1]
        clean[k] = (path, None)
        module = modules[path]
        return (
            path,
            _on_constant(a, b, layout, module),
            _others_moved(a, b, layout.batch, layout.layer_dim(module, a)),
        )

    changed = _run(model, modules, changed_args, changed_kwargs, compare)
    return clean_out, changed


def _run(model, modules, args, kwargs, compare=None) -> tuple[list, list[Tensor]]:
    """(the first tensor input of every captured layer call, in order, as (path, tensor), or
    with ``compare`` what ``compare(k, (path, tensor))`` makes of it; the output tensors)."""
    seen: list = [] if compare is None else _Compared(compare)
    handles = [
        module.register_forward_pre_hook(_recorder(path, seen)) for path, module in modules.items()
    ]
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.is_cuda})
    try:
        with (
            torch.no_grad(),
            tracing.probe_log(seen, "inputs"),
            torch.random.fork_rng(devices=devices),
        ):
            torch.manual_seed(_SEED)
            out = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return list(seen), _tensors(out)


class _Compared(list):
    """A record list that keeps ``compare(k, item)`` of each appended item instead of the item
    (the tracer and the hooks append to it as to a list)."""

    def __init__(self, compare):
        super().__init__()
        self.compare = compare

    def append(self, item) -> None:
        super().append(self.compare(len(self), item))


def _recorder(path: str, seen: list):
    def record(module, inputs):
        first = next(iter(_tensors(inputs)), None)
        if first is not None:
            seen.append((path, first.detach().clone()))

    return record


def _others_moved(a: Tensor, b: Tensor, batch: int, dim: int | None = None) -> bool:
    """Whether ``a`` and ``b`` differ (beyond rounding) other than at index PROBE_ROW of dim
    ``dim`` (a captured layer's batch dim) or, with ``dim`` None (the model's outputs), of any
    dim of size ``batch``: an RNN returns h_n (layers, B, H). Only a change confined to one
    example's index along such a dim is independent. Tensors without it are not compared."""
    if a.shape != b.shape:
        return False
    if dim is not None and dim < a.dim() and a.shape[dim] % batch == 0 and a.shape[dim] > batch:
        # k B rows folded example-major (OPT's flattened tokens): view them as (B, k)
        folded = (*a.shape[:dim], batch, a.shape[dim] // batch, *a.shape[dim + 1 :])
        a, b = a.reshape(folded), b.reshape(folded)
    candidates = range(a.dim()) if dim is None else [dim] if dim < a.dim() else []
    dims = [d for d in candidates if a.shape[d] == batch]
    if not dims:
        return False
    moved = _moved(a, b)
    for d in dims:
        elsewhere = moved.movedim(d, 0).clone()
        elsewhere[PROBE_ROW] = False
        if not elsewhere.any():
            return False
    return True


def _moved(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise: where ``a`` and ``b`` differ beyond rounding (or in finiteness)."""
    if not a.is_floating_point():
        return a != b
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    scale = a[finite].abs().max().item() if finite.any() else 0.0
    differ = (a - b).abs() > 1e-6 * scale + 1e-30
    return (
        (differ & finite)
        | (torch.isfinite(a) != torch.isfinite(b))
        | (~finite & (a != b) & ~(a.isnan() & b.isnan()))
    )


def _perturbed(tree, layout: Layout):
    """``tree`` with example PROBE_ROW of every tensor that holds the batch changed. Beside
    the offsets of bags (nn.EmbeddingBag's flat layout), the 1-D tensors at least as long as
    the last offset are the flat ids and weights, left as they are like the offsets: their
    length can equal the batch size by chance, and their rows are not the examples."""
    flat = _flat_length(_tensors(tree), layout.batch)

    def perturb(t: Tensor) -> Tensor:
        if flat is not None and t.dim() == 1 and t.numel() >= flat:
            return t
        return _perturbed_rows(t, layout)

    return tree_map_only(Tensor, perturb, tree)


def _flat_length(leaves: list[Tensor], batch: int) -> int | None:
    """The last offset when an argument looks like the offsets of ``batch`` bags (``batch``
    of them, or ``batch`` + 1 with include_last_offset); None otherwise."""
    for t in leaves:
        if _offsets(t) and t.numel() in (batch, batch + 1):
            return int(t.max())
    return None


def _perturbed_rows(t: Tensor, layout: Layout) -> Tensor:
    """``t`` with example PROBE_ROW changed along its batch dim (Layout.argument_dim), if any."""
    dim = layout.argument_dim(t)
    if dim is None or _offsets(t):
        return t
    out = t.clone()
    view = out.movedim(dim, 0)
    _perturb_row(view)
    return out


def _offsets(t: Tensor) -> bool:
    """Whether ``t`` looks like the offsets of bags of flat ids (nn.EmbeddingBag's): 1-D
    integers, non-decreasing from 0. Changing one would move a neighbouring bag's end, which
    is no change of one example; the probe leaves it as is."""
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool or not t.numel():
        return False
    return bool(t[0] == 0) and bool((t[1:] >= t[:-1]).all())


def _perturb_row(out: Tensor) -> None:
    """Changes row PROBE_ROW of ``out`` in place."""
    row = out[PROBE_ROW]
    if out.is_floating_point():
        generator = torch.Generator(device=out.device).manual_seed(_SEED)
        noise = torch.randn(row.shape, generator=generator, device=out.device)
        out[PROBE_ROW] = row + (10 * (row.float().std().nan_to_num() + 1) * noise).to(out.dtype)
    elif not torch.equal(row, out[0]):  # ids, lengths: another example's values stay valid
        out[PROBE_ROW] = out[0]
    elif out.dtype != torch.bool:
        top = int(out.max()) + 1 if out.numel() else 1
        out[PROBE_ROW] = (row + 1) % max(top, 1)
    else:
        out[PROBE_ROW] = ~row


def _tensors(tree) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (and registered containers such as
    transformers' ModelOutput), in order."""
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def batch_size(args, kwargs, dim: int = 0) -> int | None:
    """Size of dim ``dim`` of the first tensor argument that has it (the batch, guessed)."""
    first = next((t for t in _tensors((args, kwargs)) if t.dim() > dim), None)
    return None if first is None else first.shape[dim]

"""Where the data loader puts the batch: the collate probe behind ``make_private``'s layout check.

The engine reads the batch from dim 0 of every layer input (dim 1 with ``batch_first=False``).
A sequence-first batch (T, B, ...) declared batch-first is refused at the step when T differs
from the batch size, since the layers then see T rows for a mask of B; when T equals B (a
physical batch size equal to the sequence length, or a Poisson draw of exactly T examples)
nothing in the shapes tells the two apart, and each time step would be clipped as one example:
every example spread over T clipped rows, sensitivity up to T C. A position-wise model (an
embedding and a head) is symmetric in the two layouts, so the model cannot tell either: only
the loss, summed over dim 1, couples the rows, and the engine never sees the loss.

The collate function can tell: collated alone and twice, one example's tensors grow in their
batch dim and in no other (the same example twice has the same length, so padding collates
keep every other dim). That is done once, when the model is made private, on ``dataset[0]``
under a forked random state (random transforms draw nothing from the training stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class LoaderBatch:
    """The batch a make_private loader yielded last: its tensors, and whether that loader pads
    physical batches (``physical_batch_size`` given), whose mask then marks rows by position."""

    tensors: list = field(default_factory=list)
    padded: bool = False


def batch_dims(collate_fn, example) -> list[tuple[tuple[int, ...], list[int]]]:
    """[(shape of the batch of one, dims that grew in the batch of two)] for every tensor
    ``collate_fn`` makes of ``[example]`` and ``[example, example]``, in order; [] when the
    two batches do not hold the same number of tensors of the same ranks."""
    with torch.random.fork_rng(devices=[]):
        one = [t for t in tree_leaves(collate_fn([example])) if isinstance(t, Tensor)]
        two = [t for t in tree_leaves(collate_fn([example, example])) if isinstance(t, Tensor)]
    if len(one) != len(two) or any(a.dim() != b.dim() for a, b in zip(one, two)):
        return []
    return [
        (tuple(a.shape), [d for d in range(a.dim()) if a.shape[d] != b.shape[d]])
        for a, b in zip(one, two)
    ]


def check_layout(data_loader, batch_first: bool, padded: bool = False) -> None:
    """Raises if the loader's batches contradict ``batch_first``: batch-first, a tensor of two
    or more dims whose batch is not in dim 0 (sequence-first data, which would be clipped per
    time step when T equals the batch size); sequence-first, tensors of two or more dims that
    all hold the batch in dim 0 and none in dim 1. With ``padded`` (physical batches padded
    by position), also if the collate function reorders the examples (:func:`check_order`)."""
    dataset, collate = data_loader.dataset, data_loader.collate_fn
    try:
        example = dataset[0]
        second = dataset[1] if padded and len(dataset) > 1 else None
    except (KeyError, IndexError, TypeError):  # not indexable by 0, 1 (keyed): nothing to probe
        return
    if second is not None:
        check_order(collate, example, second)
    grown = [(shape, dims) for shape, dims in batch_dims(collate, example) if dims]
    wide = [(shape, dims) for shape, dims in grown if len(shape) >= 2]
    if batch_first:
        for shape, dims in wide:
            if 0 not in dims:
                raise ValueError(
                    f"the data loader puts the batch in dim {dims[0]} of a tensor of shape "
                    f"{_shape(shape, dims[0])} (its collate_fn, given one example and then the "
                    "same example twice, grew that dim), but the model is made private batch "
                    "first, reading dim 0 of every layer input as the batch: where the sequence "
                    "length equals the batch size each time step would be clipped as an "
                    "example (each example spread over all of them: sensitivity up to T x "
                    "max_grad_norm). If the model takes sequence-first inputs (T, B, ...), pass "
                    "make_private(..., batch_first=False); otherwise collate the batch into dim 0"
                )
    elif wide and not any(1 in dims for _, dims in wide):
        shape, dims = wide[0]
        raise ValueError(
            f"make_private(..., batch_first=False) reads dim 1 of the inputs as the batch, but "
            f"the data loader puts it in dim 0 of every tensor it collates (e.g. shape "
            f"{_shape(shape, 0)}): each position of dim 1 would be clipped as an example. For "
            "batch-first inputs (B, T, ...) leave batch_first=True (the default)"
        )


def check_order(collate, first, second) -> None:
    """Raises if the collate function orders the examples itself (sorting them by length, for
    ``pack_padded_sequence``): collating ``first`` and ``second`` in either order gives the
    same batch, while they differ. The loader's mask marks rows by position (the padding rows,
    copies of a batch's first example, come last); a collate that reorders puts copies among
    the real rows and real examples among the padding: one example clipped several times
    (sensitivity k C), others dropped."""

    def tensors(items) -> list[Tensor]:
        with torch.random.fork_rng(devices=[]):
            return [t for t in tree_leaves(collate(items)) if isinstance(t, Tensor)]

    if _same(tensors([first]), tensors([second])):
        return  # the two examples collate alike: their order cannot show
    if _same(tensors([first, second]), tensors([second, first])):
        raise ValueError(
            "the data loader's collate_fn orders the examples itself (examples 0 and 1 collate "
            "to the same batch in either order, e.g. sorted by length): the physical batch's "
            "mask marks its padding rows by position, so reordered rows would count one "
            "example several times and drop others. Keep the examples in the order given (for "
            "torch.nn.utils.rnn.pack_padded_sequence pass enforce_sorted=False instead of "
            "sorting)"
        )


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b)
    )


def _shape(shape: tuple[int, ...], batch: int) -> str:
    """(7, B) for a batch of one with the batch in dim 1."""
    return "(" + ", ".join("B" if d == batch else str(n) for d, n in enumerate(shape)) + ")"


def check_arguments(arguments, loader: LoaderBatch, batch: int, batch_first: bool) -> None:
    """Raises if a tensor the model was called with is one the loader yielded with its batch
    dim moved off the layers' batch dim (dim 0, or 1 with ``batch_first=False``): ``x.T`` or
    ``x.transpose(0, 1)`` in the training loop, a copy of it, or either moved to another
    device or dtype; or, where the loader pads by position, with its examples reordered (the
    batch sorted by length in the loop). The collated layout was checked by
    :func:`check_layout`; this catches the loop that turns it around or reorders it before the
    model. Values are compared (a pass or two over the batch); a reordering that happens to
    leave the batch as it was is not seen."""
    raise_found(argument_findings(arguments, loader, batch, batch_first))


def raise_found(findings: list[tuple[Tensor, str]]) -> None:
    """Raises ValueError with the message of the first finding whose flag is set (one
    synchronisation for all of them)."""
    if findings:
        device = findings[0][0].device
        flags = torch.stack([flag.to(device) for flag, _ in findings]).tolist()
        for flagged, (_, message) in zip(flags, findings):
            if flagged:
                raise ValueError(message)


def argument_findings(
    arguments, loader: LoaderBatch, batch: int, batch_first: bool
) -> list[tuple[Tensor, str]]:
    """:func:`check_arguments`'s comparisons, not yet decided: [(a bool scalar on the
    argument's device, the error if it is set)], so that on a GPU they are computed without a
    synchronisation and read later (:func:`raise_found`). An argument equal to one of the
    loader's tensors is that tensor as it came, in the loader's order: it sets no flag."""
    expected = 0 if batch_first else 1
    candidates = [t for t in loader.tensors if isinstance(t, Tensor) and t.dim() >= 2]
    findings = []
    for a in tree_leaves(arguments):
        if not isinstance(a, Tensor) or a.dim() < 2 or a.shape[expected] != batch:
            continue
        alike = [
            t.to(device=a.device, dtype=a.dtype, non_blocking=True)
            for t in candidates
            if t.shape[expected] == batch and t.dim() == a.dim() and t.numel() == a.numel()
        ]
        if not alike:
            continue
        as_came = [(a == t).all() for t in alike if t.shape == a.shape]
        moved_off = ~torch.stack(as_came).any() if as_came else a.new_ones((), dtype=torch.bool)
        if a.device.type == "cpu" and not moved_off:  # decided at no cost: nothing to compare
            continue
        for t in alike:
            if loader.padded and a.shape == t.shape:
                reordered = moved_off & _reordered(a, t, expected)
                findings.append((reordered, _reordered_error(a, expected)))
            for d in range(a.dim()):
                moved = t.movedim(expected, d)
                if d != expected and moved.shape == a.shape:
                    turned = moved_off & (a == moved).all()
                    findings.append((turned, _turned_error(a, t, expected, d)))
    return findings


def _reordered_error(a: Tensor, expected: int) -> str:
    return (
        f"the model was called with the loader's batch in another row order (a tensor of shape "
        f"{tuple(a.shape)} holds the rows of the loader's along dim {expected}, permuted: sorted "
        "by length in the training loop?). The physical batch's mask marks its padding rows "
        "(copies of its first example) by position, so reordered rows count one example "
        "several times and drop others. Call the model on the rows in the loader's order (for "
        "torch.nn.utils.rnn.pack_padded_sequence pass enforce_sorted=False instead of sorting)"
    )


def _turned_error(a: Tensor, t: Tensor, expected: int, d: int) -> str:
    return (
        f"the model was called with the loader's batch turned around: a tensor of shape "
        f"{tuple(a.shape)} equal to the loader's {tuple(t.shape)} with its batch moved from dim "
        f"{expected} to dim {d} (x.T or x.transpose in the training loop?). The layers read dim "
        f"{expected} as the batch, so where the sequence length equals the batch size each time "
        "step would be clipped as an example (sensitivity up to T x max_grad_norm). Call the "
        "model on the batch as the loader gives it, and for a sequence-first model collate "
        "(T, B, ...) batches and pass make_private(..., batch_first=False)"
    )


def _reordered(a: Tensor, t: Tensor, dim: int) -> Tensor:
    """Whether ``a`` holds the rows of ``t`` (of ``a``'s device and dtype) along ``dim`` in
    another order, as a bool scalar on that device: the rows' seeded random projections agree
    as multisets (within rounding of the cast) but not in order."""
    rows_a = a.movedim(dim, 0).reshape(a.shape[dim], -1).double()
    rows_t = t.movedim(dim, 0).reshape(a.shape[dim], -1).double()
    generator = torch.Generator(device=a.device).manual_seed(20261207)
    direction = torch.randn(
        rows_a.shape[1], dtype=torch.float64, device=a.device, generator=generator
    )
    pa, pt = rows_a @ direction, rows_t @ direction
    tolerance = 1e-9 * (pa.abs().max() + 1)
    same_rows = ((pa.sort().values - pt.sort().values).abs() <= tolerance).all()
    return same_rows & ((pa - pt).abs() > tolerance).any()

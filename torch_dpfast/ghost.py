"""Ghost clipping in two backward passes (``clipping="ghost"``): the least memory.

For one physical batch with per-example losses l_i (B,):

1. backward of sum_i l_i (graph kept): as each captured layer's backward runs, its
   contribution to every example's squared gradient norm is computed from (x, g) and g is
   dropped at once, so no layer's output gradient outlives its own backward;
2. the clip factors c_i = min(1, C / (||g_i|| + 1e-6)) (0 for masked or non-finite examples);
3. backward of sum_i c_i l_i: each layer now sees g'_i = c_i g_i, so its ordinary weight
   gradient sum_i g'_i^T x_i *is* its clipped sum, computed in that layer's backward and added
   to ``p.summed_grad`` (examples with c_i = 0 are left out, so their NaN cannot spread).

Layers whose parameters are shared with another call, the generic fallback and parameters
captured per example (ViT tokens) materialise per-example gradients in pass 1 and are summed with
the factors directly. Compared with book-keeping (``auto``/``bk``), ghost clipping costs a second
backward through the activations and saves holding every layer's g until the end of backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import certify, ops
from .engine import Attachment
from .records import (
    Record,
    accumulate,
    accumulate_scaled,
    check_batch,
    has_fast_path,
    mask_on,
    materialise,
    plain_records,
    warn_non_finite,
)
from .rules._registry import Rule, clip_cache, leading


@dataclass(eq=False)
class GhostPass:
    """State of one ghost_backward: which pass runs, and what pass 1 found."""

    batch: int
    mask: Tensor | None
    plain: set[int]  # ids of records that take their rule's fast path
    stage: int = 1
    norm_sq: Tensor | None = None
    include: Tensor | None = None  # (B,) 1.0 for examples with a non-zero clip factor
    factors: Tensor | None = None  # (B,) the clip factors
    exact: dict = field(default_factory=dict)  # id(record) -> certify.Exact
    kept: list[Record] = field(default_factory=list)  # records materialised after pass 1
    on_final: object = None  # called with parameters whose clipped sums are final (pass 2)

    def on_backward(self, record: Record) -> None:
        check_batch(record, self.batch, self.mask)
        if id(record) not in self.plain or record.fold > 1:
            if self.stage == 1:
                self.kept.append(record)
            return
        x, g = record.x, record.g
        record.x = record.g = None  # nothing of this layer outlives its backward
        if self.stage == 1:
            contribution, bad = certify.check(
                record, x, g, record.rule.norm_sq(record.module, x, g, "auto")
            )
            if bool(bad.any()):
                contribution, self.exact[id(record)] = certify.certified(
                    record, x, g, contribution, bad
                )
            self.norm_sq = contribution if self.norm_sq is None else self.norm_sq + contribution
        else:
            include = self.include.to(leading(g).device)
            exact = self.exact.get(id(record))
            if exact is not None:  # recomputed examples are added exactly, not by the fast sum
                for name, summed in exact.sums(self.factors).items():
                    accumulate(record.params[name], summed)
                include = exact.without(include)
            sums = record.rule.clipped_sums(record.module, x, g, include)
            for name, summed in sums.items():
                accumulate(record.params[name], summed)
            if self.on_final is not None:
                self.on_final(list(record.params.values()))


def ghost_backward(
    attachment: Attachment, losses: Tensor, max_grad_norm: float, on_final=None
) -> Tensor:
    """Clips and accumulates one physical batch in two backward passes (module docstring).

    Args:
        attachment: an attachment made with ``clipping="ghost"``, whose model produced ``losses``.
        losses: (B,) per-example losses (no reduction over the batch).
        max_grad_norm: C.
        on_final: called during the second pass with the parameters whose clipped sums are
            complete (a layer's own parameters, used once), e.g. to start their all-reduce.

    Returns:
        (B,) squared per-example gradient norms.
    """
    if attachment.clipping != "ghost":
        raise ValueError(f"ghost_backward needs clipping='ghost', not {attachment.clipping!r}")
    if losses.dim() != 1:
        raise ValueError(
            f"ghost_backward takes (B,) per-example losses, got shape {tuple(losses.shape)}"
        )
    attachment.check_no_leaks()
    records = attachment.recorded()
    mask = attachment.take_mask()
    batch = losses.shape[0]
    by_parameter = [r for r in records if r.rule.capture == "uses"]
    # A rule's own norm_sq counts only with the bound that certifies it (certify.py); one
    # without is materialised, as in book-keeping.
    plain = {
        id(r)
        for r in plain_records(records)
        if r not in by_parameter and (has_fast_path(r.rule) or type(r.rule).norm_sq is Rule.norm_sq)
    }
    state = GhostPass(batch, mask, plain, on_final=on_final)
    clipper = attachment.clipper
    clipper.pass_in_progress = state
    with clip_cache():  # the weights do not change until the step
        try:
            losses.sum().backward(retain_graph=True)
            attachment.check_no_leaks()
            per_example = materialise(state.kept + by_parameter)
            for r in by_parameter:  # pass 2 must not add into the per-example leaves read above
                r.rule.reset(r.x)
            parts = []
            if per_example:
                parts.append(ops.per_example_norm_sq([g for _, g in per_example.values()]))
            if state.norm_sq is not None:
                parts.append(state.norm_sq)
            if not parts:
                dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
                parts.append(torch.zeros(batch, dtype=dtype, device=losses.device))
            norm_sq, factors = ops.total_clip_factors(
                parts, max_grad_norm, mask_on(mask, losses.device)
            )
            warn_non_finite(norm_sq, mask)
            state.stage, state.include = 2, (factors > 0).to(norm_sq.dtype)
            state.factors = factors
            (losses * factors.to(losses.dtype)).sum().backward()
            if per_example:
                accumulate_scaled(list(per_example.values()), factors)
        finally:
            clipper.pass_in_progress = None
            attachment.discard()
    clipper.norm_sq = norm_sq
    return norm_sq


class GhostLoss:
    """The loss of one physical batch under ghost clipping; ``backward()`` runs both passes.

    Behaves like the reduced loss tensor for logging: ``item()``, ``float()``, ``detach()``.
    """

    def __init__(self, attachment: Attachment, optimizer, losses: Tensor, reduction: str):
        self._attachment, self._optimizer, self.losses = attachment, optimizer, losses
        self.value = losses.mean() if reduction == "mean" else losses.sum()

    def backward(self) -> None:
        on_final = self._optimizer.overlap() if hasattr(self._optimizer, "overlap") else None
        ghost_backward(self._attachment, self.losses, self._optimizer.max_grad_norm, on_final)

    def item(self) -> float:
        return self.value.item()

    def detach(self) -> Tensor:
        return self.value.detach()

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        return f"GhostLoss({self.value.item():.6g})"


class DPCriterion:
    """Wraps a torch loss module for ghost clipping: called like it, returns a :class:`GhostLoss`.

    The per-example loss is the criterion with ``reduction="none"``, averaged (``loss_reduction
    = "mean"``) or summed over any dimensions after the batch; the batch loss reported is their
    mean or sum.
    """

    def __init__(self, criterion: nn.Module, attachment: Attachment, optimizer, reduction: str):
        self.check(criterion)
        self.criterion, self.reduction = criterion, reduction
        self._attachment, self._optimizer = attachment, optimizer

    @staticmethod
    def check(criterion) -> None:
        if not hasattr(criterion, "reduction"):
            raise ValueError(
                f"clipping='ghost' needs per-example losses, but the criterion "
                f"({type(criterion).__name__}) has no `reduction` attribute; use a torch.nn loss "
                "module (e.g. nn.CrossEntropyLoss())"
            )

    def __call__(self, *args, **kwargs) -> GhostLoss:
        saved = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            losses = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = saved
        if losses.dim() == 0:
            raise ValueError("the criterion returned a scalar with reduction='none'")
        if losses.dim() > 1:
            dims = tuple(range(1, losses.dim()))
            losses = losses.mean(dims) if self.reduction == "mean" else losses.sum(dims)
        return GhostLoss(self._attachment, self._optimizer, losses, self.reduction)

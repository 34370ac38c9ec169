"""``clipping="auto"`` and ``"bk"``: book-keeping. Each layer whose rule has a fast path gets
its per-example squared norms from (x, g) (ghost or direct, certified against the rule's bound:
certify.py) and, once every example's clip factor c_i is known, its clipped sum
sum_i c_i g_i^T x_i from the same (x, g): no per-example gradient is held. Layers without a fast
path (shared parameters, traced uses, the norm layers' small rules) are materialised. With
``auto`` on CPU, layers whose norm costs more than materialising them are materialised too,
within ``materialise_bytes`` (materialise_plan.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import certify, materialise_plan, ops
from ..records import (
    Record,
    accumulate,
    accumulate_scaled,
    has_fast_path,
    kept_prefix,
    leading_rows,
    mask_on,
    materialise,
    normed_ids,
    plain_records,
    warn_non_finite,
    zero_padded,
)
from ..rules._registry import leading
from ._base import Clipper


class BookKeeping(Clipper):
    def __init__(self, mode: str):
        self.mode = mode  # "auto" or "bk"
        self.norm_method = {"auto": "auto", "bk": "ghost"}[mode]  # per layer, or ghost norms
        self.workspace: dict[int, Tensor] = {}  # id(p) -> materialised buffer, reused

    def reset(self) -> None:
        self.workspace.clear()

    def clip(self, attachment, max_grad_norm: float) -> Tensor:
        batch = attachment.take_batch()
        if batch is None:
            return torch.zeros(0)
        records, mask, loss_scale = batch.records, batch.mask, batch.loss_scale
        # Rows from `kept` on are a physical batch's padding: no norm is computed for them, and
        # their factor is 0 (the fast paths do not even read them).
        kept = kept_prefix(mask, batch.size)
        plain = [r for r in plain_records(records) if has_fast_path(r.rule)]
        cut = self._to_materialise(plain, kept, attachment.materialise_bytes)
        buffers = {id(r): self._workspace_for(r, kept) for r in plain if id(r) in cut}
        plain = [r for r in plain if id(r) not in cut]
        plain_ids = {id(r) for r in plain}
        normed: dict[int, tuple[set[int], Tensor]] = {}
        per_example = materialise(
            [r for r in records if id(r) not in plain_ids], buffers, kept, normed
        )

        parts, exact = _certified_norms(plain, kept, self.norm_method)
        parts += [norm_sq for _, norm_sq in normed.values()]
        done = normed_ids(normed)
        rest = [g[:kept] for key, (_, g) in per_example.items() if key not in done]
        if rest:
            parts.append(ops.per_example_norm_sq(rest))
        device = leading(records[0].g).device
        norm_sq, factors = ops.total_clip_factors(
            parts,
            max_grad_norm,
            mask_on(None if mask is None else mask[:kept], device),
            norm_scale=loss_scale**2,
        )
        norm_sq, factors = zero_padded(norm_sq, batch.size), zero_padded(factors, batch.size)
        warn_non_finite(norm_sq, mask)
        scale = factors * loss_scale
        for r in plain:
            x, g = leading_rows(r, kept)
            factors_of_rows = scale if g is r.g else scale[:kept]
            if id(r) in exact:  # recomputed examples are added exactly, not by the fast sum
                for name, summed in exact[id(r)].sums(scale).items():
                    accumulate(r.params[name], summed)
                factors_of_rows = exact[id(r)].without(factors_of_rows)
            for name, summed in r.rule.clipped_sums(r.module, x, g, factors_of_rows).items():
                accumulate(r.params[name], summed)
        if per_example:
            accumulate_scaled(list(per_example.values()), scale)
        return norm_sq

    def _to_materialise(self, plain: list[Record], rows: int, budget: int) -> set[int]:
        """ids of the fast-path records materialised (materialise_plan.py) for a batch whose
        first ``rows`` rows are real: on CPU, in ``auto``, within ``budget`` bytes."""
        if not plain or not materialise_plan.applies(self.mode, plain[0].device):
            return set()
        candidates = [
            materialise_plan.candidate(
                id(r), r.rule.materialise_saving(r.module, r.x, r.g), r.x, r.g, rows
            )
            for r in plain
        ]
        candidates = [c for c in candidates if c is not None]
        chosen = materialise_plan.choose(candidates, budget)
        # The workspace holds only this batch's choice, so it never exceeds the budget.
        keep = {id(p) for r in plain if id(r) in chosen for p in r.params.values()}
        for key in [k for k in self.workspace if k not in keep]:
            del self.workspace[key]
        return chosen

    def _workspace_for(self, record: Record, rows: int) -> dict[str, Tensor]:
        """{name: (rows, *p.shape) buffer} for the per-example gradients of a materialised
        layer: reused from one physical batch to the next (fresh allocations of this size
        would be returned to the OS and page-faulted back every time)."""
        x, g = materialise_plan.first_tensor(record.x), materialise_plan.first_tensor(record.g)
        dtype = materialise_plan.gradient_dtype(x, g)
        out = {}
        for name, p in record.params.items():
            need = rows * p.numel()
            held = self.workspace.get(id(p))
            if held is None or held.numel() < need or held.dtype != dtype:
                held = torch.empty(need, dtype=dtype, device=record.device)
                self.workspace[id(p)] = held
            out[name] = held[:need].view(rows, *p.shape)
        return out


def _certified_norms(
    plain: list[Record], kept: int, method: str
) -> tuple[list[Tensor], dict[int, certify.Exact]]:
    """The (kept,) squared norms of the fast-path records, certified against their rules'
    bounds (certify.py), and {id(record): Exact} for the examples recomputed exactly."""
    checked = []
    for r in plain:
        x, g = leading_rows(r, kept)
        both = getattr(r.rule, "norm_sq_and_bound", None)
        found = both(r.module, x, g, method) if both is not None else None
        norm_sq, bound = (
            found if found is not None else (r.rule.norm_sq(r.module, x, g, method), None)
        )
        norm_sq, bad = certify.check(r, x, g, norm_sq, bound)
        checked.append((r, x, g, norm_sq[:kept], bad[:kept]))
    if not checked:
        return [], {}
    flagged = torch.stack([bad for *_, bad in checked]).any(dim=1).tolist()  # one sync
    parts, exact = [], {}
    for (r, x, g, norm_sq, bad), recompute in zip(checked, flagged):
        if recompute:
            norm_sq, exact[id(r)] = certify.certified(r, x, g, norm_sq, bad)
        parts.append(norm_sq)
    return parts, exact

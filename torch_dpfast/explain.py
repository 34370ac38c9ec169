"""``dpf.explain(model, example_input)``: which rule and norm method each parameter will get.

Runs one forward pass (no gradients) to see the layers' actual shapes, then reports, per
trainable parameter: its layer, the rule (``TracedRule`` for modules without one: each use of
the parameter as the tracer takes it), the norm method the clipping mode picks for that layer
(ghost or direct from the cost model of docs/ops.md, or materialised) and the estimated
multiply-adds per example of the norm computation. Modules that cannot be made private are
rejected with a message naming the module and the fix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import materialise_plan
from .assign import assign_rules
from .rules.traced import TRACED


@dataclass
class Explanation:
    """One row per trainable parameter; ``str()`` is the table."""

    clipping: str
    rows: list[dict]
    materialise_budget: str | None = None  # auto on CPU: the budget and where it comes from

    def __str__(self) -> str:
        header = ("parameter", "shape", "layer", "rule", "norm method", "MACs/example")
        table = [header] + [
            (
                r["parameter"],
                str(tuple(r["shape"])),
                r["layer"],
                r["rule"],
                r["method"],
                f"{r['macs']:,}" if r["macs"] is not None else "-",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [f"clipping={self.clipping!r}"]
        if self.materialise_budget is not None:
            lines[0] += f", materialise budget {self.materialise_budget}"
        for k, row in enumerate(table):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def explain(
    model: nn.Module,
    example_input=(),
    clipping: str = "auto",
    materialise_bytes: int | None = materialise_plan.DEFAULT_MATERIALISE_BYTES,
    kwargs: dict | None = None,
) -> Explanation:
    """Per-parameter plan of how ``attach(model, clipping, materialise_bytes=...)`` will clip,
    from one forward of ``example_input`` (a tensor, or a tuple of positional arguments; keyword
    arguments in ``kwargs``, e.g. ``attention_mask=`` for transformers models) whose batch is a
    physical batch of real rows: with ``clipping="auto"`` on CPU, the layers that will be
    materialised within ``materialise_bytes`` show ``"materialised"`` (and the cost of their
    sums of squares). Parameters of modules without a rule show how the parameter-use tracer
    (tracing.py) takes each of their uses: ``per-example copies (op)``, ``F.linear (linear
    rule)``, or ``fallback: vmap (op)`` for uses run one example at a time (exact, slower).

    Raises:
        NotImplementedError: a BatchNorm owns trainable parameters (no per-example gradient).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    assigned = assign_rules(model)
    owners = {path: module for path, (module, _) in assigned.items()}
    rules = {path: rule for path, (_, rule) in assigned.items()}
    seen: dict[str, tuple] = {}

    def record(path):
        def hook(module, args, out):
            seen.setdefault(path, (args[0] if args else None, out))  # returns None: output kept

        return hook

    hooks = [module.register_forward_hook(record(path)) for path, module in owners.items()]
    uses: list = []
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    kwargs = kwargs or {}
    try:
        with torch.no_grad(), _traced(model, rules, owners, args, kwargs, uses):
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    traced = _traced_methods(uses)
    budget, described = materialise_plan.described_budget(materialise_bytes)
    from .coupling import batch_size

    batch = batch_size(args, kwargs)
    materialised = _materialised(rules, owners, seen, clipping, budget, batch)
    rows = []
    for path, module in owners.items():
        rule = rules[path]
        method, macs = ("not reached by the forward", None)
        if path in materialised:
            method, macs = "materialised", materialised[path]
        elif path in seen:
            method, macs = rule.plan(module, *seen[path], clipping)
        for p in rule.parameters(module).values():
            if id(p) in traced:
                method, macs = traced[id(p)], None
            rows.append(
                dict(
                    parameter=names[id(p)],
                    shape=list(p.shape),
                    layer=path or "<root>",
                    rule=type(rule).__name__,
                    method=method,
                    macs=macs,
                )
            )
            macs = None  # the layer's cost is listed on its first parameter
    if not materialise_plan.applies(clipping, _device_of(model)):
        described = None
    return Explanation(clipping, rows, described)


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _materialised(rules, owners, seen, clipping, budget, batch) -> dict[str, int]:
    """{path: multiply-adds per example of the sum of squares} of the layers that attach's
    clip_and_accumulate will materialise (materialise_plan.py), for the batch of ``seen``
    (``batch`` examples; where unknown, each output's dim 0)."""
    candidates = {}
    for path, (x, out) in seen.items():
        first = materialise_plan.first_tensor(out)
        if first is None or not materialise_plan.applies(clipping, first.device):
            continue
        saving = rules[path].call_saving(owners[path], x, out)
        c = materialise_plan.candidate(path, saving, x, first, batch or first.shape[0])
        if c is not None:
            candidates[path] = c
    chosen = materialise_plan.choose(list(candidates.values()), budget)
    return {path: candidates[path].values for path in chosen}


@contextlib.contextmanager
def _traced(model, rules, owners, args, kwargs, uses: list):
    """The traced modules' forwards run under use-logging tracers (tracing.probe_log) that
    append their uses to ``uses``."""
    from . import coupling, tracing

    batch = coupling.batch_size(args, kwargs) or 1
    param_ids = frozenset(id(p) for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    scopes: list = []

    def enter(path):
        def pre(module, inputs, kwargs):
            if tracing.active() is not None:
                scopes.append(None)
                return
            tracer = tracing.UseTracer(path, batch, param_ids, names, log=(uses, "uses"))
            tracer.mark_batch((inputs, kwargs))
            scope = tracer.scope()
            scope.__enter__()
            scopes.append(scope)

        return pre

    def leave(module, inputs, out):
        scope = scopes.pop()
        if scope is not None:
            scope.__exit__(None, None, None)

    def layer_in(module, inputs, kwargs):  # a layer with a rule, on the batch: not traced
        tracer = tracing.active()
        captured = tracer is not None and not tracer.suspended
        captured = captured and tracer.carries_batch((inputs, kwargs))
        layers.append(tracer if captured else None)
        if captured:
            tracer.suspended += 1

    def layer_out(module, inputs, out):
        tracer = layers.pop()
        if tracer is not None:
            tracer.suspended -= 1
            tracer.mark_batch(out)

    layers: list = []
    handles = []
    for path, module in owners.items():
        if rules[path] is TRACED:
            handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
            handles.append(module.register_forward_hook(leave))
        else:
            handles.append(module.register_forward_pre_hook(layer_in, with_kwargs=True))
            handles.append(module.register_forward_hook(layer_out))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while scopes:  # a forward that raised leaves its scopes open
            scope = scopes.pop()
            if scope is not None:
                scope.__exit__(None, None, None)


_USE_METHOD = {
    "broadcast": "per-example copies ({ops})",
    "linear": "F.linear (linear rule)",
    "embedding": "F.embedding (embedding rule)",
    "vmap": "fallback: vmap ({ops})",
}


def _traced_methods(uses: list) -> dict[int, str]:
    """{id(parameter): method} from the logged uses: each kind of use with its ops."""
    kinds: dict[int, dict[str, list[str]]] = {}
    for _, op, kind, params in uses:
        for key in params:
            ops_of_kind = kinds.setdefault(key, {}).setdefault(kind, [])
            if op not in ops_of_kind:
                ops_of_kind.append(op)
    return {
        key: ", ".join(_USE_METHOD[kind].format(ops=", ".join(ops)) for kind, ops in found.items())
        for key, found in kinds.items()
    }

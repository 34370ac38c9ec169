"""How a captured layer's call runs: the layer on detached parameters inside a custom autograd
function whose backward records what its rule needs (the output gradient g, with x the input)
and hands back only the gradient of the input, so the weight-gradient GEMMs are never computed.

One capture kind per way a rule sees a layer (``Rule.capture``): "io" (one tensor in),
"projections" and "probes" (the rule re-implements the forward and hands its parameterised
parts to ``capture``), "call" (the generic fallback: any arguments), "uses" (modules without a
rule: the forward runs under the parameter-use tracer, tracing.py). :func:`bind` puts a
capture in place of a module's forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import coupling, tracing
from .records import zero_padded
from .rules._registry import Rule, in_batch_first_call, keeps_output
from .rules.fallback import _original_forward
from .rules.traced import (
    FUNCTIONAL_EMBEDDING,
    FUNCTIONAL_LINEAR,
    FunctionalEmbedding,
    FunctionalLinear,
)

if TYPE_CHECKING:
    from .engine import Attachment
    from .records import Record


class _Capture(torch.autograd.Function):
    """Runs ``call(x)`` (the layer with detached parameters) on its own small graph; backward
    records g and returns the gradient of x through that graph (nothing for the parameters).

    With ``rows`` set (a physical batch whose last rows are padding, see
    :meth:`Attachment.forward_rows`), the layer runs on ``x[:rows]`` only and the output's other
    rows are copies of its row 0: the padding rows then carry a real example's values, as the
    padding rows of the input do, without being computed; their input gradient is 0."""

    @staticmethod
    def forward(ctx, x, anchor, call, record, rows):
        with torch.enable_grad():
            x_leaf = x.detach()
            if x.is_floating_point() and x.requires_grad:
                x_leaf.requires_grad_(True)
            out = call(x_leaf if rows is None else x_leaf[:rows])
        ctx.record, ctx.x_leaf, ctx.out, ctx.rows = record, x_leaf, out, rows
        ctx.save_for_backward(x)  # autograd's version check catches later in-place changes of x
        out = out.detach()
        result = out if rows is None else _copies_of_first_row(out, rows, x.shape[0], record)
        ctx.kept = None
        if keeps_output(record.rule):  # what the model receives (no copy), and its version now
            ctx.kept, ctx.kept_version = result.detach(), result._version
        return result

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Ghost clipping runs a second backward through this small graph.
            retain = ctx.record.owner.retains_graph()
            g_in = g if ctx.rows is None else g[: ctx.rows]
            (grad_x,) = torch.autograd.grad(ctx.out, ctx.x_leaf, g_in, retain_graph=retain)
        x = x.detach()
        if ctx.kept is not None:
            x = _with_output(ctx, x, g.detach())
        ctx.record.x, ctx.record.g = x, g.detach()
        ctx.record.owner.on_backward(ctx.record)
        return grad_x, None, None, None, None


def _with_output(ctx, x: Tensor, g: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """(x, what the rule keeps of the layer's output), from the output as the model received it
    (padding rows are copies of row 0, whose gradient is 0); x alone when the output was changed
    in place since the forward (its version counter moved: it no longer holds what the layer
    computed) or the rule keeps nothing of it. Once per forward: ghost clipping's second
    backward through this call reads nothing kept, and the output is let go here."""
    out, ctx.kept = ctx.kept, None
    if out._version != ctx.kept_version:
        return x
    record = ctx.record
    kept = record.rule.kept_output(record.module, x, out, g)
    if kept is None:
        return x
    record.out_version = kept._version
    return x, kept


def _copies_of_first_row(out: Tensor, rows: int, batch: int, record: Record) -> Tensor:
    """(rows, ...) -> (batch, ...): the rows, then batch - rows copies of row 0."""
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"torch_dpfast: {type(record.module).__name__} turned an input of {rows} examples "
            f"into an output whose dim 0 is {tuple(out.shape)[:1]}; captured layers must keep the "
            "batch in dim 0 of their input and output"
        )
    full = out.new_empty(batch, *out.shape[1:])  # cheaper than torch.cat of an expanded row
    full[:rows].copy_(out)
    full[rows:].copy_(out[:1].expand(batch - rows, *out.shape[1:]))
    return full


class _CaptureCall(torch.autograd.Function):
    """The fallback's capture: runs ``call(*tensors)`` (the module on detached parameter leaves)
    on its own graph; backward records the output gradient and the batch gradient of the
    parameters, and returns the gradients of the tensor inputs. Only the first output is
    differentiable."""

    @staticmethod
    def forward(ctx, anchor, call, record, *tensors):
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            ins = [
                t.detach().requires_grad_(t.is_floating_point() and t.requires_grad)
                for t in tensors
            ]
            out, leaves, arguments = call(*ins)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        ctx.ins, ctx.first, ctx.leaves, ctx.record, ctx.arguments = (
            ins,
            outs[0],
            leaves,
            record,
            arguments,
        )
        ctx.save_for_backward(*tensors)  # version check against later in-place changes
        # Secondary outputs stay differentiable so that a gradient reaching one is detected.
        others = [o.detach() if isinstance(o, Tensor) else o for o in outs[1:]]
        return (outs[0].detach(), *others)

    @staticmethod
    def backward(ctx, g, *others):
        if any(o is not None for o in others):
            raise RuntimeError(
                "torch_dpfast: a gradient flows into output 2+ of "
                f"{type(ctx.record.module).__name__}"
                " (e.g. attention weights); the fallback clips through the first output only"
            )
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since
        needs = [i for i, t in enumerate(ctx.ins) if t.requires_grad]
        targets = list(ctx.leaves.values()) + [ctx.ins[i] for i in needs]
        retain = ctx.record.owner.retains_graph()  # ghost clipping's second backward
        grads = torch.autograd.grad(ctx.first, targets, g, allow_unused=True, retain_graph=retain)
        n = len(ctx.leaves)
        ctx.record.batch_grads = dict(zip(ctx.leaves, grads[:n]))
        args, kwargs = ctx.arguments
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        ctx.record.x = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})
        ctx.record.g = g.detach()
        ctx.record.owner.on_backward(ctx.record)
        input_grads = [None] * len(ctx.ins)
        for i, grad in zip(needs, grads[n:]):
            input_grads[i] = grad
        return (None, None, None, *input_grads)


class _CaptureMany(torch.autograd.Function):
    """Like _Capture for a call with several inputs and outputs (attention's q/k/v projections):
    backward records the tuple of output gradients and returns the inputs' gradients. With
    ``rows`` set, the call runs on the first ``rows`` rows of every input and each output's
    other rows are copies of its row 0 (as in _Capture)."""

    @staticmethod
    def forward(ctx, anchor, call, record, rows, *xs):
        with torch.enable_grad():
            ins = [x.detach().requires_grad_(x.is_floating_point() and x.requires_grad) for x in xs]
            outs = call(*(ins if rows is None else [x[:rows] for x in ins]))
        ctx.record, ctx.ins, ctx.outs, ctx.rows = record, ins, outs, rows
        ctx.save_for_backward(*xs)  # version check against later in-place changes
        if rows is None:
            return tuple(o.detach() for o in outs)
        batch = xs[0].shape[0]
        return tuple(_copies_of_first_row(o.detach(), rows, batch, record) for o in outs)

    @staticmethod
    def backward(ctx, *gs):
        xs = ctx.saved_tensors
        needs = [i for i, t in enumerate(ctx.ins) if t.requires_grad]
        grads = [None] * len(ctx.ins)
        if needs:
            retain = ctx.record.owner.retains_graph()  # ghost clipping's second backward
            gs_in = gs if ctx.rows is None else [g[: ctx.rows] for g in gs]
            # outputs that depend on no input requiring a gradient have no graph
            pairs = [(o, g) for o, g in zip(ctx.outs, gs_in) if o.requires_grad]
            found = torch.autograd.grad(
                [o for o, _ in pairs],
                [ctx.ins[i] for i in needs],
                [g for _, g in pairs],
                allow_unused=True,
                retain_graph=retain,
            )
            for i, grad in zip(needs, found):
                grads[i] = grad
        ctx.record.x = tuple(x.detach() for x in xs)
        ctx.record.g = tuple(g.detach() for g in gs)
        ctx.record.owner.on_backward(ctx.record)
        return (None, None, None, None, *grads)


class _CaptureProbes(torch.autograd.Function):
    """For rules that need the gradients of tensors *inside* a call (recurrent layers: the gate
    pre-activations of every step). ``call(*ins)`` returns (outputs, saved, probes): saved is a
    list of tensors, probes a list of groups, each a list of (B, T_k, .) tensors of the call's
    graph. Backward records x = saved and g = the probes' gradients, each group concatenated
    along dim 1 (zeros for a probe no output depends on), and returns the inputs' gradients.
    Outputs a gradient never reaches are allowed (an LSTM's c_n). With ``rows`` set, as in
    _CaptureMany; x and g are then zero beyond the computed rows."""

    @staticmethod
    def forward(ctx, anchor, call, record, rows, *xs):
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            ins = [x.detach().requires_grad_(x.is_floating_point() and x.requires_grad) for x in xs]
            outs, saved, probes = call(*(ins if rows is None else [x[:rows] for x in ins]))
        ctx.record, ctx.ins, ctx.outs, ctx.rows = record, ins, outs, rows
        ctx.saved, ctx.probes, ctx.batch = saved, probes, xs[0].shape[0]
        ctx.save_for_backward(*xs)  # version check against later in-place changes
        if rows is None:
            return tuple(o.detach() for o in outs)
        return tuple(_copies_of_first_row(o.detach(), rows, ctx.batch, record) for o in outs)

    @staticmethod
    def backward(ctx, *gs):
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since
        pairs = [
            (o, g if ctx.rows is None else g[: ctx.rows])
            for o, g in zip(ctx.outs, gs)
            if g is not None
        ]
        needs = [i for i, t in enumerate(ctx.ins) if t.requires_grad]
        flat = [p for group in ctx.probes for p in group]
        retain = ctx.record.owner.retains_graph()  # ghost clipping's second backward
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [ctx.ins[i] for i in needs] + flat,
            [g for _, g in pairs],
            allow_unused=True,
            retain_graph=retain,
        )
        grads = [None] * len(ctx.ins)
        for i, grad in zip(needs, found):
            grads[i] = grad
        probe_grads = iter(found[len(needs) :])
        g_groups = []
        for group in ctx.probes:
            parts = [next(probe_grads) for _ in group]
            parts = [torch.zeros_like(p) if d is None else d for p, d in zip(group, parts)]
            joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            g_groups.append(zero_padded(joined, ctx.batch))
        ctx.record.x = tuple(zero_padded(s.detach(), ctx.batch) for s in ctx.saved)
        ctx.record.g = tuple(g_groups)
        ctx.record.owner.on_backward(ctx.record)
        return (None, None, None, None, *grads)


@contextlib.contextmanager
def _detached(module: nn.Module, names):
    saved = {n: module._parameters[n] for n in names}
    try:
        for n, p in saved.items():
            module._parameters[n] = p.detach()
        yield
    finally:
        module._parameters.update(saved)


@contextlib.contextmanager
def _detached_tree(module: nn.Module, params: dict[str, nn.Parameter]):
    """Like _detached for parameters anywhere in the module's subtree (rules that cover one,
    such as Opacus's DPLSTM whose weights live in its cells), as fresh leaves that require
    gradients: the call's graph then reaches its probes even when no input requires one
    (autograd.grad asked for the probes only never computes the leaves' gradients)."""
    ids = {id(p) for p in params.values()}
    saved = [
        (m, n, p)
        for m in module.modules()
        for n, p in m._parameters.items()
        if p is not None and id(p) in ids
    ]
    try:
        for m, n, p in saved:
            m._parameters[n] = p.detach().requires_grad_(True)
        yield
    finally:
        for m, n, p in saved:
            m._parameters[n] = p


_BYPASS = contextvars.ContextVar("torch_dpfast_bypass", default=False)


@contextlib.contextmanager
def bypassed():
    """Captured layers run their original forward (with the batch broadcast below) while
    gradients are on: the independence probe's backward (coupling.py) needs a plain graph."""
    token = _BYPASS.set(True)
    try:
        yield
    finally:
        _BYPASS.reset(token)


def bind(module: nn.Module, body):
    """``module.forward`` replaced by ``body(self, original, params, args, kwargs)`` whenever
    gradients are on (the original forward otherwise). torch.compile runs it eagerly (a graph
    break around each captured layer): its bookkeeping would otherwise be traced and guarded,
    and recompile with every physical batch.

    A layer of the usual kind whose one input has dim 0 of size 1 while the model's batch has
    B > 1 rows (position ids (1, T) that the model broadcasts over the batch) gets the input
    expanded to B rows: its output is then what broadcasting would make of it, with each
    example's own row, so that its gradient is per example. (coupling.py's backward probe
    catches a model that uses such an output other than by broadcasting.)"""
    original = module.forward
    rule_params = body.rule.parameters
    broadcast = isinstance(body, _IOCapture)
    traced = isinstance(body, UseCapture)

    def forward(self, *args, **kwargs):
        if traced and tracing.probe_logging() is not None:
            return body.probed(original, args, kwargs)
        tracer = tracing.active()
        if tracer is not None and tracer.log is not None and not tracer.suspended and not traced:
            return _probed_layer(tracer, original, args, kwargs)
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if broadcast:
            args = body.attachment.broadcast(args)
        if _BYPASS.get():
            return original(*args, **kwargs)
        tracer = tracing.active()
        if tracer is None or tracer.suspended or traced:
            return body(self, original, rule_params(self), args, kwargs)
        # Called inside a traced module's forward: on constants (a bias table's MLP), the layer
        # is part of a derivation; on the batch, it is captured as usual.
        if not tracer.carries_batch((args, kwargs)):
            return original(*args, **kwargs)
        with tracer.suspend():
            out = body(self, original, rule_params(self), args, kwargs)
        tracer.mark_batch(out)
        return out

    return types.MethodType(torch.compiler.disable(forward), module)


def _probed_layer(tracer, original, args, kwargs):
    """A layer with a rule, called in a traced module during the probe's runs: on the batch it
    is no use of the tracer's (its output is batch); on constants, part of a derivation."""
    if not tracer.carries_batch((args, kwargs)):
        return original(*args, **kwargs)
    with tracer.suspend():
        out = original(*args, **kwargs)
    tracer.mark_batch(out)
    return out


def switchable_root(model: nn.Module, attachment: Attachment) -> None:
    """A root without a rule gets a forward that runs ``attachment._root_traced`` once the
    probe traced the root (trace_callers): the probe runs in the root's forward pre-hook, after
    that very call chose its forward, so rebinding the root would miss the first step."""
    original = model.forward

    def forward(self, *args, **kwargs):
        traced = attachment._root_traced
        return original(*args, **kwargs) if traced is None else traced(*args, **kwargs)

    model.forward = types.MethodType(forward, model)
    attachment._restores.append(lambda: model.__dict__.pop("forward", None))


def bind_root(model: nn.Module, body):
    """The root's traced forward (bind of its original forward, under the switch)."""
    switch = model.__dict__.pop("forward")
    try:
        return bind(model, body)
    finally:
        model.forward = switch


@dataclass
class _IOCapture:
    """The usual capture: one tensor in, the layer run on detached parameters (_Capture)."""

    attachment: Attachment
    rule: Rule
    path: str

    def __call__(self, module, original, params, args, kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise TypeError(
                f"torch_dpfast: the captured layer {self.path!r} ({type(module).__name__}) must "
                "be called with one tensor argument"
            )
        seq_first = not self.attachment.batch_first and not in_batch_first_call()
        record = self.attachment.record(module, self.rule, params, seq_first=seq_first)

        def call(x_in):
            with _detached(module, params):
                return original(x_in)

        rows = self.attachment.forward_rows(args[0])
        return _Capture.apply(args[0], self.attachment._anchor, call, record, rows)


@dataclass
class _CallCapture:
    """For the fallback: any arguments; the module runs on detached parameter leaves."""

    attachment: Attachment
    rule: Rule
    path: str

    def __call__(self, module, original, params, args, kwargs):
        record = self.attachment.record(module, self.rule, params)
        tensors = [a for a in args if isinstance(a, Tensor)]
        tensors += [v for v in kwargs.values() if isinstance(v, Tensor)]

        def call(*ins):
            it = iter(ins)
            args_in = tuple(next(it) if isinstance(a, Tensor) else a for a in args)
            kwargs_in = {k: next(it) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with _original_forward(module):
                out = torch.func.functional_call(module, leaves, args_in, kwargs_in)
            return out, leaves, (args_in, kwargs_in)

        result = _CaptureCall.apply(self.attachment._anchor, call, record, *tensors)
        return result if len(result) > 1 else result[0]


@dataclass
class _ProjectionCapture:
    """For rules with ``capture = "projections"`` (rules/attention.py): the rule re-implements
    the forward and hands its parameterised part to ``capture(inputs, call)``, run as
    ``function`` with the module's parameters ``detached``."""

    attachment: Attachment
    rule: Rule
    path: str
    function = _CaptureMany
    detached = staticmethod(_detached)

    def __call__(self, module, original, params, args, kwargs):
        record = self.attachment.record(module, self.rule, params)

        def capture(inputs, call):
            def detached_call(*xs):
                with self.detached(module, params):
                    return call(*xs)

            rows = self.attachment.forward_rows(*inputs)
            anchor = self.attachment._anchor
            return self.function.apply(anchor, detached_call, record, rows, *inputs)

        return self.rule.forward(module, capture, *args, **kwargs)


@dataclass
class _ProbeCapture(_ProjectionCapture):
    """For rules with ``capture = "probes"`` (rules/recurrent.py): as _ProjectionCapture, the
    call run as _CaptureProbes, with parameters anywhere in the module's subtree."""

    function = _CaptureProbes
    detached = staticmethod(_detached_tree)


def _in_trace() -> bool:
    """Whether a traced module's forward is running (a traced module inside it joins it)."""
    outer = tracing.active()
    return outer is not None and not outer.suspended


@dataclass
class UseCapture:
    """For modules traced by parameter use (rules/traced.py, tracing.py): the forward runs on
    the whole batch under a UseTracer; a traced module called inside another's forward is part
    of that trace."""

    attachment: Attachment
    rule: Rule
    path: str
    _linears: dict = field(default_factory=dict)  # (id(W), id(b)) -> FunctionalLinear
    _embeddings: dict = field(default_factory=dict)  # (id(W), padding_idx) -> FunctionalEmbedding

    def __call__(self, module, original, params, args, kwargs):
        if _in_trace():
            return original(*args, **kwargs)
        tracer = self._tracer(args, kwargs, layers=self)
        with tracer.scope():
            out = original(*args, **kwargs)
        out = tracer.finish(out)
        trace = tracer.trace
        if trace.params:
            device = next(iter(trace.params.values())).device
            marker = torch.empty(trace.batch, 0, device=device)  # the record's batch (B rows)
            self.attachment.record(module, self.rule, trace.parameters(), x=trace, g=marker)
        return out

    def probed(self, original, args, kwargs):
        """One of the independence probe's runs: the forward unchanged, under a tracer that
        logs what each use of a parameter assigns to examples (tracing.probe_log)."""
        if _in_trace():
            return original(*args, **kwargs)
        with self._tracer(args, kwargs, log=tracing.probe_logging()).scope():
            return original(*args, **kwargs)

    def _tracer(self, args, kwargs, layers=None, log=None) -> tracing.UseTracer:
        """A tracer for one call of the module, its arguments marked as the batch."""
        attachment = self.attachment
        batch = attachment.forward_batch or coupling.batch_size(args, kwargs) or 1
        tracer = tracing.UseTracer(
            self.path, batch, attachment._param_ids, attachment._names, layers, log
        )
        tracer.mark_batch((args, kwargs))
        return tracer

    def linear(self, x: Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> Tensor:
        """F.linear on parameters, captured as a linear layer (rules/traced.FunctionalLinear)."""
        key = (id(weight), id(bias))
        layer = self._linears.get(key)
        if layer is None or layer.weight is not weight or layer.bias is not bias:
            layer = self._linears[key] = FunctionalLinear(weight, bias)
        params = FUNCTIONAL_LINEAR.parameters(layer)
        record = self.attachment.record(layer, FUNCTIONAL_LINEAR, params)
        detached_bias = None if bias is None else bias.detach()

        def call(x_in):
            return torch.nn.functional.linear(x_in, weight.detach(), detached_bias)

        rows = self.attachment.forward_rows(x)
        return _Capture.apply(x, self.attachment._anchor, call, record, rows)

    def embedding(self, ids: Tensor, weight: nn.Parameter, padding_idx: int | None) -> Tensor:
        """F.embedding on a parameter, captured as an embedding layer
        (rules/traced.FunctionalEmbedding)."""
        key = (id(weight), padding_idx)
        layer = self._embeddings.get(key)
        if layer is None or layer.weight is not weight:
            layer = self._embeddings[key] = FunctionalEmbedding(weight, padding_idx)
        params = FUNCTIONAL_EMBEDDING.parameters(layer)
        record = self.attachment.record(layer, FUNCTIONAL_EMBEDDING, params)

        def call(ids_in):
            return torch.nn.functional.embedding(ids_in, weight.detach(), padding_idx)

        rows = self.attachment.forward_rows(ids)
        return _Capture.apply(ids, self.attachment._anchor, call, record, rows)


CAPTURES = {
    "uses": UseCapture,
    "io": _IOCapture,
    "call": _CallCapture,
    "projections": _ProjectionCapture,
    "probes": _ProbeCapture,
}

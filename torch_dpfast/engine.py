"""Attaching exact per-example clipping to an unmodified model.

``attach(model)`` replaces the ``forward`` of every module that owns trainable parameters with a
capturing version: the layer runs with its parameters *detached*, inside a custom autograd
function whose backward records the gradient g of the layer output and hands back only the
gradient of the layer input. The ordinary weight-gradient GEMMs of the backward are therefore
never computed; after the backward, :meth:`Attachment.clip_and_accumulate` turns the captured
(x, g) of every layer into per-example norms, clip factors and clipped sums (book-keeping), and
adds the sums to ``p.summed_grad``. Layer outputs are fresh tensors, so in-place operations after
any layer (``ReLU(inplace=True)``, ``x += shortcut``) work.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import certify, coupling, losses, materialise_plan, ops, tracing
from .explain import assign_rules, check_no_batch_statistics
from .materialise_plan import check_budget
from .rules import scaled_sum
from .rules._registry import Rule, in_batch_first_call, leading
from .rules.fallback import FALLBACK, WINDOW_ATTENTION, _original_forward, batch_dim
from .rules.traced import FUNCTIONAL_LINEAR, TRACED, FunctionalLinear

CLIPPING_MODES = ("auto", "bk", "per_example", "ghost")
_NORM_METHOD = {"auto": "auto", "bk": "ghost"}


@dataclass(eq=False)
class _Record:
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

    @property
    def device(self) -> torch.device:
        return leading(self.g).device

    @property
    def batch(self) -> int:
        g = leading(self.g)
        return g.shape[batch_dim(self.module, g) if self.rule is FALLBACK else 0]


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
        return out if rows is None else _copies_of_first_row(out, rows, x.shape[0], record)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Ghost clipping runs a second backward through this small graph.
            retain = ctx.record.owner._ghost is not None
            g_in = g if ctx.rows is None else g[: ctx.rows]
            (grad_x,) = torch.autograd.grad(ctx.out, ctx.x_leaf, g_in, retain_graph=retain)
        ctx.record.x, ctx.record.g = x.detach(), g.detach()
        ctx.record.owner._on_backward(ctx.record)
        return grad_x, None, None, None, None


def _copies_of_first_row(out: Tensor, rows: int, batch: int, record: _Record) -> Tensor:
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
        retain = ctx.record.owner._ghost is not None  # ghost clipping's second backward
        grads = torch.autograd.grad(ctx.first, targets, g, allow_unused=True, retain_graph=retain)
        n = len(ctx.leaves)
        ctx.record.batch_grads = dict(zip(ctx.leaves, grads[:n]))
        args, kwargs = ctx.arguments
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        ctx.record.x = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})
        ctx.record.g = g.detach()
        ctx.record.owner._on_backward(ctx.record)
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
            retain = ctx.record.owner._ghost is not None  # ghost clipping's second backward
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
        ctx.record.owner._on_backward(ctx.record)
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
        retain = ctx.record.owner._ghost is not None  # ghost clipping's second backward
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
            g_groups.append(zero_padded(torch.cat(parts, dim=1), ctx.batch))
        ctx.record.x = tuple(zero_padded(s.detach(), ctx.batch) for s in ctx.saved)
        ctx.record.g = tuple(g_groups)
        ctx.record.owner._on_backward(ctx.record)
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


@dataclass(eq=False)
class Attachment:
    """Per-example clipping attached to a model; see :func:`attach`."""

    model: nn.Module
    clipping: str
    loss_reduction: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)  # path -> the rule capturing it
    mask: Tensor | None = None  # (B,) rows to keep in the next clip_and_accumulate
    # rows the captured layers compute: the mask's kept prefix (0 < k < B), 1 for an all-masked
    # batch; None: all of them
    computed_rows: int | None = None
    generation: int = 0  # counts begin_batch calls
    batch_started: bool = False  # begin_batch was called since the last clip (a loader's batch)
    clipped_generation: int = 0  # the generation clip_and_accumulate last ran for
    forward_batch: int | None = None  # B of the forward in progress (on_forward)
    batch_first: bool = True  # False: layer inputs hold the batch in dim 1 (sequence-first)
    # bytes of per-example gradients auto may hold on CPU instead of fast paths (0: none)
    materialise_bytes: int = materialise_plan.DEFAULT_MATERIALISE_BYTES
    _ghost: object = None  # the ghost pass in progress (ghost.py)
    _ghost_norms: Tensor | None = None  # squared norms of the last ghost_backward
    _stray_backward: bool = False  # ghost mode: a backward ran outside ghost_backward
    _records: list[_Record] = field(default_factory=list)
    _workspace: dict[int, Tensor] = field(default_factory=dict)  # id(p) -> materialised buffer
    _hooks: list = field(default_factory=list)
    _restores: list = field(default_factory=list)  # undo what rules changed (Rule.adapt)
    _leaked: set[str] = field(default_factory=set)  # parameters that got an ordinary gradient
    _anchor: Tensor = field(default_factory=lambda: torch.empty(0, requires_grad=True))
    _param_ids: frozenset = frozenset()  # ids of the parameters attached (for attachments_of)
    _names: dict = field(default_factory=dict)  # id(parameter) -> its name in the model
    _root_traced: object = None  # the root's traced forward, once the probe asked for it

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters whose gradients this attachment makes private."""
        seen, out = set(), []
        for path, module in self.modules.items():
            for p in self.rules[path].parameters(module).values():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def begin_batch(self, mask: Tensor | None) -> None:
        """A new physical batch: ``mask`` (B,) marks its real rows (None: all are real). Call it
        before the forward: when the mask keeps only the first k rows (a CPU mask, as the
        PrivacyEngine's padded batches have), captured layers compute those k rows only; when
        it keeps none (an empty sample, or a rank's padding batch), row 0 only."""
        self.generation += 1
        self.mask = mask
        self.batch_started = True
        self.computed_rows = None
        if mask is None or mask.device.type != "cpu" or mask.shape[0] < 2 or not self.batch_first:
            return
        kept = kept_prefix(mask, mask.shape[0])
        if kept < mask.shape[0]:
            self.computed_rows = kept
        elif not mask.any():
            self.computed_rows = 1

    def on_forward(self, module, args, kwargs) -> None:
        """Root forward pre-hook: notes the batch size B of this forward (the physical batch's
        mask length when begin_batch gave one, else dim 0 of the first tensor argument)."""
        self.forward_batch = self.mask.shape[0] if self.mask is not None else None
        if self.forward_batch is None:
            self.forward_batch = coupling.batch_size(args, kwargs, 0 if self.batch_first else 1)

    def broadcast(self, args: tuple) -> tuple:
        """``args`` with a lone tensor of dim 0 of size 1 expanded to the forward's B rows."""
        batch = self.forward_batch
        if batch is None or batch < 2 or len(args) != 1 or not isinstance(args[0], Tensor):
            return args
        if not self.batch_first:
            return args
        x = args[0]
        if x.dim() < 2 or x.shape[0] != 1:
            return args
        return (x.expand(batch, *x.shape[1:]),)

    def take_mask(self) -> Tensor | None:
        """The batch's mask, once: its layer calls are being clipped, so later forwards are
        computed whole again."""
        mask, self.mask, self.computed_rows = self.mask, None, None
        self.batch_started = False
        return mask

    def forward_rows(self, *xs: Tensor) -> int | None:
        """How many leading rows of its inputs ``xs`` a captured layer computes:
        ``computed_rows`` when every input is the masked batch (its dim 0 is the mask's
        length); None for all."""
        if self.computed_rows is None:
            return None
        batch = self.mask.shape[0]
        return self.computed_rows if all(x.dim() and x.shape[0] == batch for x in xs) else None

    def record(self, module: nn.Module, rule: Rule, params, **fields) -> _Record:
        """Registers one call of a captured layer."""
        record = _Record(module, rule, params, generation=self.generation, owner=self, **fields)
        self._records.append(record)
        return record

    def discard(self, keep_pending: bool = False) -> None:
        """Forgets captured layer calls (after a step, or a backward that will not be used).
        With ``keep_pending``, calls whose backward has not run yet are kept: ``zero_grad()``
        between a forward and its backward must not drop what that backward will need."""
        if keep_pending:
            self._records[:] = [r for r in self._records if r.g is None]
        else:
            self._records.clear()

    def detach(self) -> None:
        """Restores the original forwards; the model trains non-privately again."""
        for module in self.modules.values():
            module.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        while self._restores:
            self._restores.pop()()
        self.modules.clear()
        self.rules.clear()
        self._workspace.clear()
        self.discard()
        self.take_mask()
        _live.discard(self)

    def trace_callers(self, paths: list[str]) -> bool:
        """Layers called on constants rather than the batch (``paths``, found by the probe's
        first run): their output is shared by the examples, so the nearest module above them
        without a rule of its own is traced (rules/traced.py): the layer becomes part of a
        derivation, and its gradient is assigned per example where the shared output meets
        the batch. Returns whether any module was newly traced."""
        changed = False
        for path in dict.fromkeys(paths):
            caller = path.rpartition(".")[0] if path else None
            while caller is not None and caller in self.rules and self.rules[caller] is not TRACED:
                caller = caller.rpartition(".")[0] if caller else None
            if caller is None or caller in self.rules:  # nothing above, or traced already
                continue
            module = self.model.get_submodule(caller)
            if caller == "":  # the root's call in progress already chose its forward
                self._root_traced = _bind_root(module, _UseCapture(self, TRACED, caller))
            else:
                module.forward = _bind(module, _UseCapture(self, TRACED, caller))
            self.modules[caller] = module
            self.rules[caller] = TRACED
            changed = True
        return changed

    def clip_and_accumulate(self, max_grad_norm: float) -> Tensor:
        """Clips each example's gradient over all attached parameters to norm ``max_grad_norm``
        and adds sum_i c_i g_i to ``p.summed_grad``. Returns the (B,) squared norms (after the
        loss-reduction rescaling). Examples masked out by ``self.mask`` contribute nothing.
        Refused a second time for one physical batch of a make_private loader (a second
        ``optimizer.step()`` would release a partial sum as a logical step)."""
        if self.generation and self.generation == self.clipped_generation:
            raise RuntimeError(
                "torch_dpfast: optimizer.step() was called twice for one physical batch: the "
                "second step would release a partial sum as a whole logical step. Call "
                "optimizer.step() once after each backward()"
            )
        self.clipped_generation = self.generation
        if self.clipping == "ghost":
            return self._ghost_result()
        try:
            self.check_no_leaks()
        except (RuntimeError, ValueError):
            self.discard()  # this batch cannot be clipped: nothing of it may reach a later one
            self.take_mask()
            raise
        records = [r for r in self._records if r.g is not None]
        self._records.clear()
        batch_started = self.batch_started
        mask = self.take_mask()
        if not records:
            return torch.zeros(0)
        if len({r.generation for r in records}) > 1:
            raise RuntimeError(
                "torch_dpfast: the gradients of several physical batches reached one "
                "optimizer.step(); call optimizer.step() after the backward of every physical "
                "batch (it only clips and accumulates until the logical batch is complete)"
            )
        # (records of traced uses have no backward of their own: task -1)
        if not batch_started and len({r.task for r in records if r.task >= 0}) > 1:
            raise RuntimeError(
                "torch_dpfast: several backward() calls reached one optimizer.step() on batches "
                "that did not come from a make_private data loader (poisson_sampling=False, or "
                "a custom loop): their examples would be merged row by row and clipped together "
                "(sensitivity 2C). Call optimizer.step() after every backward(); for larger "
                "logical batches use make_private(..., poisson_sampling=True, "
                "physical_batch_size=...), which accumulates per example"
            )
        batch = self._batch_of(records, mask)
        for r in records:
            check_batch(r, batch, mask)
        records = merge_repeated(records)
        # With a mean-reduced loss, autograd's g carries a factor 1/B; per-example gradients
        # are the gradients of the per-example losses, so multiply it back.
        loss_scale = float(batch) if self.loss_reduction == "mean" else 1.0
        # Layers whose rule has a fast path (no per-example gradients) take it; the others
        # (shared parameters, the fallback, small rules such as the norm layers' that
        # materialise anyway) are materialised once, for both their norms and their sums.
        if self.clipping == "per_example":
            per_example = materialise(records)
            return self._clip_materialised(per_example, max_grad_norm, loss_scale, mask, batch)
        # Rows from `kept` on are a physical batch's padding: no norm is computed for them, and
        # their factor is 0 (the fast paths do not even read them).
        kept = kept_prefix(mask, batch)
        plain = [r for r in plain_records(records) if has_fast_path(r.rule)]
        # On CPU, auto materialises the layers where that saves their norm (materialise_plan.py),
        # on their real rows only.
        cut = self._to_materialise(plain, kept)
        buffers = {id(r): self._workspace_for(r, kept) for r in plain if id(r) in cut}
        plain = [r for r in plain if id(r) not in cut]
        plain_ids = {id(r) for r in plain}
        per_example = materialise([r for r in records if id(r) not in plain_ids], buffers, kept)

        parts, exact = self._certified_norms(plain, kept, _NORM_METHOD[self.clipping])
        if per_example:
            parts.append(ops.per_example_norm_sq([g[:kept] for _, g in per_example.values()]))
        device = leading(records[0].g).device
        norm_sq, factors = ops.total_clip_factors(
            parts,
            max_grad_norm,
            _mask_on(None if mask is None else mask[:kept], device),
            norm_scale=loss_scale**2,
        )
        norm_sq, factors = zero_padded(norm_sq, batch), zero_padded(factors, batch)
        _warn_non_finite(norm_sq, mask)
        scale = factors * loss_scale
        for r in plain:
            x, g = leading_rows(r, kept)
            factors_of_rows = scale if g is r.g else scale[:kept]
            if id(r) in exact:  # recomputed examples are added exactly, not by the fast sum
                for name, summed in exact[id(r)].sums(scale).items():
                    _accumulate(r.params[name], summed)
                factors_of_rows = exact[id(r)].without(factors_of_rows)
            for name, summed in r.rule.clipped_sums(r.module, x, g, factors_of_rows).items():
                _accumulate(r.params[name], summed)
        for p, grad in per_example.values():
            _accumulate(p, scaled_sum(grad, scale[: grad.shape[0]]))
        return norm_sq

    def _batch_of(self, records: list[_Record], mask: Tensor | None) -> int:
        """B: the physical batch's mask length; else the forward's batch (dim 0 of the model's
        first tensor argument) when every layer saw a multiple of it (layers may see k B
        folded rows); else the fewest rows a layer saw."""
        if mask is not None:
            return mask.shape[0]
        fewest = min(r.batch for r in records)
        guess = self.forward_batch
        if guess and all(r.batch % guess == 0 for r in records):
            return guess
        return fewest

    @staticmethod
    def _certified_norms(
        plain: list[_Record], kept: int, method: str
    ) -> tuple[list[Tensor], dict[int, certify.Exact]]:
        """The (kept,) squared norms of the fast-path records, certified against their rules'
        bounds (certify.py), and {id(record): Exact} for the examples recomputed exactly."""
        checked = []
        for r in plain:
            x, g = leading_rows(r, kept)
            norm_sq, bad = certify.check(r, x, g, r.rule.norm_sq(r.module, x, g, method))
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

    def _workspace_for(self, record: _Record, rows: int) -> dict[str, Tensor]:
        """{name: (rows, *p.shape) buffer} for the per-example gradients of a materialised
        layer: reused from one physical batch to the next (fresh allocations of this size
        would be returned to the OS and page-faulted back every time)."""
        dtype = torch.promote_types(record.x.dtype, record.g.dtype)
        out = {}
        for name, p in record.params.items():
            need = rows * p.numel()
            held = self._workspace.get(id(p))
            if held is None or held.numel() < need or held.dtype != dtype:
                held = torch.empty(need, dtype=dtype, device=record.device)
                self._workspace[id(p)] = held
            out[name] = held[:need].view(rows, *p.shape)
        return out

    def _to_materialise(self, plain: list[_Record], rows: int) -> set[int]:
        """ids of the fast-path records that auto materialises (materialise_plan.py) for a
        batch whose first ``rows`` rows are real."""
        if not plain or not materialise_plan.applies(self.clipping, plain[0].device):
            return set()
        candidates = [
            materialise_plan.candidate(id(r), r.rule, r.module, r.x, r.g, rows) for r in plain
        ]
        candidates = [c for c in candidates if c is not None]
        chosen = materialise_plan.choose(candidates, self.materialise_bytes)
        # The workspace holds only this batch's choice, so it never exceeds the budget.
        keep = {id(p) for r in plain if id(r) in chosen for p in r.params.values()}
        for key in [k for k in self._workspace if k not in keep]:
            del self._workspace[key]
        return chosen

    def check_no_leaks(self) -> None:
        """Raises if a parameter got an ordinary gradient, or a BatchNorm uses batch statistics."""
        if self._leaked:
            leaked, self._leaked = sorted(self._leaked), set()
            raise RuntimeError(
                f"torch_dpfast: parameter(s) {leaked} received an ordinary, unclipped gradient: "
                "something used them outside their own layer's forward (a parent module reading "
                "child.weight directly, such as nn.MultiheadAttention's out_proj or an output "
                "layer written as F.linear(h, embedding.weight)). Call the layer itself, or tie "
                "weights by assigning the Parameter (self.out.weight = self.embed.weight)"
            )
        check_no_batch_statistics(self.model)

    def _on_backward(self, record: _Record) -> None:
        """Called by a captured layer's backward once its g is recorded."""
        record.task = torch._C._current_graph_task_id()
        if not self.batch_first:
            to_batch_first(record)  # each backward records x and g afresh, sequence-first
        if self._ghost is not None:
            self._ghost.on_backward(record)
        elif self.clipping == "ghost":
            self._stray_backward = True

    def _ghost_result(self) -> Tensor:
        """clip_and_accumulate in ghost mode: the two passes already accumulated the sums."""
        stray, self._stray_backward = self._stray_backward, False
        self._records.clear()
        self.take_mask()
        if stray:
            raise RuntimeError(
                "torch_dpfast: clipping='ghost' clips in two backward passes that the wrapped "
                "loss runs: call backward() on the loss returned by the criterion that "
                "make_private returned (or use torch_dpfast.ghost.ghost_backward), not on a "
                "plain loss"
            )
        norm_sq, self._ghost_norms = self._ghost_norms, None
        return norm_sq if norm_sq is not None else torch.zeros(0)

    def _clip_materialised(self, per_example, max_grad_norm, loss_scale, mask, batch) -> Tensor:
        params = [p for p, _ in per_example.values()]
        for p in params:
            if p.summed_grad is None:
                p.summed_grad = torch.zeros_like(p)
        grads = [(g * loss_scale).to(p.dtype) for p, g in per_example.values()]
        norm_sq = ops.clip_accumulate_(
            grads,
            [p.summed_grad for p in params],
            max_grad_norm,
            _mask_on(mask, grads[0].device),
        )
        _warn_non_finite(norm_sq, mask)
        return norm_sq


def to_batch_first(record: _Record) -> None:
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


def check_batch(record: _Record, batch: int, mask: Tensor | None) -> None:
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
        if getattr(record.rule, "position_wise", False):
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


def _unfolded(t: Tensor, batch: int) -> Tensor:
    """(k B, ...) example-major -> (B, k, ...)."""
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


def plain_records(records: list[_Record]) -> list[_Record]:
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


def merge_repeated(records: list[_Record]) -> list[_Record]:
    """The calls of one module with a ``mergeable`` rule (linear maps: Linear, recurrent cells
    called once per step) joined into one record: their inputs and output gradients, as
    (B, T_k, d), concatenated along T. Example i's gradient is sum_k sum_t g_ikt x_ikt^T, the
    gradient of one call over all the steps, so the fast path applies to the parameters used
    T times (the calls are otherwise materialised and summed)."""
    calls: dict[int, list[_Record]] = {}
    for r in records:
        if getattr(r.rule, "mergeable", False) and r.fold == 1:
            calls.setdefault(id(r.module), []).append(r)
    merged = {}
    for group in calls.values():
        if len(group) > 1:
            first = group[0]
            x = _joined([r.x for r in group])
            g = _joined([r.g for r in group])
            merged[id(first)] = _Record(
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


def leading_rows(record: _Record, rows: int) -> tuple[object, object]:
    """(x, g) of a layer call cut to its first ``rows`` examples (views) where both are single
    batch-first tensors; (x, g) unchanged otherwise (tuples of inputs, folded windows)."""
    x, g = record.x, record.g
    if isinstance(x, Tensor) and isinstance(g, Tensor) and record.fold == 1:
        if rows < g.shape[0] and x.shape[0] == g.shape[0]:
            return x[:rows], g[:rows]
    return x, g


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
    records: list[_Record], buffers: dict[int, dict[str, Tensor]] | None = None, rows: int = 0
) -> dict[int, tuple[nn.Parameter, Tensor]]:
    """{id(p): (p, (B, *p.shape) per-example gradient summed over p's uses)}; the records
    with buffers (``buffers[id(record)]``, single-use parameters) are materialised on their
    first ``rows`` examples only, (rows, *p.shape), into those buffers."""
    buffers = buffers or {}
    per_example: dict[int, tuple[nn.Parameter, Tensor]] = {}
    with torch.profiler.record_function("torch_dpfast::per_example_gradients"):
        for r in records:
            _materialise_one(r, buffers, rows, per_example)
    return per_example


def _materialise_one(r: _Record, buffers, rows: int, per_example: dict) -> None:
    """Adds the per-example gradients of one layer call to ``per_example`` (see materialise)."""
    if r.rule is FALLBACK:
        grads = FALLBACK.per_example_grads(r.module, r.x, r.g, rows=r.fold)
        _check_examples_independent(r, grads)
    elif id(r) in buffers:
        grads = r.rule.per_example_grads(r.module, *leading_rows(r, rows), out=buffers[id(r)])
    elif r.fold > 1:  # per row, then summed over each example's rows
        grads = {
            name: grad.reshape(-1, r.fold, *grad.shape[1:]).sum(dim=1)
            for name, grad in r.rule.per_example_grads(r.module, r.x, r.g).items()
        }
    else:
        grads = r.rule.per_example_grads(r.module, r.x, r.g)
    for name, grad in grads.items():
        p = r.params[name]
        prev = per_example.get(id(p))
        per_example[id(p)] = (p, grad if prev is None else prev[1] + grad)


def _check_examples_independent(record: _Record, grads: dict[str, Tensor]) -> None:
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


def _mask_on(mask: Tensor | None, device: torch.device) -> Tensor | None:
    return None if mask is None else mask.to(device=device, dtype=torch.bool)


def _warn_non_finite(norm_sq: Tensor, mask: Tensor | None) -> None:
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


def _accumulate(p: nn.Parameter, summed: Tensor) -> None:
    summed = summed.to(p.dtype)
    p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed


_live: weakref.WeakSet = weakref.WeakSet()


def _batch_of(ref) -> int | None:
    """The physical batch size an attachment was told of (begin_batch's mask), else None."""
    attachment = ref()
    mask = None if attachment is None else attachment.mask
    return None if mask is None else mask.shape[0]


def set_module_alias(module: nn.Module, attachment: Attachment) -> None:
    """``module._module`` is ``module`` (Opacus's GradSampleModule kept the model there; scripts
    unwrap it that way), set outside nn.Module's registry (no child, no state_dict entry, no
    cycle) and removed by ``attachment.detach()``."""
    if "_module" in module.__dict__ or "_module" in module._modules:
        return  # the model has its own
    object.__setattr__(module, "_module", module)
    attachment._restores.append(lambda: module.__dict__.pop("_module", None))


def attachments_of(params) -> list[Attachment]:
    """The live attachments that cover any of ``params`` (set lookups: this runs at every
    step, with as many attachments alive as models made and not yet collected)."""
    ids = {id(p) for p in params}
    return [a for a in list(_live) if not ids.isdisjoint(a._param_ids)]


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


def _bind(module: nn.Module, body):
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
    traced = isinstance(body, _UseCapture)

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


def _switchable_root(model: nn.Module, attachment: Attachment) -> None:
    """A root without a rule gets a forward that runs ``attachment._root_traced`` once the
    probe traced the root (trace_callers): the probe runs in the root's forward pre-hook, after
    that very call chose its forward, so rebinding the root would miss the first step."""
    original = model.forward

    def forward(self, *args, **kwargs):
        traced = attachment._root_traced
        return original(*args, **kwargs) if traced is None else traced(*args, **kwargs)

    model.forward = types.MethodType(forward, model)
    attachment._restores.append(lambda: model.__dict__.pop("forward", None))


def _bind_root(model: nn.Module, body):
    """The root's traced forward (_bind of its original forward, under the switch)."""
    switch = model.__dict__.pop("forward")
    try:
        return _bind(model, body)
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


def _flag_leak(attachment: Attachment, name: str):
    return lambda p: attachment._leaked.add(name)


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


@dataclass
class _UseCapture:
    """For modules traced by parameter use (rules/traced.py, tracing.py): the forward runs on
    the whole batch under a UseTracer; a traced module called inside another's forward is part
    of that trace."""

    attachment: Attachment
    rule: Rule
    path: str
    _linears: dict = field(default_factory=dict)  # (id(W), id(b)) -> FunctionalLinear

    def __call__(self, module, original, params, args, kwargs):
        outer = tracing.active()
        if outer is not None and not outer.suspended:
            return original(*args, **kwargs)
        attachment = self.attachment
        batch = attachment.forward_batch or coupling.batch_size(args, kwargs) or 1
        tracer = tracing.UseTracer(
            self.path, batch, attachment._param_ids, attachment._names, self.linear
        )
        tracer.mark_batch((args, kwargs))
        with tracer.scope():
            out = original(*args, **kwargs)
        out = tracer.finish(out)
        trace = tracer.trace
        if trace.params:
            device = next(iter(trace.params.values())).device
            marker = torch.empty(batch, 0, device=device)  # the record's batch (B rows)
            attachment.record(module, self.rule, trace.parameters(), x=trace, g=marker)
        return out

    def probed(self, original, args, kwargs):
        """One of the independence probe's runs: the forward unchanged, under a tracer that
        logs what each use of a parameter assigns to examples (tracing.probe_log)."""
        outer = tracing.active()
        if outer is not None and not outer.suspended:
            return original(*args, **kwargs)
        attachment = self.attachment
        batch = attachment.forward_batch or coupling.batch_size(args, kwargs) or 1
        tracer = tracing.UseTracer(
            self.path,
            batch,
            attachment._param_ids,
            attachment._names,
            log=tracing.probe_logging(),
        )
        tracer.mark_batch((args, kwargs))
        with tracer.scope():
            return original(*args, **kwargs)

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


_CAPTURES = {
    "uses": _UseCapture,
    "io": _IOCapture,
    "call": _CallCapture,
    "projections": _ProjectionCapture,
    "probes": _ProbeCapture,
}


def attach(
    model: nn.Module,
    clipping: str = "auto",
    loss_reduction: str = "mean",
    materialise_bytes: int = materialise_plan.DEFAULT_MATERIALISE_BYTES,
    probe_coupling: bool = True,
    batch_first: bool = True,
) -> Attachment:
    """Makes every trainable parameter of ``model`` receive clipped per-example gradients.

    Args:
        model: any module. Submodules that own trainable parameters are captured by their rule
            (``torch_dpfast.rules``), or else by the exact but slower generic fallback
            (``rules/fallback.py``); a trainable BatchNorm is refused.
        clipping: ``"auto"`` (book-keeping, ghost or direct norm per layer by the cost model),
            ``"bk"`` (book-keeping with ghost norms), ``"per_example"`` (materialised per-example
            gradients, the Opacus-equivalent baseline), ``"ghost"`` (two backward passes, least
            memory: use :func:`torch_dpfast.ghost.ghost_backward` on per-example losses, or the
            criterion that ``PrivacyEngine.make_private`` returns).
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over the batch.
        materialise_bytes: with ``clipping="auto"`` on CPU, how many bytes of per-example
            gradients a physical batch may hold for the layers (linear, ungrouped conv) where
            materialising them is cheaper than their ghost or direct norm (it saves the norm's
            multiply-adds; ``torch_dpfast/materialise_plan.py``). Default 1 GiB; 0 turns it
            off. Ignored on GPUs and in the other modes.
        batch_first: False for sequence-first models (Opacus's ``batch_first=False``): every
            layer without a batch-aware rule sees (T, B, ...) inputs; convolutions and the
            generic fallback then do not apply.
        probe_coupling: on the first forward with gradients on, check that changing one example
            moves no other example's layer inputs or outputs (coupling.py; two extra no-grad
            forwards, once), and raise naming the first layer where it does.

    Returns:
        The :class:`Attachment`; ``DPOptimizer`` finds it through the parameters.
    """
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if attachments_of(p for p in model.parameters() if p.requires_grad):
        raise RuntimeError("this model is already attached; call .detach() on the old attachment")
    attachment = Attachment(
        model,
        clipping,
        loss_reduction,
        materialise_bytes=check_budget(materialise_bytes),
        batch_first=batch_first,
    )
    attachment._names = {id(p): n for n, p in model.named_parameters()}
    for path, (module, rule) in assign_rules(model, traced=batch_first).items():
        kind = getattr(rule, "capture", "io")
        module.forward = _bind(module, _CAPTURES[kind](attachment, rule, path))
        adapt = getattr(rule, "adapt", None)
        restore = adapt(model, path, module) if adapt is not None else None
        if restore is not None:
            attachment._restores.append(restore)
        attachment.modules[path] = module
        attachment.rules[path] = rule
    if "" not in attachment.modules:
        _switchable_root(model, attachment)
    attachment._hooks.append(
        model.register_forward_pre_hook(
            torch.compiler.disable(attachment.on_forward), with_kwargs=True
        )
    )
    token_labels = losses.refuse_token_labels(model)
    if token_labels is not None:
        attachment._hooks.append(token_labels)
    if probe_coupling:
        hint = weakref.ref(attachment)
        attachment._hooks.append(
            coupling.install(
                model,
                attachment.modules,
                lambda: _batch_of(hint),
                bypassed,
                batch_first,
                attachment.trace_callers,
            )
        )
    names = attachment._names
    attachment._param_ids = frozenset(id(p) for p in attachment.parameters())
    for p in attachment.parameters():
        p.summed_grad = None
        # Inside captured layers parameters are detached; a gradient reaching one means it was
        # used somewhere else, where its contribution would escape clipping.
        attachment._hooks.append(
            p.register_post_accumulate_grad_hook(_flag_leak(attachment, names[id(p)]))
        )
    _live.add(attachment)
    return attachment

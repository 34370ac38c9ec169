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

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import coupling, cpu_memory, losses, materialise_plan
from .assign import assign_rules, check_no_batch_statistics
from .batch_layout import LoaderBatch, argument_findings, raise_found
from .capture import CAPTURES, UseCapture, bind, bind_root, bypassed, switchable_root
from .clippers import CLIPPING_MODES, Clipper, make_clipper
from .materialise_plan import resolve_budget
from .records import (
    Record,
    check_batch,
    drop_stale_output,
    kept_prefix,
    merge_repeated,
    to_batch_first,
)
from .rules._registry import Rule, clip_cache
from .rules.traced import TRACED
from .validation import check_loss_reduction

__all__ = ["CLIPPING_MODES", "Attachment", "ClipBatch", "attach", "attachments_of"]


@dataclass
class ClipBatch:
    """What a clipper clips: the captured layer calls of one physical batch (repeated calls of
    a parameter joined), its mask (B,) or None, its size B, and the factor that turns the
    loss's output gradients into per-example ones (B for a mean-reduced loss)."""

    records: list[Record]
    mask: Tensor | None
    size: int
    loss_scale: float


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
    checked_generation: int = 0  # the loader batch whose forward on_forward last compared
    # that comparison on a device, read when the batch is clipped (batch_layout.raise_found)
    argument_findings: list = field(default_factory=list)
    batch_started: bool = False  # begin_batch was called since the last clip (a loader's batch)
    clipped_generation: int = 0  # the generation clip_and_accumulate last ran for
    forward_batch: int | None = None  # B of the forward in progress (on_forward)
    batch_first: bool = True  # False: layer inputs hold the batch in dim 1 (sequence-first)
    # bytes of per-example gradients auto may hold on CPU instead of fast paths (0: none)
    materialise_bytes: int = materialise_plan.FALLBACK_BYTES
    clipper: Clipper | None = None  # clippers/: how this mode clips a physical batch
    # the batch the data loader yielded last (make_private's loader sets it)
    loader_batch: Callable[[], LoaderBatch] = LoaderBatch
    _records: list[Record] = field(default_factory=list)
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
        self.argument_findings = []  # a batch never clipped adds nothing: its findings go too
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
        mask length when begin_batch gave one, else dim 0 of the first tensor argument). The
        first training forward of each loader batch is compared with that batch (turned around
        or reordered: batch_layout.argument_findings, a pass over the inputs): on CPU decided
        here, on a device read when the batch is clipped (no synchronisation in the forward;
        the loader's tensors are copied to the device once per batch)."""
        self.forward_batch = self.mask.shape[0] if self.mask is not None else None
        if self.forward_batch is None:
            self.forward_batch = coupling.batch_size(args, kwargs, 0 if self.batch_first else 1)
        elif torch.is_grad_enabled() and self.checked_generation != self.generation:
            self.checked_generation = self.generation
            loader = self.loader_batch()
            if not loader.tensors:
                return
            findings = argument_findings(
                (args, kwargs), loader, self.forward_batch, self.batch_first
            )
            if _decided_now(findings):
                raise_found(findings)
            else:
                self.argument_findings = findings

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

    def record(self, module: nn.Module, rule: Rule, params, **fields) -> Record:
        """Registers one call of a captured layer."""
        record = Record(module, rule, params, generation=self.generation, owner=self, **fields)
        self._records.append(record)
        return record

    def recorded(self) -> list[Record]:
        """The layer calls captured since the last clip (those whose backward ran have g)."""
        return list(self._records)

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
        self.clipper.reset()
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
                self._root_traced = bind_root(module, UseCapture(self, TRACED, caller))
            else:
                module.forward = bind(module, UseCapture(self, TRACED, caller))
            self.modules[caller] = module
            self.rules[caller] = TRACED
            changed = True
        return changed

    def clip_and_accumulate(self, max_grad_norm: float) -> Tensor:
        """Clips each example's gradient over all attached parameters to norm ``max_grad_norm``
        and adds sum_i c_i g_i to ``p.summed_grad`` (by this mode's clipper, clippers/).
        Returns the (B,) squared norms (after the loss-reduction rescaling). Examples masked
        out by ``self.mask`` contribute nothing. Refused a second time for one physical batch
        of a make_private loader (a second ``optimizer.step()`` would release a partial sum as
        a logical step)."""
        if self.generation and self.generation == self.clipped_generation:
            raise RuntimeError(
                "torch_dpfast: optimizer.step() was called twice for one physical batch: the "
                "second step would release a partial sum as a whole logical step. Call "
                "optimizer.step() once after each backward()"
            )
        self.clipped_generation = self.generation
        with clip_cache():
            return self.clipper.clip(self, max_grad_norm)

    def take_batch(self) -> ClipBatch | None:
        """The physical batch whose backward ran, checked (no parameter leaked a gradient, one
        batch and one backward per step, every layer's rows map onto its B examples), or None
        when no captured layer ran; the attachment forgets it."""
        try:
            self.check_no_leaks()
            findings, self.argument_findings = self.argument_findings, []
            raise_found(findings)  # this batch's forward arguments, compared on a device
        except (RuntimeError, ValueError):
            self.discard()  # this batch cannot be clipped: nothing of it may reach a later one
            self.take_mask()
            raise
        records = [r for r in self._records if r.g is not None]
        self._records.clear()
        batch_started = self.batch_started
        mask = self.take_mask()
        if not records:
            return None
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
            drop_stale_output(r)
            check_batch(r, batch, mask)
        # With a mean-reduced loss, autograd's g carries a factor 1/B; per-example gradients
        # are the gradients of the per-example losses, so multiply it back.
        loss_scale = float(batch) if self.loss_reduction == "mean" else 1.0
        return ClipBatch(merge_repeated(records), mask, batch, loss_scale)

    def _batch_of(self, records: list[Record], mask: Tensor | None) -> int:
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

    def on_backward(self, record: Record) -> None:
        """Called by a captured layer's backward once its g is recorded."""
        record.task = torch._C._current_graph_task_id()
        if not self.batch_first:
            to_batch_first(record)  # each backward records x and g afresh, sequence-first
        self.clipper.on_backward(self, record)

    def retains_graph(self) -> bool:
        """Whether another backward through this graph follows (ghost clipping's second pass):
        captured layers then keep what their backward needs."""
        return self.clipper.retains_graph()


_live: weakref.WeakSet = weakref.WeakSet()


def _decided_now(findings: list) -> bool:
    """Whether batch_layout.argument_findings's flags are read in the forward: on CPU, where
    reading them costs no synchronisation."""
    return all(flag.device.type == "cpu" for flag, _ in findings)


def _loader_batch(ref) -> LoaderBatch:
    """The batch the attachment's data loader yielded last (an empty one without a loader)."""
    attachment = ref()
    return LoaderBatch() if attachment is None else attachment.loader_batch()


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


def _flag_leak(attachment: Attachment, name: str):
    return lambda p: attachment._leaked.add(name)


def attach(
    model: nn.Module,
    clipping: str = "auto",
    loss_reduction: str = "mean",
    materialise_bytes: int | None = materialise_plan.DEFAULT_MATERIALISE_BYTES,
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
            gradients a physical batch may hold for the layers (linear, conv) where
            materialising them is cheaper than their ghost or direct norm (it saves the norm's
            multiply-adds; ``torch_dpfast/materialise_plan.py``). Default (None): an eighth of
            the memory available when attached (``dpf.explain`` shows it); 0 turns it off.
            Ignored on GPUs and in the other modes.
        batch_first: False for sequence-first models (Opacus's ``batch_first=False``): every
            layer without a batch-aware rule sees (T, B, ...) inputs; convolutions and the
            generic fallback then do not apply.
        probe_coupling: on the first forward with gradients on, check that changing one example
            moves no other example's layer inputs or outputs (coupling.py; two extra no-grad
            forwards, once), and raise naming the first layer where it does.

    Returns:
        The :class:`Attachment`; ``DPOptimizer`` finds it through the parameters.
    """
    clipper = make_clipper(clipping)
    check_loss_reduction(loss_reduction)
    if attachments_of(p for p in model.parameters() if p.requires_grad):
        raise RuntimeError("this model is already attached; call .detach() on the old attachment")
    attachment = Attachment(
        model,
        clipping,
        loss_reduction,
        materialise_bytes=resolve_budget(materialise_bytes),
        batch_first=batch_first,
        clipper=clipper,
    )
    attachment._names = {id(p): n for n, p in model.named_parameters()}
    for path, (module, rule) in assign_rules(model, traced=batch_first).items():
        kind = rule.capture
        module.forward = bind(module, CAPTURES[kind](attachment, rule, path))
        adapt = getattr(rule, "adapt", None)
        restore = adapt(model, path, module) if adapt is not None else None
        if restore is not None:
            attachment._restores.append(restore)
        attachment.modules[path] = module
        attachment.rules[path] = rule
    if "" not in attachment.modules:
        switchable_root(model, attachment)
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
                lambda: _loader_batch(hint),
            )
        )
    names = attachment._names
    params = attachment.parameters()
    attachment._param_ids = frozenset(id(p) for p in params)
    if any(p.device.type == "cpu" for p in params):
        cpu_memory.keep_freed_memory()
    for p in params:
        p.summed_grad = None
        # Inside captured layers parameters are detached; a gradient reaching one means it was
        # used somewhere else, where its contribution would escape clipping.
        attachment._hooks.append(
            p.register_post_accumulate_grad_hook(_flag_leak(attachment, names[id(p)]))
        )
    _live.add(attachment)
    return attachment

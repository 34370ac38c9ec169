"""Parameter-use tracing: exact per-example gradients for parameters that no module rule covers.

A module that owns trainable parameters but has no rule (a ConvNeXt block's ``gamma``, a ViT's
``cls_token`` and ``pos_embed``, a Swin window attention's bias table, a subclass of
``nn.Linear`` with its own forward) runs its forward once, on the whole batch, under a
:class:`UseTracer` (a ``TorchFunctionMode``). The tracer sees every torch call, and sorts the
tensors it gets into

* parameters: trainable parameters of the model, used outside their own layer's captured call;
* derived: computed from parameters and constants only (``table[index]``, ``gamma.reshape``,
  ``logit_scale.exp()``): the same for every example;
* batch: computed from the module's inputs (or from a layer called on them); their dim 0 holds
  the batch, B rows or k B rows example-major;
* constants: anything else (buffers, ``torch.arange``).

A call that mixes a parameter or derived tensor w with batch tensors is a *use* of w, and gets
an exact per-example rule:

* broadcast uses (elementwise ops, ``expand`` to the batch, an attention mask): w, broadcast
  over dim 0, is replaced by a leaf E holding R copies of it, one per output row; after the
  backward, example i's gradient of w is the sum of E.grad over its rows (the rows are the
  batch's, example-major: the independence probe checks that);
* ``F.linear(x, W, b)`` with W a parameter: a linear layer of its own (its x and output gradient
  are captured like an ``nn.Linear``'s, with the fast norms and book-keeping); likewise
  ``F.embedding(ids, W)`` (an embedding subclass with its own forward, such as OPT's learned
  positions), with the embedding rule;
* any other call: the op runs under ``torch.func.vmap`` over the examples with per-example
  copies E (B, *w.shape) of w, whose gradient rows are the per-example gradients (the
  "fallback (vmap)" of ``dpf.explain``: exact, materialised).

The per-example gradient of a derived w is pushed back to the parameters it came from through
the derivation's own graph, a vector-Jacobian product batched over the examples. Nothing of the
parameters reaches the model's graph except through these leaves, so a use the tracer does not
see shows up as an ordinary gradient and is refused (engine.check_no_leaks).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

#: elementwise ops whose tensor arguments broadcast against each other
POINTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "rsub", "addcmul", "addcdiv", "where",
        "lerp", "maximum", "minimum", "clamp", "clip", "pow", "fmod", "remainder",
        "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
        "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__pow__",
        "__rpow__", "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "lerp_", "clamp_",
    }
)  # fmt: skip
#: ops that broadcast their first argument to a given shape
EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
#: attribute reads and metadata: never uses of a parameter's values
METADATA = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size",
     "is_floating_point", "is_complex", "__len__", "requires_grad_", "detach", "__repr__",
     "__format__", "__hash__", "__eq__"}
)  # fmt: skip

_ACTIVE: contextvars.ContextVar[UseTracer | None] = contextvars.ContextVar(
    "torch_dpfast_tracer", default=None
)


_PROBE_LOG: contextvars.ContextVar[tuple[list, str] | None] = contextvars.ContextVar(
    "torch_dpfast_probe_log", default=None
)


def active() -> UseTracer | None:
    """The tracer of the traced module whose forward is running, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def probe_log(seen: list, what: str):
    """The independence probe's runs (coupling.py): traced modules run unchanged, and append
    (path, tensor) to ``seen`` for each use of a parameter: the batch input whose rows the use
    assigns to examples (``what="inputs"``), or its output (``what="outputs"``)."""
    token = _PROBE_LOG.set((seen, what))
    try:
        yield
    finally:
        _PROBE_LOG.reset(token)


def probe_logging() -> tuple[list, str] | None:
    return _PROBE_LOG.get()


def _name(func) -> str:
    return getattr(func, "__name__", "")


#: elements of the zero-padded per-example gradients of row-aligned derived tensors pushed
#: through their derivation at once (the examples go in chunks of this size)
ROWS_CHUNK_ELEMENTS = 1 << 24


@dataclass(eq=False)
class Use:
    """One use of a parameter or derived tensor ``source``: ``leaf`` stands in for it.

    Kinds: "broadcast": R = k B copies of the source (example i owns rows i k .. i k + k - 1);
    "rows": the source itself has those R rows (a derived tensor computed per row, such as
    EdgeNeXt's position encoding of shape (B, ...)), row r belonging to example r // k;
    "vmap": B copies, one per example."""

    source: Tensor
    leaf: Tensor
    op: str
    kind: str

    def per_example(self, batch: int) -> Tensor:
        """(B, *source.shape) for "broadcast" and "vmap" uses: each example's gradient of
        ``source`` through this use."""
        grad = self.leaf.grad
        if grad is None:
            return self.source.new_zeros(batch, *self.source.shape)
        rows = grad.shape[0]
        grad = grad.reshape(batch, rows // batch, *grad.shape[1:]).sum(dim=1)
        return grad.reshape(batch, *self.source.shape)

    def row_grads(self) -> Tensor:
        """(R, *source.shape[1:]) for a "rows" use: row r's gradient, example r // k's."""
        grad = self.leaf.grad
        return torch.zeros_like(self.source) if grad is None else grad


@dataclass(eq=False)
class Trace:
    """What one traced forward recorded (the ``x`` of its engine record)."""

    batch: int
    names: dict[int, str]  # id(parameter) -> name
    uses: list[Use] = field(default_factory=list)
    roots: dict[int, Tensor] = field(default_factory=dict)  # id(parameter) -> its leaf copy
    params: dict[int, nn.Parameter] = field(default_factory=dict)  # id -> parameters touched

    def parameters(self) -> dict[str, nn.Parameter]:
        """{name: parameter} of the parameters whose gradients this trace gives."""
        return {self.names[i]: p for i, p in self.params.items()}

    def reset(self) -> None:
        """Drops the leaves' gradients (ghost clipping's second backward must not add to them)."""
        for use in self.uses:
            use.leaf.grad = None

    def check_contained(self) -> None:
        """Raises if the model's backward reached a parameter's stand-in in a derivation: a
        tensor computed from the parameter left the traced module by a way the tracer does not
        see (inside an object it cannot look into, or stored on a module), and its gradient
        would be lost."""
        escaped = [self.names[key] for key, leaf in self.roots.items() if leaf.grad is not None]
        if escaped:
            raise RuntimeError(
                f"torch_dpfast: a tensor computed from {escaped} left its traced module other "
                "than through the module's outputs (an object the tracer cannot look into, or "
                "an attribute read later), so its gradient cannot be clipped per example. "
                "Return it from the module (tensors, tuples, dicts, dataclasses registered "
                "with torch.utils._pytree), or give the module a rule"
            )

    def per_example_grads(self) -> dict[str, Tensor]:
        """{name: (B, *p.shape)} summed over the uses, through the derivations' graphs."""
        self.check_contained()
        batch = self.batch
        per_source: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (source, (B, *shape))
        rows: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (source, (R, ...) row gradients)
        for use in self.uses:
            into = rows if use.kind == "rows" else per_source
            grad = use.row_grads() if use.kind == "rows" else use.per_example(batch)
            prev = into.get(id(use.source))
            into[id(use.source)] = (use.source, grad if prev is None else prev[1] + grad)
        out = {key: None for key in self.params}
        derived = [(s, g) for key, (s, g) in per_source.items() if key not in self.params]
        for key, (_, grad) in per_source.items():
            if key in self.params:
                out[key] = grad
        self._through_derivations(derived, out, slice(0, batch))
        if rows:
            self._rows_to_examples(list(rows.values()), out)
        return {
            self.names[key]: p.new_zeros(batch, *p.shape) if out[key] is None else out[key]
            for key, p in self.params.items()
        }

    def _through_derivations(self, derived, out: dict, examples: slice) -> None:
        """Adds the examples' gradients of the parameters behind derived tensors: the
        vector-Jacobian product of each derivation, batched over the examples."""
        if not derived:
            return
        roots = list(self.roots.items())
        grads = torch.autograd.grad(
            [s for s, _ in derived],
            [leaf for _, leaf in roots],
            [g.to(s.dtype) for s, g in derived],
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=True,
        )
        for (key, leaf), grad in zip(roots, grads):
            if grad is None:
                continue
            if out[key] is None:
                out[key] = leaf.new_zeros(self.batch, *leaf.shape)
            out[key][examples] += grad

    def _rows_to_examples(self, sources, out: dict) -> None:
        """Row-aligned uses: example i's gradient of a source is its rows' gradient, zero
        elsewhere; (chunk, R, ...) of these at a time go through the derivations."""
        batch = self.batch
        size = max(s.numel() for s, _ in sources)
        chunk = max(1, min(batch, ROWS_CHUNK_ELEMENTS // max(size, 1)))
        for start in range(0, batch, chunk):
            examples = slice(start, min(batch, start + chunk))
            count = examples.stop - start
            derived = []
            for source, grad in sources:
                per_row = grad.reshape(batch, -1, *grad.shape[1:])  # (B, k, ...)
                padded = per_row.new_zeros(count, *per_row.shape)  # (count, B, k, ...)
                index = torch.arange(count, device=grad.device)
                padded[index, index + start] = per_row[examples]
                padded = padded.reshape(count, *source.shape)
                key = id(source)
                if key in self.params:
                    if out[key] is None:
                        out[key] = source.new_zeros(batch, *source.shape)
                    out[key][examples] += padded
                else:
                    derived.append((source, padded))
            self._through_derivations(derived, out, examples)


class UntracedUse(NotImplementedError):
    """A parameter's use that no per-example rule covers."""


class UseTracer(TorchFunctionMode):
    """The mode a traced module's forward runs under (module docstring).

    Args:
        path: the traced module's name, for messages.
        batch: B, the number of examples.
        param_ids: ids of the model's attached trainable parameters.
        names: id(parameter) -> name.
        layers: runs ``F.linear`` and ``F.embedding`` on parameters as captured layers of their
            own (``layers.linear(x, weight, bias)``, ``layers.embedding(ids, weight,
            padding_idx)``: capture.UseCapture), or None to trace them as any other use.
    """

    def __init__(self, path: str, batch: int, param_ids, names, layers=None, log=None):
        super().__init__()
        self.path = path
        self.log = log  # the probe's (seen, what): run unchanged, log the uses (probe_log)
        self.trace = Trace(batch, names)
        self.param_ids = param_ids
        self.layers = layers
        # Tensors are marked with attributes holding this tracer's token (a set of ids would
        # need a weak dictionary lookup per torch call: ten times slower)
        self.token = object()
        self.suspended = 0

    # -- the tracer's scope --------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self):
        """Runs the block under this tracer (the mode, and :func:`active`)."""
        token = _ACTIVE.set(self)
        try:
            with self:
                yield self
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def suspend(self):
        """Calls in the block pass through untouched (a captured layer's own call). Where this
        tracer is the innermost mode it is off in the block (popped, pushed back on exit), so
        that the layer's torch calls cost no Python dispatch (ConvNeXt-atto's traced blocks:
        a forward 1.3x the plain one with the mode on inside their captured layers)."""
        self.suspended += 1
        try:
            if torch.overrides._get_current_function_mode() is self:
                with torch.overrides._pop_mode_temporarily():
                    yield
            else:
                yield
        finally:
            self.suspended -= 1

    def mark_batch(self, tree) -> None:
        """The tensors in ``tree`` hold the batch (inputs of the module, outputs of layers)."""
        if isinstance(tree, Tensor):
            tree._dpf_batch = self.token
            return
        for t in tree_flatten(tree)[0]:
            if isinstance(t, Tensor):
                t._dpf_batch = self.token

    def carries_batch(self, tree) -> bool:
        """Whether a tensor in ``tree`` holds the batch (is computed from it)."""
        return any(isinstance(t, Tensor) and self._is_batch(t) for t in tree_flatten(tree)[0])

    def _is_batch(self, t: Tensor) -> bool:
        return getattr(t, "_dpf_batch", None) is self.token

    def _is_param(self, t: Tensor) -> bool:
        return isinstance(t, nn.Parameter) and id(t) in self.param_ids

    def is_derived(self, t: Tensor | None) -> bool:
        """Whether ``t`` was computed from parameters and constants only, in this trace."""
        return getattr(t, "_dpf_derived", None) is self.token

    def _origins(self, t: Tensor) -> set[int]:
        """ids of the parameters an owned tensor comes from (kept in the probe's runs)."""
        return {id(t)} if self._is_param(t) else getattr(t, "_dpf_origins", set())

    # -- the mode ------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended or _name(func) in METADATA:
            return func(*args, **kwargs)
        if self.log is None and not torch.is_grad_enabled():
            return func(*args, **kwargs)
        leaves = _shallow_leaves(args, kwargs)
        spec = None
        if leaves is None:  # nested containers
            leaves, spec = tree_flatten((args, kwargs))
        owned, batched = [], []
        for k, t in enumerate(leaves):
            if isinstance(t, Tensor):
                if self._is_param(t) or self.is_derived(t):
                    owned.append(k)
                elif self._is_batch(t):
                    batched.append(k)
        if not owned:
            out = func(*args, **kwargs)
            if batched:
                self.mark_batch(out)
            return out
        if spec is None:
            leaves, spec = tree_flatten((args, kwargs))  # the same order as the shallow scan
        rows = [k for k in batched if self._batch_rows(leaves[k])]
        if not rows:
            return self._derive(func, leaves, spec, owned, batched)
        return self._use(func, leaves, spec, owned, rows)

    def _batch_rows(self, t: Tensor) -> bool:
        """Whether a batch tensor holds examples in dim 0 (B or k B rows); one with dim 0 of 1
        (position ids broadcast over the batch) or none is shared by the examples."""
        batch = self.trace.batch
        if t.dim() == 0 or (t.shape[0] == 1 and batch > 1):
            return False
        if t.shape[0] % batch:
            raise UntracedUse(
                f"torch_dpfast: in {self.path!r}, a parameter meets a tensor of the batch whose "
                f"dim 0 ({t.shape[0]}) is not a multiple of the batch ({batch}): the examples "
                "must stay in dim 0 (B, or k B rows example-major) wherever a parameter is used"
            )
        return True

    def _root(self, p: nn.Parameter) -> Tensor:
        """The leaf standing in for ``p`` in derivations (one per parameter and forward)."""
        self.trace.params[id(p)] = p
        leaf = self.trace.roots.get(id(p))
        if leaf is None:
            leaf = p.detach().requires_grad_(True)
            self.trace.roots[id(p)] = leaf
        return leaf

    def _derive(self, func, leaves, spec, owned, batched):
        """A computation on parameters and constants (and tensors shared by the batch): the
        result is derived, unless it expands to the batch (a use)."""
        if _name(func) in EXPANDS and owned == [0]:
            shape = _out_shape(func, leaves, spec)
            if shape is not None and shape and shape[0] % self.trace.batch == 0:
                if leaves[0].dim() < len(shape) or leaves[0].shape[0] == 1:
                    if self.log is not None:
                        return self._logged(func, leaves, spec, owned, [], "broadcast")
                    return self._broadcast(func, leaves, spec, owned, torch.Size(shape))
        swapped = list(leaves)
        for k in owned:
            if self._is_param(leaves[k]) and self.log is None:
                swapped[k] = self._root(leaves[k])
        args, kwargs = tree_unflatten(swapped, spec)
        out = func(*args, **kwargs)
        origins = None
        if self.log is not None:
            origins = set().union(*(self._origins(leaves[k]) for k in owned))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and (t.requires_grad or self.log is not None):
                t._dpf_derived = self.token
                if origins is not None:
                    t._dpf_origins = origins
        if batched:
            self.mark_batch(out)
        return out

    def _use(self, func, leaves, spec, owned, rows):
        kind, shape = self._kind(func, leaves, spec, owned)
        if self.log is not None:
            return self._logged(func, leaves, spec, owned, rows, kind)
        if kind == "linear" or (_name(func) == "linear" and self.layers is not None):
            return self._linear(func, leaves, spec)
        if kind == "embedding":
            args, kwargs = tree_unflatten(leaves, spec)
            ids, weight, padding_idx = _embedding_arguments(args, kwargs)
            with self.suspend():
                out = self.layers.embedding(ids, weight, padding_idx)
            self.mark_batch(out)
            return out
        if kind == "broadcast":
            return self._broadcast(func, leaves, spec, owned, shape)
        return self._vmap(func, leaves, spec, owned, rows)

    def _kind(self, func, leaves, spec, owned) -> tuple[str, torch.Size | None]:
        """How a use is made per example: "linear", "broadcast" (with the shape its owned
        arguments broadcast to) or "vmap"."""
        name = _name(func)
        if name == "linear" and (self.layers is not None or self.log is not None):
            args, kwargs = tree_unflatten(list(leaves), spec)
            if self._is_param(_linear_arguments(args, kwargs)[1]):
                return "linear", None
        if name == "embedding" and (self.layers is not None or self.log is not None):
            args, kwargs = tree_unflatten(list(leaves), spec)
            if owned == [1] and _plain_embedding(args, kwargs) and self._is_param(leaves[1]):
                return "embedding", None
        broadcast = _broadcast_positions(name, leaves, spec)
        if broadcast is not None and set(owned) <= broadcast:
            shape = _broadcast_shape(name, func, leaves, spec)
            if shape is not None and len(shape) and shape[0] % self.trace.batch == 0:
                if all(_broadcasts_over_rows(leaves[k], shape) for k in owned):
                    return "broadcast", shape
        return "vmap", None

    def _source(self, t: Tensor) -> Tensor:
        """The tensor a use's gradient is reported for: the parameter itself, or the derived
        tensor (its gradient goes back through the derivation)."""
        if self._is_param(t):
            self.trace.params[id(t)] = t
        return t

    def _broadcast(self, func, leaves, spec, owned, shape: torch.Size):
        """Each owned argument w replaced by R copies, E (R, 1.., *w.shape) with R = shape[0]."""
        swapped = list(leaves)
        for k in owned:
            w = self._source(leaves[k])
            if w.dim() == len(shape) and w.shape[0] == shape[0] and shape[0] > 1:
                leaf = w.detach().requires_grad_(True)  # the rows are the batch's
                self.trace.uses.append(Use(w, leaf, _name(func), "rows"))
            else:
                lead = (1,) * (len(shape) - w.dim())
                copies = w.detach().reshape(lead + tuple(w.shape))
                leaf = copies.expand(shape[0], *copies.shape[1:]).requires_grad_(True)
                self.trace.uses.append(Use(w, leaf, _name(func), "broadcast"))
            swapped[k] = leaf
        args, kwargs = tree_unflatten(swapped, spec)
        out = func(*args, **kwargs)
        self.mark_batch(out)
        return out

    def _linear(self, func, leaves, spec):
        """F.linear(x, W, b): a captured linear layer for a parameter W (and bias b); anything
        else of the call is traced as its own use (a derived W, a derived bias)."""
        args, kwargs = tree_unflatten(leaves, spec)
        x, weight, bias = _linear_arguments(args, kwargs)
        linear_bias = bias if bias is not None and self._is_param(bias) else None
        if self._is_param(weight):
            with self.suspend():
                out = self.layers.linear(x, weight, linear_bias)
        elif self.is_derived(weight):  # F.linear(x, W) is a use of the derived W
            leaves, spec = tree_flatten(((x, weight), {}))
            out = self._vmap(func, leaves, spec, [1], [0])
            linear_bias = None
        else:  # a constant weight
            out = func(x, weight)
            linear_bias = None
        self.mark_batch(out)
        if bias is not None and linear_bias is None:
            out = self.__torch_function__(torch.add, (Tensor,), (out, bias), {})
        return out

    def _vmap(self, func, leaves, spec, owned, rows):
        """Any other use: the op run per example under torch.func.vmap, each owned argument w
        replaced by per-example copies E (B, *w.shape)."""
        batch = self.trace.batch
        inputs, in_dims = list(leaves), []
        uses = []
        for k, t in enumerate(leaves):
            if k in owned:
                w = self._source(t)
                leaf = w.detach().expand(batch, *w.shape).requires_grad_(True)
                uses.append(Use(w, leaf, _name(func), "vmap"))
                inputs[k] = leaf
                in_dims.append(0)
            elif k in rows:
                inputs[k] = t.reshape(batch, t.shape[0] // batch, *t.shape[1:])
                in_dims.append(0)
            else:
                in_dims.append(None)

        def per_example(*xs):
            a, kw = tree_unflatten(list(xs), spec)
            return func(*a, **kw)

        try:
            out = torch.func.vmap(per_example, in_dims=tuple(in_dims), randomness="error")(*inputs)
        except Exception as error:  # vmap cannot batch this op: say where and what to do
            raise UntracedUse(
                f"torch_dpfast: in {self.path!r}, {_name(func) or func} uses a trainable "
                f"parameter in a way torch_dpfast has no per-example rule for, and running it "
                f"per example (torch.func.vmap) failed: {error}. Register a rule for the module "
                "(torch_dpfast.rules.register_rule), or freeze the parameter"
            ) from error
        self.trace.uses.extend(uses)
        out = _merge_example_dim(out)
        self.mark_batch(out)
        return out

    def _logged(self, func, leaves, spec, owned, rows, kind):
        """A use during the probe's runs (or explain's): computed unchanged, and logged."""
        seen, what = self.log
        args, kwargs = tree_unflatten(leaves, spec)
        out = func(*args, **kwargs)
        self.mark_batch(out)
        if what == "uses":
            for k in owned:  # F.linear's bias unless a parameter: added (a broadcast use)
                bias = kind == "linear" and k != 1 and not self._is_param(leaves[k])
                use = ("add", "broadcast") if bias else (_name(func), kind)
                seen.append((self.path, *use, self._origins(leaves[k])))
        elif what == "inputs" and rows:
            seen.append((self.path, leaves[rows[0]].detach().clone()))
        else:
            first = next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor)), None)
            if first is not None and first.requires_grad:
                seen.append((self.path, first))
        return out

    def finish(self, out):
        """The module's output: derived tensors in it leave the trace as uses (a position table
        the module returns for its caller to add is expanded to the batch's B rows here)."""
        if self.log is not None:
            return out
        leaves, spec = tree_flatten(out)
        batch = self.trace.batch
        for k, t in enumerate(leaves):
            if isinstance(t, Tensor) and (self.is_derived(t) or self._is_param(t)):
                if t.dim() == 0 or (t.shape[0] != 1 and batch > 1):
                    raise UntracedUse(
                        f"torch_dpfast: {self.path!r} returns a tensor of shape "
                        f"{tuple(t.shape)} computed from its parameters alone, which its "
                        "caller shares across the batch: its gradient cannot be told apart per "
                        "example. Return it with a leading dimension of 1 (broadcast over the "
                        "batch), or give the module a rule"
                    )
                leaves[k] = self._expand_output(t, torch.Size((batch, *t.shape[1:])))
        return tree_unflatten(leaves, spec)

    def _expand_output(self, t: Tensor, shape: torch.Size) -> Tensor:
        w = self._source(t)
        leaf = w.detach().expand(shape).requires_grad_(True)
        self.trace.uses.append(Use(w, leaf, "output", "broadcast"))
        return leaf


def _shallow_leaves(args: tuple, kwargs: dict) -> list | None:
    """The arguments as pytree leaves when none is a container (most torch calls), in
    tree_flatten's order; None when one is (tree_flatten then does it)."""
    for value in args:
        if isinstance(value, (list, tuple, dict)):
            return None
    if not kwargs:
        return list(args)
    for value in kwargs.values():
        if isinstance(value, (list, tuple, dict)):
            return None
    return [*args, *kwargs.values()]


_EMBEDDING_ARGUMENTS = (
    "input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"
)  # fmt: skip


def _embedding_arguments(args, kwargs):
    values = dict(zip(_EMBEDDING_ARGUMENTS, args))
    values.update(kwargs)
    return values["input"], values["weight"], values.get("padding_idx")


def _plain_embedding(args, kwargs) -> bool:
    """F.embedding without max_norm (which rewrites the table) or scale_grad_by_freq."""
    values = dict(zip(_EMBEDDING_ARGUMENTS, args))
    values.update(kwargs)
    return values.get("max_norm") is None and not values.get("scale_grad_by_freq", False)


def _linear_arguments(args, kwargs):
    names = ("input", "weight", "bias")
    values = dict(zip(names, args))
    values.update(kwargs)
    return values["input"], values["weight"], values.get("bias")


def _broadcast_positions(name: str, leaves, spec) -> set[int] | None:
    """Indices (in the flattened arguments) of the arguments that the op broadcasts over the
    batch, or None for an op that is not a broadcast op."""
    if name in POINTWISE:
        return {k for k, t in enumerate(leaves) if isinstance(t, Tensor)}
    if name in EXPANDS:
        return {0}
    if name == "scaled_dot_product_attention":
        args, kwargs = tree_unflatten(list(range(len(leaves))), spec)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        return {mask} if isinstance(mask, int) else set()
    return None


def _broadcasts_over_rows(w: Tensor, shape: torch.Size) -> bool:
    """Whether ``w`` broadcasts to ``shape`` along its dim 0 (the rows), or has those rows."""
    if w.dim() > len(shape):
        return False
    if w.dim() == len(shape) and w.shape[0] not in (1, shape[0]):
        return False
    try:
        return torch.broadcast_shapes(w.shape, shape) == shape
    except RuntimeError:
        return False


def _broadcast_shape(name, func, leaves, spec) -> torch.Size | None:
    """The shape a broadcast op's owned arguments are broadcast to: its output's, or for
    scaled_dot_product_attention the attention scores' (..., L, S) that attn_mask is added to."""
    if name == "scaled_dot_product_attention":
        args, kwargs = tree_unflatten(list(leaves), spec)
        query, key = args[0], kwargs.get("key", args[1] if len(args) > 1 else None)
        return torch.Size((*query.shape[:-1], key.shape[-2]))
    return _out_shape(func, leaves, spec)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, Tensor) else t


def _out_shape(func, leaves, spec) -> torch.Size | None:
    """The shape of the op's (first) output, from a run on meta tensors (no compute)."""
    args, kwargs = tree_unflatten([_meta(t) for t in leaves], spec)
    try:
        out = func(*args, **kwargs)
    except Exception:  # no meta kernel: not handled as a broadcast
        return None
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.shape if isinstance(out, Tensor) else None


def _merge_example_dim(out):
    """vmap's (B, k, ...) outputs -> (B k, ...)."""
    if isinstance(out, Tensor):
        return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:]) if out.dim() > 1 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_merge_example_dim(o) for o in out)
    return out

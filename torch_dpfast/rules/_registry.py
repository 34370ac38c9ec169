"""The registry of layer rules: which rule measures and clips the parameters of which module type.

A rule turns what a layer saw in one forward/backward (its input ``x`` and the gradient ``g`` of
its output) into, for the layer's own trainable parameters:

* ``norm_sq(module, x, g, method)``: (B,) squared norm of each example's gradient, summed over
  the parameters;
* ``clipped_sums(module, x, g, scale)``: {name: sum_i scale_i G_i} in the parameter's shape;
* ``per_example_grads(module, x, g)``: {name: (B, *param.shape)} materialised gradients (the
  ``per_example`` mode, and parameters used more than once per forward);
* ``normed_per_example_grads(module, x, g, out)`` (optional): (per_example_grads written into
  ``out``, (B,) their squared norms) in one pass, or None where it cannot; the engine takes
  those norms for the layers ``auto`` materialises on CPU instead of a second pass over the
  gradients (rules/_normed.py: linear maps);
* ``norm_bound(module, x, g)`` (rules with a fast ``norm_sq`` only): (B,) float64 upper bound
  U_i >= ||G_i|| built from sums of non-negative terms (no cancellation), e.g.
  sum_t ||g_it|| ||a_it|| for a linear map. The engine certifies a fast-path norm with it
  (certify.py); a rule that overrides ``norm_sq`` without it is materialised instead;
* ``norm_sq_and_bound(module, x, g, method)`` (optional): (``norm_sq``'s, ``norm_bound``'s) from
  one kernel, or None where it cannot; book-keeping takes both from it (rules/_linear_uses.py:
  the ghost norms of a recurrent layer's weights with their bounds from the same Grams).

Class attributes (defaults on :class:`Rule`) tell the engine more:

* ``capture``: how the layer's call is recorded: "io" (default: one tensor in, x and g),
  "projections" (the rule's ``forward(module, capture, ...)`` re-implements the module and hands
  its parameterised part to ``capture``: attention), "probes" (as "projections", and g holds
  the gradients of tensors inside the call: the recurrent layers' gate pre-activations),
  "uses" (the forward runs under the parameter-use tracer, tracing.py: modules without a
  rule of their own);
* ``mergeable``: the calls of one module within a forward can be joined along the position
  axis (linear maps: x and g (B, T_k, d) concatenated over the calls);
* ``position_wise``: the rule treats each position independently, so k B rows folded into
  dim 0 (example-major) can be viewed as (B, k, ...);
* ``subtree``: the rule covers its children's parameters too (Opacus's DPLSTM).

A rule that overrides ``kept_output(module, x, out, g)`` ("io" captures) is shown the layer's
output in the layer's backward, still as the forward made it (not changed in place since), and
says what to keep of it (the output itself, or a reduction of it: a tensor with B rows, or
None); the record's x is then (input, kept), else the input alone. See :func:`keeps_output`
and :func:`input_and_output`.

Rules are found by walking the module type's MRO, so subclasses inherit their base's rule unless
they register their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import drop_unscaled_rows


class Rule:
    """Base class of the layer rules; see the module docstring for the contract."""

    capture: str = "io"  # how a call is recorded: "io", "projections", "probes", "uses", "call"
    mergeable: bool = False  # calls of one module join along the positions (merge_repeated)
    position_wise: bool = False  # k B rows folded into dim 0 can be viewed as (B, k, ...)
    subtree: bool = False  # the rule covers its children's parameters too

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's own trainable parameters (not its children's); frozen ones are skipped."""
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def per_example_grads(self, module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def kept_output(self, module: nn.Module, x: Tensor, out: Tensor, g: Tensor) -> Tensor | None:
        """What to keep of the layer's output ``out`` (B, ...), called in the layer's backward
        with its input x and output gradient g (only for rules that override it)."""
        return None

    def plan(self, module: nn.Module, x: Tensor, out: Tensor, clipping: str) -> tuple[str, int]:
        """(norm method, multiply-adds per example) this rule will use on input ``x`` and output
        ``out``; default: materialised gradients, about 2 multiply-adds per output element per
        parameter element it touches (norm layers)."""
        return "materialised", 2 * out[0].numel()

    def materialise_saving(self, module: nn.Module, x: Tensor, g: Tensor) -> tuple[int, int] | None:
        """(multiply-adds per example of the fast-path norm, values per example of the
        per-example gradients) when ``per_example_grads`` costs no more than the clipped sum's
        GEMM, so that materialising saves the norm (see materialise_plan.py); None otherwise.
        Rules that return a saving take ``per_example_grads(..., out={name: buffer})``: buffers
        of shape (B, *param.shape) to write the gradients into (the engine reuses them from one
        physical batch to the next)."""
        return None

    def call_saving(self, module: nn.Module, x, out) -> tuple[int, int] | None:
        """:meth:`materialise_saving` from the layer's input and output as its forward sees
        them (``dpf.explain``, before any backward): the default passes them on, rules whose
        records hold other tensors (the recurrent ones) work it out from the shapes."""
        return self.materialise_saving(module, x, out) if isinstance(out, Tensor) else None

    def norm_sq(self, module: nn.Module, x: Tensor, g: Tensor, method: str = "auto") -> Tensor:
        """Default: from the materialised per-example gradients (cheap for small parameters)."""
        grads = list(self.per_example_grads(module, x, g).values())
        return ops.per_example_norm_sq(grads) if grads else zero_norms(g)

    def clipped_sums(
        self, module: nn.Module, x: Tensor, g: Tensor, scale: Tensor
    ) -> dict[str, Tensor]:
        """Default: sum_i scale_i G_i over the materialised per-example gradients, leaving out
        examples with scale 0 exactly (so their non-finite values cannot leak)."""
        grads = self.per_example_grads(module, x, g)
        return {name: scaled_sum(grad, scale) for name, grad in grads.items()}


def keeps_output(rule: Rule) -> bool:
    """Whether ``rule`` keeps something of its layer's output (overrides ``kept_output``)."""
    return type(rule).kept_output is not Rule.kept_output


def input_and_output(x) -> tuple[Tensor, Tensor | None]:
    """The x of a rule that keeps outputs (:func:`keeps_output`) as (input, what it kept), None
    where nothing was kept (the output changed in place after the forward, or a call with the
    input only)."""
    return x if isinstance(x, tuple) else (x, None)


def bound_dtype(t: Tensor) -> torch.dtype:
    """Precision of norm bounds: float64 for float64 tensors, else float32. A bound is a sum of
    non-negative terms, so float32 loses no more than ~1e-5 relative; one that overflows is
    inf, which sends its example to the exact float64 path (certify.py)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_norms(t: Tensor, dim: int = -1) -> Tensor:
    """Euclidean norms over ``dim`` (the last by default), as float64 (computed in
    :func:`bound_dtype`)."""
    t = t.to(bound_dtype(t))
    norms = torch.linalg.vector_norm(t, dim=-1) if dim == -1 else t.square().sum(dim).sqrt()
    return norms.to(torch.float64)


def leading(g: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The first output gradient: ``g`` itself, or ``g[0]`` for rules capturing several
    outputs (attention's q/k/v projections); its dim 0 is the batch."""
    return g[0] if isinstance(g, tuple) else g


def zero_norms(g: Tensor | tuple[Tensor, ...]) -> Tensor:
    """(B,) zeros to accumulate squared norms in: float64 for float64 gradients, else float32
    (``g`` may be a tuple of output gradients, see :func:`leading`)."""
    g = leading(g)
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    return torch.zeros(g.shape[0], dtype=dtype, device=g.device)


def scaled_sum(per_example: Tensor, scale: Tensor) -> Tensor:
    """sum_i scale_i per_example[i] with examples of scale 0 left out exactly; (B, ...) -> (...),
    one vector-matrix product scale^T (B x n)."""
    rows = drop_unscaled_rows(per_example, scale)
    rows = rows.reshape(per_example.shape[0], math.prod(per_example.shape[1:]))
    return (scale.to(rows.dtype) @ rows).reshape(per_example.shape[1:])


_CLIP_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "torch_dpfast_clip_cache", default=None
)


@contextlib.contextmanager
def clip_cache():
    """Within one clip the parameters do not change: in this block :func:`per_clip` computes a
    value of the weights (timm's standardised conv weights) once per module, not once per rule
    method; it is forgotten on exit."""
    token = _CLIP_CACHE.set({})
    try:
        yield
    finally:
        _CLIP_CACHE.reset(token)


def per_clip(module: nn.Module, what: str, compute: Callable[[], object]) -> object:
    """``compute()``, once per module and clip inside :func:`clip_cache` (always outside)."""
    cache = _CLIP_CACHE.get()
    if cache is None:
        return compute()
    key = (id(module), what)
    if key not in cache:
        cache[key] = compute()
    return cache[key]


_BATCH_FIRST_CALLS = contextvars.ContextVar("torch_dpfast_batch_first_calls", default=False)


@contextlib.contextmanager
def batch_first_calls():
    """Layers called in this block get batch-first inputs whatever the model's layout: a rule
    that re-implements a sequence-first module (attention) calls its children on batch-first
    tensors, so ``attach(batch_first=False)`` must not transpose those calls' records."""
    token = _BATCH_FIRST_CALLS.set(True)
    try:
        yield
    finally:
        _BATCH_FIRST_CALLS.reset(token)


def in_batch_first_call() -> bool:
    return _BATCH_FIRST_CALLS.get()


_rules: dict[type, Rule] = {}


def register_rule(*module_types: type, force: bool = False) -> Callable[[type], type]:
    """Class decorator: registers an instance of the rule for ``module_types``. Registering a
    type twice is an error unless ``force=True`` (to override a built-in rule)."""

    def decorate(rule_cls: type) -> type:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, Rule)):
            raise TypeError(
                f"register_rule: {rule_cls!r} must be a subclass of torch_dpfast.rules.Rule "
                "(the rule contract: parameters, per_example_grads, and optionally norm_sq, "
                "norm_bound and clipped_sums)"
            )
        for module_type in module_types:
            if module_type in _rules and not force:
                raise RuntimeError(
                    f"{module_type.__name__} already has the rule "
                    f"{type(_rules[module_type]).__name__}; pass force=True to replace it"
                )
            _rules[module_type] = rule_cls()
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for the module's type, or for its nearest registered base class when
    the module does not override that class's ``forward`` (a subclass that computes something
    else, such as a norm followed by an activation, must register its own rule)."""
    module_type = type(module)
    for cls in module_type.__mro__:
        if cls in _rules:
            if cls is module_type or module_type.forward is cls.forward:
                return _rules[cls]
            return None
    return None

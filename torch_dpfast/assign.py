"""Which rule captures each module of a model: its registered rule, the parameter-use tracer
for a module without one, the generic fallback for sequence-first models; trainable BatchNorm
is refused (it has no per-example gradient)."""

from __future__ import annotations

from torch import nn

from .rules import rule_for
from .rules._registry import Rule
from .rules.fallback import FALLBACK
from .rules.traced import TRACED


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def check_no_batch_statistics(model: nn.Module) -> None:
    """Refuses BatchNorm layers that normalise with batch statistics (training mode), frozen or
    not: they make each example's output, and so its gradient, depend on the others."""
    for path, module in model.named_modules():
        if is_batch_norm(module) and (module.training or not module.track_running_stats):
            raise ValueError(
                f"torch_dpfast: module {path!r} ({type(module).__name__}) normalises with batch "
                "statistics, which couples the examples of a batch and breaks per-example "
                "clipping. Replace it with GroupNorm or LayerNorm, or put it in eval mode with "
                "frozen parameters"
            )


def batch_norm_message(path: str, module: nn.Module) -> str:
    """The error for a trainable BatchNorm: it has no per-example gradient."""
    return (
        f"torch_dpfast: module {path or '<root>'!r} ({type(module).__name__}) is a BatchNorm: it "
        "normalises with statistics of the whole batch, so an example's gradient depends on the "
        "other examples and cannot be clipped per example. Replace it with GroupNorm or "
        "LayerNorm (timm models take norm_layer=), or freeze it and put it in eval mode"
    )


def assign_rules(model: nn.Module, traced: bool = True) -> dict[str, tuple[nn.Module, Rule]]:
    """{path: (module, rule)} for every module that owns trainable parameters: its registered
    rule, or else the parameter-use tracer (rules/traced.py; its children keep their own
    rules). With ``traced=False`` (sequence-first models, whose batch is not in dim 0) the
    generic fallback takes a module without a rule, and covers its whole subtree. A rule with
    ``subtree = True`` (Opacus's DPLSTM, whose weights live in its cells) covers its subtree
    too.

    Raises:
        NotImplementedError: a BatchNorm owns trainable parameters (no per-example gradient).
    """
    assigned, covered = {}, []
    for path, module in model.named_modules():
        if any(prefix == "" or path.startswith(prefix + ".") for prefix in covered):
            continue
        rule = rule_for(module)
        subtree = rule is not None and rule.subtree  # a rule covering its children's parameters
        own = [p for p in module.parameters(recurse=subtree) if p.requires_grad]
        if not own:
            continue
        if subtree:
            covered.append(path)
        if rule is None:
            if is_batch_norm(module):
                raise NotImplementedError(batch_norm_message(path, module))
            if traced:
                rule = TRACED
            else:
                rule = FALLBACK
                covered.append(path)
        assigned[path] = (module, rule)
    return assigned

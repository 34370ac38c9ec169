"""Layer rules: per-example gradient norms, clipped sums and materialised per-example gradients
of a layer's own parameters, from its captured input and output gradient. One file per layer
family; see ``_registry`` for the contract and docs/rules.md for the maths."""

from . import (
    attention,
    conv,
    embedding,
    embedding_bag,
    group_norm,
    hf_conv1d,
    instance_norm,
    layer_norm,
    layer_scale,
    linear,
    recurrent,
    recurrent_cell,
    relative_position,
    rms_norm,
    std_conv,
    timm_layers,
)
from ._registry import Rule, register_rule, rule_for, scaled_sum

__all__ = [
    "Rule",
    "attention",
    "conv",
    "embedding",
    "embedding_bag",
    "group_norm",
    "hf_conv1d",
    "instance_norm",
    "layer_norm",
    "layer_scale",
    "linear",
    "recurrent",
    "recurrent_cell",
    "register_rule",
    "relative_position",
    "rms_norm",
    "rule_for",
    "scaled_sum",
    "std_conv",
    "timm_layers",
]

"""Models for ``dpfast train`` and ``dpfast explain``: a small built-in CNN or any timm model."""

from __future__ import annotations

from torch import nn

from ..fix import fix
from . import UsageError


def small_cnn(channels: int, classes: int) -> nn.Module:
    """conv 3x3 (16) - tanh - max-pool 2 - adaptive average pool to 4x4 - linear: small enough
    for DP-SGD to train well on little data (tanh keeps activations bounded under clipping)."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, classes),
    )


def build(name: str, channels: int, classes: int, image_size: int) -> tuple[nn.Module, str]:
    """(model, a note on what was done to it) for ``name``: "cnn" or a timm model name."""
    if name == "cnn":
        return small_cnn(channels, classes), ""
    try:
        import timm
    except ImportError:
        raise UsageError(f"--model {name}: timm models need timm (pip install timm)") from None
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UsageError(f"--model {name}: not 'cnn' and not a timm model name{hint}")
    kwargs = dict(pretrained=False, num_classes=classes, in_chans=channels)
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # the architecture has no img_size argument
        model = timm.create_model(name, **kwargs)
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm:
        return fix(model), "its BatchNorm layers were replaced by GroupNorm (dpf.fix)"
    return model, ""

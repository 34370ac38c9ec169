"""``dpf.fix(model)``: replaces every BatchNorm with a GroupNorm, which DP-SGD can clip.

BatchNorm normalises with statistics of the whole batch, so one example's output (and gradient)
depends on the others: there is no per-example gradient to clip. GroupNorm normalises each
example on its own. A BatchNorm2d/3d over C channels becomes GroupNorm(G, C) with G the largest
divisor of C that is at most 32 (32 groups, as in Wu & He 2018, where C allows) and leaves at
least two channels per group (one channel alone would have nothing to normalise against on
1x1 maps, as in squeeze-excite blocks); a BatchNorm1d, whose input is often (B, C) features,
becomes GroupNorm(1, C): a LayerNorm over the features (over features and positions for
(B, C, L)). The same eps and affine setting are kept; timm's BatchNormAct2d keeps its
activation and dropout. The new layers start from the identity affine map: BatchNorm's learned
scale and shift do not carry over to a different normalisation.
"""

from __future__ import annotations

from torch import nn


def _groups(module: nn.modules.batchnorm._BatchNorm, max_groups: int = 32) -> int:
    """1 for a BatchNorm1d; else the largest divisor of C <= 32 with >= 2 channels a group."""
    channels = module.num_features
    if isinstance(module, (nn.BatchNorm1d, nn.LazyBatchNorm1d)) or channels < 2:
        return 1
    return max(g for g in range(1, min(max_groups, channels // 2) + 1) if channels % g == 0)


def _replacement(module: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"{type(module).__name__} does not know its number of channels yet: run one forward "
            "pass through the model before dpf.fix(model)"
        )
    channels = module.num_features
    norm = nn.GroupNorm(_groups(module), channels, eps=module.eps, affine=module.affine)
    if module.affine and module.weight is not None:
        norm.weight.requires_grad_(module.weight.requires_grad)
        norm.bias.requires_grad_(module.bias.requires_grad)
    like = next(iter(module.parameters()), module.running_mean)
    if like is not None:
        norm = norm.to(device=like.device, dtype=like.dtype)
    extra = [getattr(module, name, None) for name in ("drop", "act")]  # timm BatchNormAct2d
    extra = [m for m in extra if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(norm, *extra) if extra else norm


def fix(model: nn.Module) -> nn.Module:
    """Replaces, in place, every BatchNorm (1d/2d/3d, SyncBatchNorm, lazy, timm's BatchNormAct2d)
    in ``model`` by a GroupNorm, and returns the model; a BatchNorm root is returned replaced."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _replacement(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _replacement(child))
        else:
            fix(child)
    return model


__all__ = ["fix"]

"""Parameters that a container module adds to every example by broadcasting, such as a ViT's
``cls_token`` (1, 1, d), ``pos_embed`` (1, T, d) and ``reg_token`` (1, R, d).

During the container's forward each such parameter p of shape (1, *rest) is replaced by a leaf
tensor P of shape (B, *rest) holding B copies of it. Broadcasting or ``expand(B, ...)`` then
uses copy b for example b only, so after the backward ``P.grad[b]`` is example b's gradient of
p: exact, and as cheap as one activation-sized tensor. Only classes registered here get this
treatment (a forward that indexed ``p[0]`` would silently break it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import Rule, register_rule


class BroadcastParameterRule(Rule):
    """Rule for a container's own parameters with a leading dimension of 1 (see module doc)."""

    capture = "parameters"

    def check(self, module: nn.Module) -> None:
        """Raises if the module's configuration would not broadcast its parameters per example."""
        for name, p in self.parameters(module).items():
            if p.dim() == 0 or p.shape[0] != 1:
                raise NotImplementedError(
                    f"{type(module).__name__}.{name} has shape {tuple(p.shape)}; only "
                    "parameters with a leading dimension of 1 are expanded per example"
                )

    def expand(self, module: nn.Module, batch: int) -> dict[str, Tensor]:
        """Per-example leaves (B, *rest) standing in for the parameters during one forward."""
        return {
            name: p.detach().expand(batch, *p.shape[1:]).clone().requires_grad_(True)
            for name, p in self.parameters(module).items()
        }

    def reset(self, leaves: dict[str, Tensor]) -> None:
        """Drops the leaves' gradients (between ghost clipping's two passes)."""
        for leaf in leaves.values():
            leaf.grad = None

    def per_example_grads(self, module, leaves: dict[str, Tensor], g=None):
        out = {}
        for name, leaf in leaves.items():
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            out[name] = grad.unsqueeze(1)  # (B, 1, *rest): example b's gradient of (1, *rest)
        return out

    def plan(self, module, x, out, clipping):
        batch = x.shape[0]
        return "per-example copies", sum(p.numel() for p in self.parameters(module).values()) * (
            1 if batch else 0
        )


try:
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # timm is optional
    VisionTransformer = None

if VisionTransformer is not None:

    @register_rule(VisionTransformer)
    class VisionTransformerRule(BroadcastParameterRule):
        """timm ViT: cls_token, reg_token and pos_embed are broadcast over the batch."""

        def check(self, module):
            super().check(module)
            if module.dynamic_img_size:
                raise NotImplementedError(
                    "VisionTransformer(dynamic_img_size=True) resamples pos_embed per batch; "
                    "per-example capture of it is not supported yet: use a fixed image size"
                )

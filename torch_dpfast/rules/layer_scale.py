"""timm LayerScale: y = x * gamma over the last dim; example i's gradient of gamma is
sum_t g_it * x_it over all positions."""

from __future__ import annotations

from ._registry import Rule, register_rule

try:
    from timm.layers import LayerScale
except ImportError:  # timm is optional
    LayerScale = None

if LayerScale is not None:

    @register_rule(LayerScale)
    class LayerScaleRule(Rule):
        def per_example_grads(self, module, x, g):
            if module.inplace:
                raise NotImplementedError(
                    "LayerScale(inplace=True) overwrites its input, which per-example clipping "
                    "needs; build the model with inplace=False"
                )
            if not module.gamma.requires_grad:
                return {}
            product = g * x
            dims = tuple(range(1, x.dim() - 1))
            return {"gamma": product.sum(dim=dims) if dims else product}

"""timm's weight-standardised convolutions (StdConv2d, StdConv2dSame, ScaledStdConv2d,
ScaledStdConv2dSame), exactly and without materialising per-example gradients.

Each output row r of the weight (n = C_in/groups * prod(kernel) entries) is standardised,
w_hat_r = (w_r - mean(w_r)) / sigma_r with sigma_r = sqrt(var(w_r) + eps), and the conv uses
s_r w_hat_r (s_r = gain_r * gamma / sqrt(n) for the scaled variants, 1 otherwise). With G_ir the
per-example gradient of the effective weight row (the plain conv rule), the Jacobian of the
standardisation maps it to

    grad_w_ir = (s_r / sigma_r) (G_ir - mean(G_ir) 1 - w_hat_r <w_hat_r, G_ir> / n),

an orthogonal-style projection, so with H_ir = s_r G_ir / sigma_r

    ||grad_w_ir||^2 = ||H_ir||^2 - (sum H_ir)^2 / n - <w_hat_r, H_ir>^2 (2/n - ||w_hat_r||^2/n^2).

||H_ir||^2 summed over r is the ghost/direct norm of the conv with g scaled per channel by
s_r / sigma_r; sum(H_ir) comes from a cheap convolution of x with an all-ones kernel, and
<w_hat_r, G_ir> = sum_t g_irt (x_i * w_hat_r)_t from the layer's own output (x * s w_hat +
bias), reduced in the layer's backward while the forward's output is still there
(``kept_output``: a (B, C_out) tensor is kept, not the output), or where that is not known
from a convolution of x with w_hat. The Jacobian does not depend on the example, so the
clipped sum is the Jacobian applied once to the ordinary book-keeping clipped sum. The gain's
per-example gradient is gamma/sqrt(n) <w_hat_r, G_ir>. Materialised (``auto`` on CPU), the
conv's per-example gradients G_i go through the Jacobian row by row in place (one compiled
pass per row on CPU, csrc/cpu/std_conv.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, ops
from ._affine import product_sum
from ._registry import (
    Rule,
    bound_dtype,
    input_and_output,
    per_clip,
    register_rule,
    row_norms,
    scaled_sum,
    zero_norms,
)
from .conv import ConvRule, _conv_args, _spatial_sum, patch_norms, weight_grads

try:
    from timm.layers import std_conv
    from timm.layers.padding import pad_same
except ImportError:  # timm is optional
    std_conv = None


def _standardised(module) -> tuple[Tensor, Tensor, Tensor]:
    """(w_hat (C_out, n), sigma (C_out,), s (C_out,)) of the module's current weight, computed
    once per clip (rules.per_clip); callers must not change them in place."""
    return per_clip(module, "standardised", lambda: _standardise(module))


def _standardise(module) -> tuple[Tensor, Tensor, Tensor]:
    w = module.weight.detach().reshape(module.out_channels, -1)
    centred = w - w.mean(dim=1, keepdim=True)
    # the biased variance as a norm of the centred rows (Tensor.var is 10x slower on CPU)
    var = torch.linalg.vector_norm(centred, dim=1).square() / w.shape[1]
    sigma = (var + module.eps).sqrt()
    w_hat = centred.div_(sigma[:, None])
    s = _scales(module)
    return w_hat, sigma, torch.ones_like(sigma) if s is None else s


def _scales(module) -> Tensor | None:
    """s (C_out,) = gain * gamma / sqrt(n) of the scaled variants; None (all ones) otherwise."""
    if not hasattr(module, "gain"):
        return None
    return (module.gain.detach() * module.scale).reshape(-1)


def _padded(module, x: Tensor) -> Tensor:
    if getattr(module, "same_pad", False):
        return pad_same(x, module.kernel_size, module.stride, module.dilation)
    return x


def _conv(module, x: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def _row_terms(module, x: Tensor, g: Tensor, w_hat: Tensor, projections: Tensor | None):
    """Per example and output row: sum_k G_irk and <w_hat_r, G_ir> (both (B, C_out)), the
    second kept from the layer's backward (``projections``, :func:`_output_projections`) or
    computed as sum_t g_irt (x_i * w_hat_r)_t, a convolution of x with w_hat."""
    groups, c_in = module.groups, module.in_channels
    ones = torch.ones(groups, c_in // groups, *module.kernel_size, dtype=x.dtype, device=x.device)
    patch_sums = _conv(module, x, ones)  # (B, groups, *S_out)
    per_channel = patch_sums.repeat_interleave(module.out_channels // groups, dim=1)
    dims = tuple(range(2, g.dim()))
    if projections is None or projections.shape != g.shape[:2]:
        projected = _conv(module, x, w_hat.reshape(module.weight.shape).to(x.dtype))
        projections = product_sum(g, projected, dims)
    return product_sum(g, per_channel, dims), projections


def _output_projections(module, out: Tensor, g: Tensor) -> Tensor | None:
    """(B, C_out) <w_hat_r, G_ir> = sum_t g_irt (x_i * w_hat_r)_t from the layer's output
    out = x * s w_hat + bias (the forward's convolution), as (sum_t g_irt (out - bias)_irt) / s_r;
    None where the output cannot give it (an s_r of 0, another dtype than g's, or a 16-bit one:
    autocast's convolution output is coarser than the float32 convolution of x)."""
    if out.shape != g.shape or out.dtype != g.dtype:
        return None
    if out.dtype not in (torch.float32, torch.float64):
        return None
    scale = _scales(module)
    if scale is not None and not bool((scale != 0).all()):
        return None
    if module.bias is not None:
        shape = (1, -1) + (1,) * (g.dim() - 2)
        out = out - module.bias.detach().to(out.dtype).reshape(shape)
    projections = product_sum(g, out, tuple(range(2, g.dim())))
    return projections if scale is None else projections / scale.to(g.dtype)


def _apply_jacobian_(grad: Tensor, w_hat: Tensor, sigma: Tensor, s: Tensor) -> Tensor:
    """(..., C_out, n) effective-weight gradients G -> raw-weight gradients
    (s_r / sigma_r) (G_r - mean(G_r) - w_hat_r <w_hat_r, G_r> / n), row by row, in place on
    ``grad`` (scaling these rows is cheaper than scaling the output gradient: n < positions for
    most layers). On CPU one compiled pass per row (csrc/cpu/std_conv.cpp) where built."""
    factor = s / sigma
    compiled = grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64)
    if compiled and grad.is_contiguous() and _ext.has_kernel("std_conv_project_", "CPU"):
        rows = grad.view(-1, *w_hat.shape)
        torch.ops.dpfast_C.std_conv_project_(rows, w_hat.contiguous(), factor.contiguous())
        return grad
    return _apply_jacobian_reference_(grad, w_hat, factor)


def _apply_jacobian_reference_(grad: Tensor, w_hat: Tensor, factor: Tensor) -> Tensor:
    """:func:`_apply_jacobian_` by PyTorch ops, factor = s / sigma."""
    dots = (grad * w_hat).sum(dim=-1, keepdim=True).div_(w_hat.shape[1])
    grad.sub_(grad.mean(dim=-1, keepdim=True)).addcmul_(w_hat, dots, value=-1)
    return grad.mul_(factor[:, None])


if std_conv is not None:

    @register_rule(
        std_conv.StdConv2d,
        std_conv.StdConv2dSame,
        std_conv.ScaledStdConv2d,
        std_conv.ScaledStdConv2dSame,
    )
    class StdConvRule(Rule):
        def kept_output(self, module, x, out, g):
            """The output's <w_hat_r, G_ir> (B, C_out), for _row_terms."""
            return _output_projections(module, out, g)

        def per_example_grads(self, module, x, g, out=None):
            """The conv rule's per-example gradients of the effective weight (into the weight's
            buffer when ``out`` gives one), mapped in place through the standardisation's
            Jacobian."""
            out = {} if out is None else out
            x = _padded(module, input_and_output(x)[0])
            grads = {}
            flat = weight_grads(module, x, g, out.get("weight"))
            flat = flat.view(x.shape[0], module.out_channels, -1)
            # once per clip anyway: not kept for the clip (a materialised layer's only use)
            w_hat, sigma, s = (t.to(flat.dtype) for t in _standardise(module))
            if hasattr(module, "gain") and module.gain.requires_grad:
                gain = module.scale * torch.einsum("bon,on->bo", flat, w_hat)
                grads["gain"] = gain.reshape(x.shape[0], *module.gain.shape)
            if module.weight.requires_grad:
                _apply_jacobian_(flat, w_hat, sigma, s)
                grads["weight"] = flat.view(x.shape[0], *module.weight.shape)
            if module.bias is not None and module.bias.requires_grad:
                grads["bias"] = _spatial_sum(g, out.get("bias"))
            return grads

        def materialise_saving(self, module, x, g):
            saving = ConvRule().materialise_saving(module, input_and_output(x)[0], g)
            if saving is None or not hasattr(module, "gain") or not module.gain.requires_grad:
                return saving
            return saving[0], saving[1] + module.gain.numel()

        def norm_sq(self, module, x, g, method="auto"):
            x, projections = input_and_output(x)
            x = _padded(module, x)
            w_hat, sigma, s = _standardised(module)
            total = zero_norms(g)
            # of G_ir (effective weight)
            row_sum, row_proj = _row_terms(module, x, g, w_hat, projections)
            row_sum, row_proj = row_sum.to(total.dtype), row_proj.to(total.dtype)
            if module.weight.requires_grad:
                n = w_hat.shape[1]
                factor = (s / sigma).to(total.dtype)
                shape = (1, -1) + (1,) * (g.dim() - 2)
                xx, kwargs = _conv_args(module, x)
                h_norm = ops.conv_norm_sq(
                    xx, g * factor.to(g.dtype).reshape(shape), method=method, **kwargs
                )
                w_sq = w_hat.to(total.dtype).square().sum(dim=1)
                proj = row_proj * factor
                total = (
                    total
                    + h_norm
                    - ((row_sum * factor) ** 2).sum(dim=1) / n
                    - (proj**2 * (2 / n - w_sq / n**2)).sum(dim=1)
                )
            if module.bias is not None and module.bias.requires_grad:
                total = total + _spatial_sum(g.to(total.dtype)).square().sum(dim=1)
            if hasattr(module, "gain") and module.gain.requires_grad:
                total = total + (module.scale * row_proj).square().sum(dim=1)
            return total

        def norm_bound(self, module, x, g):
            """Per output row r, ||G_ir|| <= U_ir = sum_t |g_itr| ||patch_it||; the Jacobian has
            norm <= |s_r| / sigma_r (a projection scaled by it) and |<w_hat_r, G_ir>| <=
            sqrt(n) U_ir, since ||w_hat_r||^2 <= n."""
            x = _padded(module, input_and_output(x)[0])
            xx, kwargs = _conv_args(module, x)
            dtype = bound_dtype(g)
            patches = patch_norms(xx, kwargs).to(dtype)
            rows = torch.einsum("bot,bt->bo", g.flatten(2).abs().to(dtype), patches)
            rows = rows.to(torch.float64)
            w_hat, sigma, s = _standardised(module)
            factor = rows.new_zeros(module.out_channels)
            if module.weight.requires_grad:
                factor = factor + (s.to(rows.dtype) / sigma.to(rows.dtype)).square()
            if hasattr(module, "gain") and module.gain.requires_grad:
                factor = factor + float(module.scale) ** 2 * w_hat.shape[1]
            total = (rows.square() * factor).sum(dim=1)
            if module.bias is not None and module.bias.requires_grad:
                total = total + row_norms(g.flatten(2), dim=1).sum(dim=1).square()
            return total.sqrt()

        def clipped_sums(self, module, x, g, scale):
            x = _padded(module, input_and_output(x)[0])
            w_hat, sigma, s = _standardised(module)
            xx, kwargs = _conv_args(module, x)
            out = {}
            if module.weight.requires_grad or hasattr(module, "gain"):
                effective = ops.conv_clipped_sum(xx, g, scale, **kwargs)
                flat = effective.reshape(module.out_channels, -1).to(w_hat.dtype)
            if hasattr(module, "gain") and module.gain.requires_grad:
                gain = module.scale * (flat * w_hat).sum(dim=-1)
                out["gain"] = gain.reshape(module.gain.shape).to(module.gain.dtype)
            if module.weight.requires_grad:
                grad = _apply_jacobian_(flat, w_hat, sigma, s)
                out["weight"] = grad.reshape(module.weight.shape).to(module.weight.dtype)
            if module.bias is not None and module.bias.requires_grad:
                out["bias"] = scaled_sum(_spatial_sum(g), scale).to(module.bias.dtype)
            return out

        def plan(self, module, x, out, clipping):
            return ConvRule().plan(module, input_and_output(x)[0], out, clipping)

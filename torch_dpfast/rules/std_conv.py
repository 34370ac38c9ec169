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
s_r / sigma_r; sum(H_ir) and <w_hat_r, H_ir> come from two cheap convolutions of x (with an
all-ones kernel, and with w_hat). The Jacobian does not depend on the example, so the clipped
sum is the Jacobian applied once to the ordinary book-keeping clipped sum. The gain's
per-example gradient is gamma/sqrt(n) <w_hat_r, G_ir>.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._registry import Rule, bound_dtype, register_rule, row_norms, scaled_sum, zero_norms
from .conv import ConvRule, _conv_args, _spatial_sum, patch_norms, weight_grads

try:
    from timm.layers import std_conv
    from timm.layers.padding import pad_same
except ImportError:  # timm is optional
    std_conv = None


def _standardised(module) -> tuple[Tensor, Tensor, Tensor]:
    """(w_hat (C_out, n), sigma (C_out,), s (C_out,)) of the module's current weight."""
    w = module.weight.detach().reshape(module.out_channels, -1)
    centred = w - w.mean(dim=1, keepdim=True)
    # the biased variance as a norm of the centred rows (Tensor.var is 10x slower on CPU)
    var = torch.linalg.vector_norm(centred, dim=1).square() / w.shape[1]
    sigma = (var + module.eps).sqrt()
    w_hat = centred.div_(sigma[:, None])
    if hasattr(module, "gain"):
        s = (module.gain.detach() * module.scale).reshape(-1)
    else:
        s = torch.ones_like(sigma)
    return w_hat, sigma, s


def _padded(module, x: Tensor) -> Tensor:
    if getattr(module, "same_pad", False):
        return pad_same(x, module.kernel_size, module.stride, module.dilation)
    return x


def _conv(module, x: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def _row_terms(module, x: Tensor, g: Tensor, w_hat: Tensor):
    """Per example and output row: sum_k G_irk and <w_hat_r, G_ir> (both (B, C_out))."""
    groups, c_in = module.groups, module.in_channels
    ones = torch.ones(groups, c_in // groups, *module.kernel_size, dtype=x.dtype, device=x.device)
    patch_sums = _conv(module, x, ones)  # (B, groups, *S_out)
    per_channel = patch_sums.repeat_interleave(module.out_channels // groups, dim=1)
    projected = _conv(module, x, w_hat.reshape(module.weight.shape).to(x.dtype))
    dims = tuple(range(2, g.dim()))
    return (g * per_channel).sum(dim=dims), (g * projected).sum(dim=dims)


def _apply_jacobian_(grad: Tensor, w_hat, sigma, s) -> Tensor:
    """(..., C_out, n) effective-weight gradients -> raw-weight gradients, row by row, in place
    on ``grad``."""
    return _scaled(_project_(grad.div_(sigma[:, None]), w_hat), s)


def _project_(h: Tensor, w_hat: Tensor) -> Tensor:
    """h - mean(h) - w_hat <w_hat, h> / n per row of h (..., C_out, n), in place."""
    dots = (h * w_hat).sum(dim=-1, keepdim=True).div_(w_hat.shape[1])
    return h.sub_(h.mean(dim=-1, keepdim=True)).addcmul_(w_hat, dots, value=-1)


def _scaled(h: Tensor, s: Tensor) -> Tensor:
    """h (..., C_out, n) times s_r per row, in place (skipped when s is all ones)."""
    return h if bool((s == 1).all()) else h.mul_(s[:, None])


if std_conv is not None:

    @register_rule(
        std_conv.StdConv2d,
        std_conv.StdConv2dSame,
        std_conv.ScaledStdConv2d,
        std_conv.ScaledStdConv2dSame,
    )
    class StdConvRule(Rule):
        def per_example_grads(self, module, x, g, out=None):
            """The conv rule's per-example gradients of the effective weight (into the weight's
            buffer when ``out`` gives one), mapped in place through the standardisation's
            Jacobian."""
            out = {} if out is None else out
            x = _padded(module, x)
            w_hat, sigma, s = _standardised(module)
            grads = {}
            # g / sigma_r per output channel: the conv's per-example gradients are then
            # G_ir / sigma_r, a smaller pass than scaling them
            shape = (1, -1) + (1,) * (g.dim() - 2)
            scaled_g = g / sigma.to(g.dtype).reshape(shape)
            flat = weight_grads(module, x, scaled_g, out.get("weight"))
            flat = flat.view(x.shape[0], module.out_channels, -1)
            w_hat, sigma, s = (t.to(flat.dtype) for t in (w_hat, sigma, s))
            if hasattr(module, "gain") and module.gain.requires_grad:
                gain = module.scale * (flat * w_hat).sum(dim=-1) * sigma
                grads["gain"] = gain.reshape(x.shape[0], *module.gain.shape)
            if module.weight.requires_grad:
                _scaled(_project_(flat, w_hat), s)
                grads["weight"] = flat.view(x.shape[0], *module.weight.shape)
            if module.bias is not None and module.bias.requires_grad:
                grads["bias"] = _spatial_sum(g, out.get("bias"))
            return grads

        def materialise_saving(self, module, x, g):
            saving = ConvRule().materialise_saving(module, x, g)
            if saving is None or not hasattr(module, "gain") or not module.gain.requires_grad:
                return saving
            return saving[0], saving[1] + module.gain.numel()

        def norm_sq(self, module, x, g, method="auto"):
            x = _padded(module, x)
            w_hat, sigma, s = _standardised(module)
            total = zero_norms(g)
            row_sum, row_proj = _row_terms(module, x, g, w_hat)  # of G_ir (effective weight)
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
            x = _padded(module, x)
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
            x = _padded(module, x)
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
            return ConvRule().plan(module, x, out, clipping)

"""Independent references: per-example weight gradients by plain autograd, one example at a
time, in float64. G_i = d/dW <layer(input_i; W), g_i>, the gradient the layer's weight receives
from example i when g_i is the gradient of its output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_example(forward, weight_shape, inputs, grads) -> torch.Tensor:
    """(B, *weight_shape): autograd of <forward(input_i, W), g_i> w.r.t. W for each example."""
    out = []
    for x_i, g_i in zip(inputs, grads):
        w = torch.zeros(weight_shape, dtype=torch.float64, requires_grad=True)
        (forward(x_i, w) * g_i.to(torch.float64)).sum().backward()
        out.append(w.grad)
    return torch.stack(out) if out else torch.zeros(0, *weight_shape, dtype=torch.float64)


def linear_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a (B, *, d_in), g (B, *, d_out) -> (B, d_out, d_in)."""
    a, g = a.cpu().to(torch.float64), g.cpu()
    return _per_example(F.linear, (g.shape[-1], a.shape[-1]), a, g)


def conv_grads(x, g, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """x (B, C_in, *S), g (B, C_out, *S_out) -> (B, C_out, C_in/groups, *kernel)."""
    n = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    kernel = (kernel_size,) * n if isinstance(kernel_size, int) else tuple(kernel_size)
    shape = (g.shape[1], x.shape[1] // groups, *kernel)

    def forward(x_i, w):
        return conv(x_i[None], w, None, stride, padding, dilation, groups)[0]

    return _per_example(forward, shape, x.cpu().to(torch.float64), g.cpu())


def embedding_grads(ids, g, num_embeddings, padding_idx=None) -> torch.Tensor:
    """ids (B, *), g (B, *, d) -> (B, num_embeddings, d)."""

    def forward(ids_i, w):
        return F.embedding(ids_i, w, padding_idx=padding_idx)

    return _per_example(forward, (num_embeddings, g.shape[-1]), ids.cpu(), g.cpu())


def norms_sq(per_example: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) squared Frobenius norms."""
    return per_example.flatten(1).square().sum(dim=1)


def clipped_sum(per_example: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_i scale_i G_i, leaving out examples with scale 0."""
    keep = scale.cpu() != 0
    return torch.einsum("b,b...->...", scale.cpu().to(torch.float64)[keep], per_example[keep])

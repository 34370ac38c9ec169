"""Triton book-keeping clipped sum: sum_i scale_i g_i^T a_i as one GEMM over all B*T rows, the
per-example scale applied while g is loaded, per conv group.

Rows of examples with scale 0 are masked out of both loads, so their values (even NaN or Inf)
never enter the product. Large row counts are split across programs (split-K) whose partial
(d_g x d_a) results torch sums, so the output's few tiles still fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._backend import never
from ..conv import _grouped
from ._common import configs, dot, precision_code, unsupported

_CONFIGS = configs(
    [
        triton.Config({"BLOCK_R": 32, "BLOCK_G": 64, "BLOCK_A": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 32, "BLOCK_G": 128, "BLOCK_A": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_G": 128, "BLOCK_A": 64}, num_warps=4, num_stages=4),
    ]
)


@triton.autotune(configs=_CONFIGS, key=["R", "DA", "DG", "SPLIT", "PRECISION"])
@triton.jit
def _clipped_sum_kernel(
    a_ptr,
    g_ptr,
    scale_ptr,
    out_ptr,
    R,
    T,
    DA,
    DG,
    rows_per_split,
    s_ab,
    s_at,
    s_ag,
    s_ad,
    s_gb,
    s_gt,
    s_gg,
    s_gd,
    s_os,
    s_og,
    s_oo,
    s_oa,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    """Tile (d_g-tile, d_a-tile) of group ``program_id(1)``, over rows of split ``program_id(2)``:
    acc = sum_r scale_b(r) g_r^T a_r with r = b * T + t."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    n_tiles_a = tl.cdiv(DA, BLOCK_A)
    cols_g = (pid // n_tiles_a) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols_a = (pid % n_tiles_a) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_g = cols_g < DG
    in_a = cols_a < DA
    r_begin = split * rows_per_split
    r_end = tl.minimum(R, r_begin + rows_per_split)
    acc = tl.zeros((BLOCK_G, BLOCK_A), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        b = rows // T
        t = rows % T
        s = tl.load(scale_ptr + b, mask=rows < r_end, other=0.0).to(tl.float32)
        keep = (rows < r_end) & (s != 0.0)
        g_t = tl.load(
            g_ptr + b[None, :] * s_gb + t[None, :] * s_gt + group * s_gg + cols_g[:, None] * s_gd,
            mask=in_g[:, None] & keep[None, :],
            other=0.0,
        )
        a_t = tl.load(
            a_ptr + b[:, None] * s_ab + t[:, None] * s_at + group * s_ag + cols_a[None, :] * s_ad,
            mask=keep[:, None] & in_a[None, :],
            other=0.0,
        )
        acc = dot(g_t.to(tl.float32) * s[None, :], a_t, acc, PRECISION)
    tl.store(
        out_ptr + split * s_os + group * s_og + cols_g[:, None] * s_oo + cols_a[None, :] * s_oa,
        acc,
        mask=in_g[:, None] & in_a[None, :],
    )


def _num_splits(rows: int, tiles: int, device: torch.device) -> int:
    """Split the rows when the output has fewer tiles than the GPU has multiprocessors."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms // max(tiles, 1), rows // 512, 16))


def clipped_sum(
    a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, splits: int | None = None
) -> torch.Tensor:
    """(G, d_g, d_a) float32 sum_i scale_i g_i^T a_i per group; a (B, T, G, d_a),
    g (B, T, G, d_g), scale (B,); the rows are cut into ``splits`` parts (default: enough to
    fill the GPU)."""
    batch, t, groups, d_a = a.shape
    d_g = g.shape[3]
    rows = batch * t
    if splits is None:
        tiles = triton.cdiv(d_a, 128) * triton.cdiv(d_g, 128) * groups
        splits = _num_splits(rows, tiles, a.device)
    partial = torch.zeros(splits, groups, d_g, d_a, dtype=torch.float32, device=a.device)
    if rows == 0:
        return partial.sum(dim=0)
    rows_per_split = triton.cdiv(rows, splits)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(d_a, meta["BLOCK_A"]) * triton.cdiv(d_g, meta["BLOCK_G"]),
        groups,
        splits,
    )
    _clipped_sum_kernel[grid](
        a,
        g,
        scale.contiguous(),
        partial,
        rows,
        t,
        d_a,
        d_g,
        rows_per_split,
        *a.stride(),
        *g.stride(),
        *partial.stride(),
        SPLIT=splits,
        PRECISION=precision_code(),
    )
    return partial.sum(dim=0) if splits > 1 else partial[0]


@_backend.register(
    "linear_clipped_sum",
    "triton",
    prefer=never,
    unsupported=lambda a, g, scale: unsupported(a, g),
)
def linear_clipped_sum_triton(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor):
    """a (B, T, d_in), g (B, T, d_out), scale (B,) -> (d_out, d_in) in a's dtype."""
    return clipped_sum(a[:, :, None, :], g[:, :, None, :], scale)[0].to(a.dtype)


@_backend.register(
    "conv_clipped_sum",
    "triton",
    prefer=never,
    unsupported=lambda x, g, scale, geometry, groups: unsupported(x, g),
)
def conv_clipped_sum_triton(x, g, scale, geometry, groups: int) -> torch.Tensor:
    """Per group on unfolded patches; laid out as the weight (C_out, C_in/G, *kernel)."""
    a4, g4 = _grouped(x, g, geometry, groups)
    summed = clipped_sum(a4, g4, scale)
    return summed.reshape(-1, x.shape[1] // groups, *geometry[0]).to(x.dtype)

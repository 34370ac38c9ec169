"""Triton kernels for per-example squared gradient norms: ghost (linear, conv, embedding) and
direct (linear, conv).

Layout: the launchers take a (B, T, G, d_a) and g (B, T, G, d_g) with any strides; G is the
number of conv groups (1 for linear layers). Each (example, group) pair is one "example" of the
kernels, whose per-tile partial sums land in a buffer that torch sums afterwards (deterministic,
no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...precision import get_precision
from .. import _backend
from .._backend import never
from ..conv import _grouped
from ..embedding import _valid_rows
from ._common import configs, dot, precision_code, unsupported

MIN_BLOCK_T = 16  # smallest BLOCK_T among the configs: sizes the partial-sum buffer


@triton.jit
def _tile_product(
    x_base,
    x_idx,
    in_x,
    s_x,
    s_xr,
    y_base,
    y_idx,
    in_y,
    s_y,
    s_yr,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) tile sum_r X[m, r] Y[r, n], accumulated on chip over R in steps of
    BLOCK_R; element (m, r) of X sits at x_base + x_idx[m] * s_x + r * s_xr (likewise Y)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        red = r0 + tl.arange(0, BLOCK_R)
        in_r = red < R
        x = tl.load(
            x_base + x_idx[:, None] * s_x + red[None, :] * s_xr,
            mask=in_x[:, None] & in_r[None, :],
            other=0.0,
        )
        y = tl.load(
            y_base + red[:, None] * s_yr + y_idx[None, :] * s_y,
            mask=in_r[:, None] & in_y[None, :],
            other=0.0,
        )
        acc = dot(x, y, acc, PRECISION)
    return acc


_GHOST_CONFIGS = configs(
    [
        triton.Config({"BLOCK_T": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 16, "BLOCK_K": 32}, num_warps=2, num_stages=2),
        triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]
)


@triton.autotune(configs=_GHOST_CONFIGS, key=["T", "DA", "DG", "USE_IDS", "PRECISION"])
@triton.jit
def _ghost_norm_kernel(
    a_ptr,
    g_ptr,
    ids_ptr,
    out_ptr,
    T,
    G,
    DA,
    DG,
    n_slots,
    s_ab,
    s_at,
    s_ag,
    s_ad,
    s_gb,
    s_gt,
    s_gg,
    s_gd,
    s_ib,
    s_it,
    padding_idx,
    USE_IDS: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (T-tile i, T-tile j) pair of one example: sum of (A_i A_j^T) * (G_i G_j^T), or of
    [id_s == id_t] * (G_i G_j^T) for embeddings. Tiles below the diagonal are skipped and the
    ones above it counted twice (both Grams are symmetric)."""
    pid = tl.program_id(0)
    example = tl.program_id(1)
    n_t = tl.cdiv(T, BLOCK_T)
    ti = pid // n_t
    tj = pid % n_t
    if tj < ti:
        return
    b = example // G
    group = example % G
    rows_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    in_i = rows_i < T
    in_j = rows_j < T
    base = g_ptr + b * s_gb + group * s_gg  # Gram tile x_i x_j^T of the rows of a (T x d) matrix
    gram_g = _tile_product(
        base,
        rows_i,
        in_i,
        s_gt,
        s_gd,
        base,
        rows_j,
        in_j,
        s_gt,
        s_gd,
        DG,
        BLOCK_T,
        BLOCK_T,
        BLOCK_K,
        PRECISION,
    )
    if USE_IDS:
        ids_i = tl.load(ids_ptr + b * s_ib + rows_i * s_it, mask=in_i, other=-1)
        ids_j = tl.load(ids_ptr + b * s_ib + rows_j * s_it, mask=in_j, other=-2)
        same = ids_i[:, None] == ids_j[None, :]
        if HAS_PADDING:
            same = same & (ids_i[:, None] != padding_idx)
        product = tl.where(same, gram_g, 0.0)
    else:
        base = (
            a_ptr + b * s_ab + group * s_ag
        )  # Gram tile x_i x_j^T of the rows of a (T x d) matrix
        gram_a = _tile_product(
            base,
            rows_i,
            in_i,
            s_at,
            s_ad,
            base,
            rows_j,
            in_j,
            s_at,
            s_ad,
            DA,
            BLOCK_T,
            BLOCK_T,
            BLOCK_K,
            PRECISION,
        )
        product = gram_a * gram_g
    total = tl.sum(tl.sum(product, axis=1), axis=0)
    total = tl.where(ti == tj, total, 2.0 * total)
    tl.store(out_ptr + example * n_slots + pid, total)


_DIRECT_CONFIGS = configs(
    [
        triton.Config({"BLOCK_T": 32, "BLOCK_A": 64, "BLOCK_G": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32, "BLOCK_A": 128, "BLOCK_G": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 16, "BLOCK_A": 64, "BLOCK_G": 32}, num_warps=4, num_stages=2),
    ]
)


@triton.autotune(configs=_DIRECT_CONFIGS, key=["T", "DA", "DG", "PRECISION"])
@triton.jit
def _direct_norm_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    T,
    G,
    DA,
    DG,
    n_slots,
    s_ab,
    s_at,
    s_ag,
    s_ad,
    s_gb,
    s_gt,
    s_gg,
    s_gd,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One (d_g-tile, d_a-tile) block of one example's gradient g^T a, computed over T on chip;
    only its sum of squares is written."""
    pid = tl.program_id(0)
    example = tl.program_id(1)
    n_tiles_a = tl.cdiv(DA, BLOCK_A)
    cols_g = (pid // n_tiles_a) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols_a = (pid % n_tiles_a) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_g = cols_g < DG
    in_a = cols_a < DA
    b = example // G
    group = example % G
    a_base = a_ptr + b * s_ab + group * s_ag
    g_base = g_ptr + b * s_gb + group * s_gg
    acc = _tile_product(  # g^T a over the T positions
        g_base,
        cols_g,
        in_g,
        s_gd,
        s_gt,
        a_base,
        cols_a,
        in_a,
        s_ad,
        s_at,
        T,
        BLOCK_G,
        BLOCK_A,
        BLOCK_T,
        PRECISION,
    )
    tl.store(out_ptr + example * n_slots + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def ghost_norm_sq(
    a: torch.Tensor | None,
    g: torch.Tensor,
    ids: torch.Tensor | None = None,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """(B,) sum over groups of <a a^T, g g^T> (or of the id-equality mask with g g^T when ``ids``
    (B, T) is given); a (B, T, G, d_a), g (B, T, G, d_g)."""
    batch, t, groups, d_g = g.shape
    out = torch.zeros(batch, dtype=torch.float32, device=g.device)
    if batch == 0 or t == 0:
        return out
    n_slots = triton.cdiv(t, MIN_BLOCK_T) ** 2
    partial = torch.zeros(batch * groups, n_slots, dtype=torch.float32, device=g.device)
    a_arg = g if a is None else a
    ids_arg = g if ids is None else ids
    ids_strides = (0, 0) if ids is None else ids.stride()
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]) ** 2, batch * groups)  # noqa: E731
    _ghost_norm_kernel[grid](
        a_arg,
        g,
        ids_arg,
        partial,
        t,
        groups,
        a_arg.shape[3],
        d_g,
        n_slots,
        *a_arg.stride(),
        *g.stride(),
        *ids_strides,
        -1 if padding_idx is None else padding_idx,
        USE_IDS=ids is not None,
        HAS_PADDING=padding_idx is not None,
        PRECISION=precision_code(),
    )
    return partial.view(batch, groups * n_slots).sum(dim=1)


def direct_norm_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) sum over groups of ||g^T a||_F^2; a (B, T, G, d_a), g (B, T, G, d_g)."""
    batch, t, groups, d_a = a.shape
    d_g = g.shape[3]
    out = torch.zeros(batch, dtype=torch.float32, device=a.device)
    if batch == 0 or t == 0:
        return out
    n_slots = triton.cdiv(d_a, 64) * triton.cdiv(d_g, 32)  # the smallest (BLOCK_A, BLOCK_G)
    partial = torch.zeros(batch * groups, n_slots, dtype=torch.float32, device=a.device)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(d_a, meta["BLOCK_A"]) * triton.cdiv(d_g, meta["BLOCK_G"]),
        batch * groups,
    )
    _direct_norm_kernel[grid](
        a,
        g,
        partial,
        t,
        groups,
        d_a,
        d_g,
        n_slots,
        *a.stride(),
        *g.stride(),
        PRECISION=precision_code(),
    )
    return partial.view(batch, groups * n_slots).sum(dim=1)


def _norm(a4: torch.Tensor, g4: torch.Tensor, method: str) -> torch.Tensor:
    return ghost_norm_sq(a4, g4) if method == "ghost" else direct_norm_sq(a4, g4)


def _prefer_linear(a: torch.Tensor, g: torch.Tensor, method: str) -> bool:
    """Where ``backend="auto"`` takes Triton: direct norms over T >= 16 positions at "ieee" or
    "bf16" precision, the cases it measured faster than the reference path (docs/ops.md)."""
    return method == "direct" and a.shape[1] >= 16 and get_precision() in ("ieee", "bf16")


@_backend.register(
    "linear_norm_sq",
    "triton",
    prefer=_prefer_linear,
    unsupported=lambda a, g, method: unsupported(a, g),
)
def linear_norm_sq_triton(a: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """a (B, T, d_in), g (B, T, d_out) -> (B,) float32."""
    return _norm(a[:, :, None, :], g[:, :, None, :], method)


@_backend.register(
    "conv_norm_sq",
    "triton",
    prefer=never,
    unsupported=lambda x, g, geometry, groups, method: unsupported(x, g),
)
def conv_norm_sq_triton(x, g, geometry, groups: int, method: str) -> torch.Tensor:
    """Unfolded patches (B, T, G, C_in/G * K) and g (B, T, G, C_out/G) through the linear
    kernels, per group."""
    a4, g4 = _grouped(x, g, geometry, groups)
    return _norm(a4, g4, method)


@_backend.register(
    "embedding_norm_sq",
    "triton",
    prefer=never,
    unsupported=lambda ids, g, num_embeddings, padding_idx: unsupported(g),
)
def embedding_norm_sq_triton(ids, g, num_embeddings: int, padding_idx) -> torch.Tensor:
    """sum_{s,t} [id_s == id_t != padding_idx] <g_s, g_t> per example; ids (B, T), g (B, T, d)."""
    _valid_rows(ids, num_embeddings, padding_idx)  # range check
    return ghost_norm_sq(None, g[:, :, None, :], ids, padding_idx)

"""dpfast_C::linear_uses_grads (csrc/cpu/linear_uses.cpp): per-example gradients d_b^T a_k,b of
linear maps sharing the output gradient d, the bias's sum_t d_b,t, and their squared norms,
against float64 einsum on fresh random inputs: odd shapes, batch-first, time-major and strided
views, float32 and float64, with and without a bias; the norms are those of the values stored."""

from __future__ import annotations

import pytest
import torch

from torch_dpfast import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("linear_uses_grads", "CPU"), reason="torch_dpfast._C is not built"
)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, T, C) with the same values: contiguous, a view of time-major memory, or a view whose
    last dim is strided (the kernel copies it)."""
    if layout == "time_major":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:2], 2 * t.shape[2], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _rand(gen, dtype, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["batch_first", "time_major", "strided"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (4, 9, 33), (2, 3, 64)])
@pytest.mark.parametrize(
    "widths,bias",
    [((), True), ((1,), False), ((17,), True), ((2, 19, 8), False), ((2, 19, 8), True)],
)
def test_gradients_and_norms_match_float64(dtype, layout, shape, widths, bias, gen):
    batch, steps, gates = shape
    d = _laid_out(_rand(gen, dtype, batch, steps, gates), layout)
    inputs = [_laid_out(_rand(gen, dtype, batch, steps, w), layout) for w in widths]
    out = [torch.full((batch, gates, w), float("nan"), dtype=dtype) for w in widths]
    bias_out = torch.full((batch, gates), float("nan"), dtype=dtype) if bias else None

    norm_sq = torch.ops.dpfast_C.linear_uses_grads(inputs, d, out, bias_out)

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    stored = []
    for a, got in zip(inputs, out):
        want = torch.einsum("btg,btk->bgk", d.double(), a.double())
        torch.testing.assert_close(got.double(), want, **tol)
        stored.append(got.double().flatten(1))
    if bias:
        torch.testing.assert_close(bias_out.double(), d.double().sum(dim=1), **tol)
        stored.append(bias_out.double())
    assert norm_sq.shape == (batch,)
    assert norm_sq.dtype == dtype
    of_stored = torch.cat(stored, dim=1).square().sum(dim=1)
    torch.testing.assert_close(
        norm_sq.double(), of_stored, rtol=1e-12 if dtype == torch.float64 else 1e-7, atol=0
    )


def test_norms_are_those_of_the_rounded_values_stored(gen):
    """Terms of 1e8 that cancel to about 1 in float32: the norm is that of what was written
    (rounding included), not of the exact product, so a clip factor from it bounds the sum."""
    d = torch.zeros(1, 2, 3)
    d[0, :, 0] = 1.0
    a = torch.zeros(1, 2, 2)
    a[0, 0, 0], a[0, 1, 0], a[0, 1, 1] = 1e8, -1e8 + 3.0, 1.0
    out = [torch.empty(1, 3, 2)]
    norm_sq = torch.ops.dpfast_C.linear_uses_grads([a], d, out, None)
    assert norm_sq.item() == pytest.approx(out[0].double().square().sum().item(), rel=1e-12)


def test_errors_name_the_problem():
    d = torch.zeros(2, 3, 4)
    a = torch.zeros(2, 3, 5)
    with pytest.raises(RuntimeError, match="at least one of them or a bias"):
        torch.ops.dpfast_C.linear_uses_grads([], d, [], None)
    with pytest.raises(RuntimeError, match=r"inputs\[0\] must be \(B, T, d\)"):
        torch.ops.dpfast_C.linear_uses_grads(
            [torch.zeros(2, 4, 5)], d, [torch.empty(2, 4, 5)], None
        )
    with pytest.raises(RuntimeError, match=r"out\[0\] must be a contiguous \(2, 4, 5\)"):
        torch.ops.dpfast_C.linear_uses_grads([a], d, [torch.empty(2, 5, 4).mT], None)
    with pytest.raises(RuntimeError, match="bias_out must be a contiguous"):
        torch.ops.dpfast_C.linear_uses_grads([a], d, [torch.empty(2, 4, 5)], torch.empty(2, 3))
    with pytest.raises(RuntimeError, match="of d's dtype"):
        torch.ops.dpfast_C.linear_uses_grads([a.double()], d, [torch.empty(2, 4, 5)], None)

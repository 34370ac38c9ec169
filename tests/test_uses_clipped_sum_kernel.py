"""dpfast_C::linear_uses_clipped_sum (csrc/cpu/linear.cpp): the clipped sums of linear maps
sharing the output gradient d on their joined input a, split into each map's columns, with the
biases' sum_i c_i sum_t d_it, against float64 einsum on fresh random inputs: batch-first,
time-major and column-view layouts, either operand the narrower one, several chunks of rows,
float32 and float64; examples of scale 0 holding NaN and Inf; errors."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import laid_out
from torch_dpfast import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("linear_uses_clipped_sum", "CPU"), reason="torch_dpfast._C is not built"
)


def _expected(a: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, widths: list[int]):
    kept = scale != 0
    a, d, scale = a[kept].double(), d[kept].double(), scale[kept].double()
    joined = torch.einsum("b,btg,btd->gd", scale, d, a)
    return list(joined.split(widths, dim=1)), torch.einsum("b,btg->g", scale, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["batch_first", "time_major", "columns"])
@pytest.mark.parametrize(
    "shape, widths",
    [
        ((1, 1, 1), [1]),
        ((3, 7, 9), [4, 5]),  # d narrower than a: d is scaled
        ((4, 5, 11), [2, 3]),  # a narrower: a is scaled, the bias by a GEMV
        ((5, 700, 3), [1, 1, 1]),  # several chunks of rows in either path
    ],
)
@pytest.mark.parametrize("zeros", [False, True])
def test_sums_match_float64_brute_force(dtype, layout, shape, widths, zeros, gen):
    batch, steps, gates = shape
    width = sum(widths)
    a = torch.randn(batch, steps, width, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(batch, steps, gates, generator=gen, dtype=torch.float64).to(dtype)
    scale = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    if zeros and batch > 1:  # the time-major path then is not taken; dropped rows never read
        scale[1] = 0
        a[1, 0, 0], d[1, -1, -1] = float("nan"), float("inf")
    for bias in (False, True):
        sums = torch.ops.dpfast_C.linear_uses_clipped_sum(
            laid_out(a, layout), laid_out(d, layout), scale, widths, bias
        )
        parts, expected_bias = _expected(a, d, scale, widths)
        assert len(sums) == len(widths) + bias
        rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-5 * steps)
        for got, expected in zip(sums, parts):
            assert got.dtype == dtype and got.is_contiguous()
            torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
        if bias:
            torch.testing.assert_close(sums[-1].double(), expected_bias, rtol=rtol, atol=atol)


def test_matches_linear_clipped_sum(gen):
    """The joined sum is the single map's (ops.linear_clipped_sum), to the last bit."""
    a = torch.randn(6, 9, 10, generator=gen)
    d = torch.randn(9, 6, 16, generator=gen).transpose(0, 1)
    scale = torch.rand(6, generator=gen)
    sums = torch.ops.dpfast_C.linear_uses_clipped_sum(a, d, scale, [4, 6], False)
    joined = torch.ops.dpfast_C.linear_clipped_sum(a, d, scale)
    assert torch.equal(torch.cat(sums, dim=1), joined)


def test_errors():
    a, d, scale = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2)
    with pytest.raises(RuntimeError, match="must add up to"):
        torch.ops.dpfast_C.linear_uses_clipped_sum(a, d, scale, [1, 2], True)
    with pytest.raises(RuntimeError, match="must be positive"):
        torch.ops.dpfast_C.linear_uses_clipped_sum(a, d, scale, [5, -1], True)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.dpfast_C.linear_uses_clipped_sum(a, d, torch.ones(3), [4], True)
    with pytest.raises(RuntimeError, match="must agree in B and T"):
        torch.ops.dpfast_C.linear_uses_clipped_sum(a, d[:, :2], scale, [4], True)

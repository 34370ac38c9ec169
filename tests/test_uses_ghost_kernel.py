"""dpfast_C::linear_uses_ghost (csrc/cpu/uses_ghost.cpp): the ghost norm of linear maps sharing
the output gradient d on their joined input a, with the biases' sum_t d_t, and certify.py's
bound of that map, against float64 einsum on fresh random inputs: T within one Gram tile, across
two and three, batch-first, time-major and column-view layouts, float32 and float64, 0-2 biases;
non-finite examples; errors."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import laid_out
from torch_dpfast import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("linear_uses_ghost", "CPU"), reason="torch_dpfast._C is not built"
)


def _expected(a: torch.Tensor, d: torch.Tensor, biases: int):
    a, d = a.double(), d.double()
    weights = torch.einsum("btg,btd->bgd", d, a).square().sum(dim=(1, 2))
    norm_sq = weights + biases * d.sum(dim=1).square().sum(dim=1)
    d_norms, a_norms = d.norm(dim=-1), a.norm(dim=-1)
    bound = ((d_norms * a_norms).sum(dim=1).square() + biases * d_norms.sum(dim=1).square()).sqrt()
    return norm_sq, bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["batch_first", "time_major", "columns"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 9), (2, 33, 19, 4), (3, 70, 6, 11)])
@pytest.mark.parametrize("biases", [0, 1, 2])
def test_norms_and_bounds_match_float64_brute_force(dtype, layout, shape, biases, gen):
    batch, steps, width, gates = shape
    a = torch.randn(batch, steps, width, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(batch, steps, gates, generator=gen, dtype=torch.float64).to(dtype)
    norm_sq, bound = torch.ops.dpfast_C.linear_uses_ghost(
        laid_out(a, layout), laid_out(d, layout), biases
    )
    expected_norm_sq, expected_bound = _expected(a, d, biases)
    assert norm_sq.dtype == dtype and bound.dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    # the ghost norm's rounding is relative to the bound (certify.py), not to the norm
    atol = 8 * rtol * expected_bound.square()
    torch.testing.assert_close(
        norm_sq.double(), expected_norm_sq, rtol=rtol, atol=atol.max().item()
    )
    torch.testing.assert_close(bound, expected_bound, rtol=rtol, atol=0.0)


def test_zero_inputs_give_zero_norms_and_bounds():
    a, d = torch.zeros(2, 5, 3), torch.zeros(2, 5, 4)
    norm_sq, bound = torch.ops.dpfast_C.linear_uses_ghost(a, d, 2)
    assert norm_sq.eq(0).all() and bound.eq(0).all()


@pytest.mark.parametrize("where", ["a", "d"])
def test_a_non_finite_example_gets_a_non_finite_norm_and_bound_the_rest_not(where, gen):
    a = torch.randn(3, 40, 6, generator=gen)
    d = torch.randn(3, 40, 8, generator=gen)
    (a if where == "a" else d)[1, 35, 2] = float("nan")
    norm_sq, bound = torch.ops.dpfast_C.linear_uses_ghost(a, d, 1)
    assert not torch.isfinite(norm_sq[1]) and not torch.isfinite(bound[1])
    assert torch.isfinite(norm_sq[[0, 2]]).all() and torch.isfinite(bound[[0, 2]]).all()


def test_bad_arguments_name_the_problem():
    a, d = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="must agree in B and T"):
        torch.ops.dpfast_C.linear_uses_ghost(a, d[:, :4], 0)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.dpfast_C.linear_uses_ghost(a, d.double(), 0)
    with pytest.raises(RuntimeError, match="biases must be >= 0"):
        torch.ops.dpfast_C.linear_uses_ghost(a, d, -1)

"""The compiled row reductions of the normalisation rules (csrc/cpu/row_dots.cpp, used through
rules/_affine.row_dots): per row sum(m g x) and sum(m g), m = not [relu_out <= 0], against a float64
loop, on odd row lengths, with non-finite values where the mask is 0; and the group-norm rules on
the compiled path and without it against per-example autograd."""

import pytest
import torch
from torch import nn

from torch_dpfast import _ext
from torch_dpfast.rules import _affine, group_norm

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("row_dots", "CPU"), reason="the compiled extension is not built"
)


def _reference(g, x, relu_out):
    """Row by row, element by element, in float64."""
    dots, sums = [], []
    for k in range(g.shape[0]):
        d = s = 0.0
        for j in range(g.shape[1]):
            if relu_out is None or not relu_out[k, j] <= 0:
                d += float(g[k, j]) * float(x[k, j])
                s += float(g[k, j])
        dots.append(d)
        sums.append(s)
    return torch.tensor(dots, dtype=torch.float64), torch.tensor(sums, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 8), (33, 9), (4, 50)])
def test_row_dots_match_a_float64_loop(rows, n, masked, dtype, gen):
    g = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64).mul(5).to(dtype)
    relu_out = torch.randn(rows, n, generator=gen).to(dtype).relu() if masked else None
    out = _affine.row_dots(g, x, relu_out, moments=True)
    want_dots, want_sums = _reference(g, x, relu_out)
    assert out.dtype == torch.float64 and out.shape == (rows, 5)
    torch.testing.assert_close(out[:, 0], want_dots, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 1], want_sums, rtol=1e-12, atol=1e-12)
    shift = x[:, :1].double()
    assert torch.equal(out[:, 2], shift[:, 0])
    centred = x.double() - shift
    torch.testing.assert_close(out[:, 3], centred.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 4], centred.square().sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_affine.row_dots(g, x, relu_out), out[:, :2])


def test_masked_elements_contribute_nothing_whatever_their_values(gen):
    """A ReLU's backward gives exactly 0 where its output is <= 0: NaN, Inf and huge g or x there
    must not reach the sums, in the vector body and in the tail; a NaN output passes its
    gradient, as autograd's threshold_backward does."""
    rows, n = 6, 21
    g = torch.randn(rows, n, generator=gen)
    x = torch.randn(rows, n, generator=gen)
    relu_out = torch.randn(rows, n, generator=gen).relu()
    relu_out[1, 5] = -0.0
    relu_out[0, 3] = float("nan")
    dead = relu_out == 0
    poison = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38])
    g[dead] = poison[torch.arange(int(dead.sum())) % 4]
    x[dead] = poison[(torch.arange(int(dead.sum())) + 1) % 4]
    dots, sums = _affine.row_dots(g, x, relu_out).unbind(-1)
    assert torch.isfinite(dots).all() and torch.isfinite(sums).all()
    kept = torch.ops.aten.threshold_backward(g.double(), relu_out.double(), 0)
    assert kept[0, 3] == g[0, 3]  # the NaN output's gradient passes
    live_x = torch.where(dead, 0.0, x.double())
    torch.testing.assert_close(dots, (kept * live_x).sum(1))
    torch.testing.assert_close(sums, kept.sum(1))


def test_row_dots_takes_leading_dims_and_declines_what_it_cannot_run(gen):
    g = torch.randn(2, 3, 10, generator=gen)
    x = torch.randn(2, 3, 10, generator=gen)
    out = _affine.row_dots(g, x)
    assert out.shape == (2, 3, 2)
    torch.testing.assert_close(out[..., 0], (g.double() * x.double()).sum(-1))
    assert _affine.row_dots(g.half(), x.half()) is None  # 16-bit: the PyTorch ops
    assert _affine.row_dots(g.requires_grad_(), x) is None  # autograd: the PyTorch ops
    assert _affine.row_dots(torch.randn(3, 4), torch.randn(3, 5)) is None
    empty = torch.empty(0, 4)
    assert _affine.row_dots(empty, empty).shape == (0, 2)


def test_product_sum_compiled_and_einsum_agree(gen, monkeypatch):
    a = torch.randn(3, 4, 5, 6, generator=gen)
    b = torch.randn(3, 4, 5, 6, generator=gen)
    compiled = _affine.product_sum(a, b, (2, 3))
    monkeypatch.setattr(_ext, "has_kernel", lambda *args: False)
    torch.testing.assert_close(compiled, _affine.product_sum(a, b, (2, 3)))
    torch.testing.assert_close(compiled, (a * b).sum(dim=(2, 3)))
    assert compiled.dtype == a.dtype


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_grads_match_per_example_autograd(relu, compiled, gen, monkeypatch):
    """group_norm_grads (with a ReLU's output as the mask, as timm's GroupNormAct) against
    autograd one example at a time, float64, with a large mean per group (the statistics and
    the products must not cancel)."""
    if not compiled:
        monkeypatch.setattr(_ext, "has_kernel", lambda *args: False)
    norm = nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
        norm.bias.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
    x = torch.randn(4, 6, 5, 3, generator=gen, dtype=torch.float64) + 100.0
    g = torch.randn(4, 6, 5, 3, generator=gen, dtype=torch.float64)
    out = torch.relu(norm(x)).detach() if relu else None
    got = group_norm.group_norm_grads(norm, x, g, relu_out=out)
    for i in range(x.shape[0]):
        norm.zero_grad()
        y = norm(x[i : i + 1])
        (torch.relu(y) if relu else y).backward(g[i : i + 1])
        torch.testing.assert_close(got["weight"][i], norm.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["bias"][i], norm.bias.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e6])
def test_group_statistics_match_the_two_pass_variance(offset, gen):
    """The pooled shifted moments give each group's mean and biased variance, also where the
    mean dwarfs the spread and where the shift (a row's first value) is an outlier."""
    batch, groups, per_group, n = 3, 2, 4, 37
    x = torch.randn(batch, groups * per_group, n, generator=gen, dtype=torch.float64) + offset
    x[0, 0, 0] = offset + 1e5  # the shift of the first row, far from its group's values
    moments = _affine.row_dots(x, x, moments=True)[..., 2:]
    mean, rstd = _affine.group_statistics(moments.reshape(batch, groups, per_group, 3), n, 1e-5)
    grouped = x.reshape(batch, groups, -1)
    want_mean = grouped.mean(-1)
    want_var = (grouped - want_mean.unsqueeze(-1)).square().mean(-1)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(rstd, (want_var + 1e-5).rsqrt(), rtol=1e-9, atol=0)

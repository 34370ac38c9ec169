"""clip_factors, total_clip_factors, per_example_norm_sq and clip_accumulate_: the formula,
non-finite and masked examples, and the sensitivity bound ||c_i g_i|| <= C, on every backend."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_dpfast as dpf
from tests.conftest import DEVICES
from tests.helpers import assert_close, backends, randn

INF, NAN = float("inf"), float("nan")


def _factor(norm_sq: float, max_norm: float) -> float:
    """The clip factor written out in Python floats: the independent reference (a negative
    squared norm is cancellation, not a small norm: the example is left out)."""
    if not math.isfinite(norm_sq) or norm_sq < 0:
        return 0.0
    return min(1.0, max_norm / (math.sqrt(norm_sq) + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_factors_follow_the_formula(dtype, device, gen):
    norm_sq = torch.cat(
        [
            torch.rand(37, generator=gen, dtype=torch.float64) * 10.0,
            torch.tensor([0.0, -1e-12, 1e-30, 1e30, 1e300, INF, -INF, NAN], dtype=torch.float64),
        ]
    ).to(dtype)
    max_norm = 0.5 + torch.rand((), generator=gen).item()
    mask = torch.rand(norm_sq.shape[0], generator=gen) > 0.3
    for backend in backends("clip_factors", device):
        out = dpf.ops.clip_factors(norm_sq.to(device), max_norm, backend=backend)
        expected = torch.tensor(
            [_factor(n, max_norm) for n in norm_sq.tolist()], dtype=torch.float64
        )
        assert out.dtype == dtype
        assert_close(out, expected, dtype)
        masked = dpf.ops.clip_factors(norm_sq.to(device), max_norm, mask.to(device), backend)
        assert_close(masked, expected * mask, dtype)


def test_clip_factors_of_an_empty_batch(device):
    for backend in backends("clip_factors", device):
        out = dpf.ops.clip_factors(torch.zeros(0, device=device), 1.0, backend=backend)
        assert out.shape == (0,)


@pytest.mark.parametrize("dtypes", [[torch.float32] * 3, [torch.float32, torch.float64]])
@pytest.mark.parametrize("batch", [0, 1, 9])
def test_total_clip_factors_sum_the_layers_then_clip(dtypes, batch, device, gen):
    parts = [torch.rand(batch, generator=gen, dtype=torch.float64) * 3.0 for _ in dtypes]
    if batch == 9:
        parts[0][[2, 5]] = torch.tensor([INF, NAN], dtype=torch.float64)
        parts[-1][7] = 1e30
    parts = [p.to(dtype) for p, dtype in zip(parts, dtypes)]
    scale, max_norm = 2.5**2, 0.5 + torch.rand((), generator=gen).item()
    total = [scale * sum(float(p[i]) for p in parts) for i in range(batch)]
    expected = torch.tensor([_factor(n, max_norm) for n in total], dtype=torch.float64)
    mask = torch.rand(batch, generator=gen) > 0.3
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    for backend in backends("total_clip_factors", device):
        on_device = [p.to(device) for p in parts]
        norm_sq, factors = dpf.ops.total_clip_factors(
            on_device, max_norm, norm_scale=scale, backend=backend
        )
        assert norm_sq.dtype == factors.dtype == out_dtype and norm_sq.shape == (batch,)
        torch.testing.assert_close(
            norm_sq.cpu().double(),
            torch.tensor(total, dtype=torch.float64).to(out_dtype).double(),
            rtol=1e-6,
            atol=0.0,
            equal_nan=True,
        )
        assert_close(factors, expected, out_dtype)
        _, masked = dpf.ops.total_clip_factors(
            on_device, max_norm, mask.to(device), scale, backend=backend
        )
        assert_close(masked, expected * mask, out_dtype)


def test_total_clip_factors_bad_arguments_name_the_problem():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match="needs one or more"):
        dpf.ops.total_clip_factors([], 1.0)
    with pytest.raises(ValueError, match=r"norm_sqs\[1\] must have shape \(B,\)"):
        dpf.ops.total_clip_factors([ones, torch.ones(4)], 1.0)
    with pytest.raises(ValueError, match="norm_scale must be a finite number > 0"):
        dpf.ops.total_clip_factors([ones], 1.0, norm_scale=0.0)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        dpf.ops.total_clip_factors([ones], -1.0)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        dpf.ops.total_clip_factors([torch.ones(3, dtype=torch.long)], 1.0)
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(B,\)"):
        dpf.ops.total_clip_factors([ones], 1.0, mask=torch.ones(2, dtype=torch.bool))


def _per_example_list(batch, gen, dtypes, device):
    shapes = [(3, 4), (1,), (), (5, 2, 3), (17,)]  # scalars, 1-element and odd sizes
    return [
        randn(batch, *shape, gen=gen, dtype=dtype, device=device) * 3.0
        for shape, dtype in zip(shapes, dtypes)
    ]


DTYPE_MIXES = {
    "float64": [torch.float64] * 5,
    "float32": [torch.float32] * 5,
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16],
}


@pytest.mark.parametrize("mix", DTYPE_MIXES)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_clip_accumulate_matches_brute_force(mix, batch, device, gen):
    dtypes = DTYPE_MIXES[mix]
    grads = _per_example_list(batch, gen, dtypes, device)
    max_norm = 1.0 + torch.rand((), generator=gen).item() * 4
    mask = torch.rand(batch, generator=gen) > 0.25
    flat = torch.cat([g.double().cpu().reshape(batch, g[0:1].numel() or 1) for g in grads], dim=1)
    norms = flat.square().sum(dim=1)
    factors = torch.tensor([_factor(n, max_norm) for n in norms.tolist()], dtype=torch.float64)
    factors = factors * mask
    for backend in backends("clip_accumulate_", device):
        start = [randn(*g.shape[1:], gen=gen, dtype=g.dtype, device=device) for g in grads]
        summed = [s.clone() for s in start]
        out = dpf.ops.clip_accumulate_(grads, summed, max_norm, mask.to(device), backend)
        assert out.dtype == (torch.float64 if mix == "float64" else torch.float32)
        assert_close(out, norms, torch.float64 if mix == "float64" else torch.float32, scale=50)
        for g, s0, s in zip(grads, start, summed):
            expected = s0.double().cpu() + torch.einsum("b,b...->...", factors, g.double().cpu())
            if s.dtype in (torch.float16, torch.bfloat16):
                torch.testing.assert_close(s.double().cpu(), expected, rtol=1e-2, atol=2e-2)
            else:
                assert_close(s, expected, s.dtype, scale=10)


def test_clip_accumulate_zeroes_non_finite_examples(device, gen):
    grads = _per_example_list(4, gen, DTYPE_MIXES["float32"], device)
    grads[0][1, 2, 3] = NAN
    grads[3][2, 0, 0, 1] = INF
    for backend in backends("clip_accumulate_", device):
        summed = [torch.zeros(g.shape[1:], device=device) for g in grads]
        norm_sq = dpf.ops.clip_accumulate_(grads, summed, 1.0, backend=backend)
        assert not torch.isfinite(norm_sq[1:3]).any() and torch.isfinite(norm_sq[[0, 3]]).all()
        assert all(torch.isfinite(s).all() for s in summed)
        keep = [0, 3]
        flat = torch.cat([g[keep].double().cpu().reshape(2, -1) for g in grads], dim=1)
        factors = [_factor(n, 1.0) for n in flat.square().sum(dim=1).tolist()]
        for g, s in zip(grads, summed):
            kept = g[keep].double().cpu()
            assert_close(s, factors[0] * kept[0] + factors[1] * kept[1], torch.float32)


def test_clip_accumulate_handles_non_contiguous_tensors(device, gen):
    base = randn(5, 6, 4, gen=gen, dtype=torch.float32, device=device)
    grads = [base.transpose(1, 2), base[:, ::2, 1]]
    for backend in backends("clip_accumulate_", device):
        summed = [torch.zeros(6, 4, device=device).t(), torch.zeros(3, device=device)]
        reference = [torch.zeros(4, 6, device=device), torch.zeros(3, device=device)]
        dpf.ops.clip_accumulate_(grads, summed, 2.0, backend=backend)
        dpf.ops.clip_accumulate_(
            [g.contiguous() for g in grads], reference, 2.0, backend="reference"
        )
        for s, r in zip(summed, reference):
            assert_close(s, r.double(), torch.float32)


@pytest.mark.parametrize("mix", DTYPE_MIXES)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_scaled_accumulate_matches_brute_force(mix, batch, device, gen):
    """summed[k] += sum_i s_i g_k[i] against a float64 loop over the examples; some s_i = 0,
    the rest of either sign and up to 1e3."""
    grads = _per_example_list(batch, gen, DTYPE_MIXES[mix], device)
    scale = torch.randn(batch, generator=gen, dtype=torch.float64) * 10 ** (
        3 * torch.rand(batch, generator=gen, dtype=torch.float64)
    )
    scale[torch.rand(batch, generator=gen) < 0.3] = 0.0
    scale = scale.to(torch.float64 if mix == "float64" else torch.float32)
    for backend in backends("scaled_accumulate_", device):
        start = [randn(*g.shape[1:], gen=gen, dtype=g.dtype, device=device) for g in grads]
        summed = [x.clone() for x in start]
        dpf.ops.scaled_accumulate_(grads, summed, scale.to(device), backend)
        for g, s0, s in zip(grads, start, summed):
            expected = s0.double().cpu()
            for i in range(batch):
                expected = expected + scale[i].double() * g[i].double().cpu()
            if s.dtype in (torch.float16, torch.bfloat16):
                size = float(expected.abs().max()) if expected.numel() else 1.0
                torch.testing.assert_close(s.double().cpu(), expected, rtol=1e-2, atol=1e-2 * size)
            else:
                assert_close(
                    s, expected, s.dtype, scale=10 * float(scale.abs().max() if batch else 1)
                )


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_scaled_accumulate_leaves_unscaled_examples_out_exactly(value, device, gen):
    """Rows of scale 0 holding NaN or Inf (a bad example, padding) add nothing, in every
    tensor, contiguous or not."""
    base = randn(5, 6, 4, gen=gen, dtype=torch.float32, device=device)
    base[1, 2, 3] = value
    base[4, 0, 0] = value
    grads = [base.transpose(1, 2), base[:, ::2, 1], base.reshape(5, -1)]
    scale = torch.tensor([0.5, 0.0, -2.0, 1.0, 0.0], device=device)
    kept = [0, 2, 3]
    for backend in backends("scaled_accumulate_", device):
        summed = [torch.zeros(6, 4, device=device).t(), torch.zeros(3, device=device)]
        summed.append(torch.zeros(24, device=device))
        dpf.ops.scaled_accumulate_(grads, summed, scale, backend)
        for g, s in zip(grads, summed):
            expected = sum(float(scale[i]) * g[i].double().cpu() for i in kept)
            assert torch.isfinite(s).all()
            assert_close(s, expected, torch.float32)


def test_scaled_accumulate_bad_arguments_name_the_problem():
    g, s = [torch.randn(3, 4)], [torch.zeros(4)]
    with pytest.raises(ValueError, match=r"scale must be a tensor of shape \(B,\) = \(3,\)"):
        dpf.ops.scaled_accumulate_(g, s, torch.ones(4))
    with pytest.raises(ValueError, match=r"per_example\[0\] must be \(B, \*summed\[0\].shape\)"):
        dpf.ops.scaled_accumulate_(g, [torch.zeros(5)], torch.ones(3))
    with pytest.raises(ValueError, match="as many summed tensors"):
        dpf.ops.scaled_accumulate_(g, [], torch.ones(3))
    for backend in backends("scaled_accumulate_", torch.device("cpu")):
        summed = [torch.zeros(4)]
        torch.library.opcheck(
            torch.ops.torch_dpfast.scaled_accumulate_, (g, summed, torch.ones(3), backend)
        )


@settings(max_examples=60, deadline=None)
@given(
    log_magnitude=st.floats(-30, 30),
    max_norm=st.floats(1e-3, 1e3),
    special=st.sampled_from([None, INF, -INF, NAN]),
    seed=st.integers(0, 2**32),
)
def test_each_example_contributes_at_most_max_norm(log_magnitude, max_norm, special, seed):
    """Sensitivity: whatever the gradient (huge, tiny, Inf, NaN), ||c_1 g_1|| <= C."""
    gen = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(1, 3, 5, generator=gen) * 10.0**log_magnitude,
        torch.randn(1, 7, generator=gen, dtype=torch.float64),
    ]
    if special is not None:
        grads[0][0, 1, 1] = special
    for device in DEVICES:
        for backend in backends("clip_accumulate_", device):
            summed = [
                torch.zeros(3, 5, device=device),
                torch.zeros(7, dtype=torch.float64, device=device),
            ]
            on_device = [g.to(device) for g in grads]
            dpf.ops.clip_accumulate_(on_device, summed, max_norm, backend=backend)
            assert all(torch.isfinite(s).all() for s in summed)
            total = math.sqrt(sum(s.double().square().sum().item() for s in summed))
            assert total <= max_norm * (1 + 1e-6)


def test_bad_arguments_name_the_problem():
    g, s = [torch.randn(3, 4)], [torch.zeros(4)]
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        dpf.ops.clip_accumulate_(g, s, 0.0)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        dpf.ops.clip_factors(torch.ones(3), float("nan"))
    with pytest.raises(ValueError, match=r"per_example\[0\] must be \(B, \*summed\[0\].shape\)"):
        dpf.ops.clip_accumulate_(g, [torch.zeros(5)], 1.0)
    with pytest.raises(ValueError, match="as many summed tensors"):
        dpf.ops.clip_accumulate_(g, [], 1.0)
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(B,\)"):
        dpf.ops.clip_accumulate_(g, s, 1.0, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm_sq must be a \\(B,\\) float32 or float64"):
        dpf.ops.clip_factors(torch.ones(3, dtype=torch.float16), 1.0)


def test_ops_trace_under_torch_compile_and_pass_opcheck(device, gen):
    grads = _per_example_list(4, gen, DTYPE_MIXES["float32"], device)
    mask = torch.tensor([True, False, True, True], device=device)

    def step(grads, norm_sq):
        summed = [torch.zeros(g.shape[1:], device=g.device) for g in grads]
        out = dpf.ops.clip_accumulate_(grads, summed, 1.5, mask)
        return out, dpf.ops.clip_factors(norm_sq, 1.5, mask), summed

    norm_sq = torch.rand(4, generator=gen).to(device) * 4
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(grads, norm_sq), step(grads, norm_sq))
    for backend in backends("clip_factors", device):
        torch.library.opcheck(torch.ops.torch_dpfast.clip_factors, (norm_sq, 1.5, mask, backend))
    for backend in backends("total_clip_factors", device):
        torch.library.opcheck(
            torch.ops.torch_dpfast.total_clip_factors, ([norm_sq, norm_sq], 1.5, mask, 4.0, backend)
        )
    for backend in backends("clip_accumulate_", device):
        summed = [torch.zeros(g.shape[1:], device=device) for g in grads]
        torch.library.opcheck(
            torch.ops.torch_dpfast.clip_accumulate_, (grads, summed, 1.5, mask, backend)
        )


@pytest.mark.parametrize("bad_row", [None, 1, 3, 4])
def test_rows_with_zero_scale_are_zeroed_exactly_when_not_finite(bad_row, device, gen):
    """drop_unscaled_rows: a zero-scale row holding NaN or Inf must be zeroed (0 * inf = NaN);
    finite zero-scale rows may be left to the caller's multiplication by 0. Rows 1 (between
    kept rows) and 3-4 (trailing, like padding) have zero scale."""
    from torch_dpfast.ops._checks import drop_unscaled_rows

    x = randn(5, 3, 4, gen=gen, dtype=torch.float32, device=device)
    scale = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0], device=device)
    if bad_row is not None:
        x[bad_row, 1, 2] = NAN if bad_row == 1 else INF
    out = drop_unscaled_rows(x, scale)
    assert torch.isfinite(out * scale[:, None, None]).all()
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]])
    if bad_row is not None:
        assert (out[bad_row] == 0).all()


@pytest.mark.parametrize("mix", DTYPE_MIXES)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_per_example_norm_sq_sums_the_tensors(mix, batch, device, gen):
    grads = _per_example_list(batch, gen, DTYPE_MIXES[mix], device)
    grads.append(randn(batch, 3, 700, gen=gen, dtype=DTYPE_MIXES[mix][0], device=device)[:, ::2])
    if batch == 7:
        grads[0][2, 1, 1] = INF
    flat = [g.double().cpu().reshape(batch, math.prod(g.shape[1:])) for g in grads]
    expected = torch.cat(flat, dim=1).square().sum(dim=1)
    for backend in backends("per_example_norm_sq", device):
        out = dpf.ops.per_example_norm_sq(grads, backend=backend)
        dtype = torch.float64 if mix == "float64" else torch.float32
        assert out.dtype == dtype and out.shape == (batch,)
        finite = [i for i in range(batch) if i != 2 or batch != 7]
        assert batch != 7 or out[2] == INF
        assert_close(out[finite], expected[finite], dtype, scale=50)


def test_per_example_norm_sq_refuses_bad_lists(device):
    with pytest.raises(ValueError, match="one or more"):
        dpf.ops.per_example_norm_sq([])
    with pytest.raises(ValueError, match=r"\(B, \.\.\.\) with B = 3"):
        dpf.ops.per_example_norm_sq([torch.ones(3, 2), torch.ones(2, 2)])
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        dpf.ops.per_example_norm_sq([torch.ones(3, dtype=torch.long)])

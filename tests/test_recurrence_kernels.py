"""The compiled recurrence (csrc/cpu/recurrence.cpp through rules/_fused_recurrence.py) against
autograd through a plain PyTorch loop over the steps: the states, and the gradients of gi (every
step's gate pre-activations), h0 and c0; float64 and float32 (the LSTM's own sigmoid and tanh,
the GRU's and RNN's tanh through ATen's sigmoid), odd sizes, LSTM units shared among threads,
padded steps, large pre-activations, losses that read only part of it."""

import pytest
import torch

from torch_dpfast import _ext
from torch_dpfast.rules import _fused_recurrence as fused

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("lstm_sequence", "CPU"), reason="torch_dpfast._C is not built"
)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _assert_close(got, want):
    """Elementwise within rtol, and within atol times the largest magnitude of ``want``: a sum
    in float32 is off by about eps times its largest terms, and ReLU recurrences grow gradients
    to 1e5 or more, where two float32 orders of the same sums differ by far more than 2e-5 in
    an element of a few hundred (both equally far from float64)."""
    tol = TOLERANCE[want.dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _reference(mode, gi, h0, c0, w_hh, b_hh, valid, probe=None):
    """(h (B, T, H), c_T) by a loop of PyTorch ops: padded steps keep the state. The GRU's gh
    is gh + probe (probe zero), so that its gradient is dgh."""
    h, c, hs = h0, c0, []
    for t in range(gi.shape[1]):
        gh = h @ w_hh.T + (0 if b_hh is None else b_hh)
        if probe is not None:
            gh = gh + probe[:, t]
        pre = gi[:, t] + gh
        if mode == "GRU":
            ir, iz, in_ = gi[:, t].chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
            h_new, c_new = (1 - z) * (in_ + r * hn).tanh() + z * h, None
        elif mode == "LSTM":
            i, f, g, o = pre.chunk(4, dim=1)
            c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h_new = o.sigmoid() * c_new.tanh()
        else:
            h_new, c_new = (pre.relu() if mode == "RNN_RELU" else pre.tanh()), None
        if valid is not None:
            keep = valid[:, t, None]
            h_new = torch.where(keep, h_new, h)
            c_new = None if c is None else torch.where(keep, c_new, c)
        h, c = h_new, c_new
        hs.append(h)
    return torch.stack(hs, dim=1), c


def _case(mode, dtype, gen, batch=5, steps=7, hidden=3, scale=1.0, padded=False):
    g = GATES[mode] * hidden

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    gi = rand(batch, steps, g).requires_grad_()
    h0 = rand(batch, hidden).requires_grad_()
    c0 = rand(batch, hidden).requires_grad_() if mode == "LSTM" else None
    w_hh, b_hh = rand(g, hidden) / scale, rand(g)
    valid = None
    if padded:
        lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
        valid = torch.arange(steps)[None] < lengths[:, None]
    return gi, h0, c0, w_hh, b_hh, valid


def _losses(hs, c_n, gen, read):
    """A weighted sum of what ``read`` names, weights random."""
    total = 0
    if "output" in read:
        total = total + (hs * torch.randn(hs.shape, generator=gen, dtype=hs.dtype)).sum()
    if "h_n" in read:
        total = total + hs[:, -1].square().sum()
    if "c_n" in read and c_n is not None:
        total = total + (c_n * 0.7).sin().sum()
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", sorted(GATES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("read", [("output",), ("h_n",), ("c_n",), ("output", "h_n", "c_n")])
def test_states_and_gradients_match_a_loop_of_pytorch_ops(mode, dtype, padded, read, gen):
    if read == ("c_n",) and mode != "LSTM":
        pytest.skip("an RNN has no cell state")
    args = _case(mode, dtype, gen, padded=padded)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None
                for a in args[:3]] + list(args[3:])  # fmt: skip
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    probe = ref_probe = None
    if mode == "GRU":  # dgh: the gradient of a zero probe added to gh
        probe, ref_probe = fused.gh_probe(args[0]), torch.zeros_like(args[0], requires_grad=True)
    hs, c_n = fused.run(mode, *args, probe)
    expected_hs, expected_c = _reference(mode, *ref_args, ref_probe)
    _assert_close(hs, expected_hs)
    if mode == "LSTM":
        _assert_close(c_n, expected_c)
    inputs = [a for a in (*args[:3], probe) if a is not None]
    ref_inputs = [a for a in (*ref_args[:3], ref_probe) if a is not None]
    got = torch.autograd.grad(_losses(hs, c_n, torch.Generator().manual_seed(seed), read), inputs)
    want = torch.autograd.grad(
        _losses(expected_hs, expected_c, torch.Generator().manual_seed(seed), read), ref_inputs
    )
    for a, b in zip(got, want):
        _assert_close(a, b)


@pytest.mark.parametrize("mode", sorted(GATES))
def test_saturated_gates_stay_finite_and_exact(mode, gen):
    """Pre-activations of +-50: sigmoids at 0 and 1, tanh at +-1, in float32 too."""
    for dtype in (torch.float64, torch.float32):
        args = _case(mode, dtype, gen, scale=50.0)
        hs, c_n = fused.run(mode, *args, fused.gh_probe(args[0]))
        expected, _ = _reference(mode, *args)
        assert torch.isfinite(hs).all()
        _assert_close(hs, expected)


@pytest.fixture
def threads():
    """Sets ATen's thread count for one test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("hidden", [70, 27])
def test_wide_layers_share_their_units_among_threads(mode, count, dtype, hidden, threads, gen):
    """Batch 33: the LSTM's threads own 70, 48 + 22, 32 + 32 + 6 or 32 + 32 + 6 + 0 units (one
    owning none), or 27, 16 + 11, ..., so that the small GEMM's 8-row and 1-row tiles, its
    two-vector and one-vector column tiles (float32 and float64 lanes) and its scalar columns
    all run; padded steps; every gradient, against the loop in float64 on the same inputs
    (float32 within 1e-4 of each result's scale)."""
    threads(count)
    args = _case(mode, dtype, gen, batch=33, steps=6, hidden=hidden, padded=True)
    args = (*args[:3], args[3] / hidden**0.5, *args[4:])  # W_hh h of unit scale
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in args[:3]]
    ref_args += [a.double() if a.is_floating_point() else a for a in args[3:] if a is not None]
    ref_args += [None] * (len(args) - len(ref_args))
    hs, c_n = fused.run(mode, *args, fused.gh_probe(args[0]))
    expected, expected_c = _reference(mode, *ref_args)
    weights = torch.randn(expected.shape, generator=gen, dtype=torch.float64)

    def loss(hs, c_n):
        total = (hs * weights.to(hs.dtype)).sum() + hs[:, -1].square().sum()
        return total if c_n is None else total + (c_n * 0.7).sin().sum()

    got = torch.autograd.grad(loss(hs, c_n), [a for a in args[:3] if a is not None])
    ref_inputs = [a for a in ref_args[:3] if a is not None]
    want = torch.autograd.grad(loss(expected, expected_c), ref_inputs)
    for a, b in zip((hs, *got), (expected, *want)):
        atol = (1e-12 if dtype == torch.float64 else 1e-4) * float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=atol)


def test_only_cpu_float_layers_are_compiled():
    x = torch.zeros(2, 3, 4)
    assert fused.available("LSTM", x, torch.zeros(2, 1), torch.zeros(4, 1))
    assert fused.available("GRU", x, torch.zeros(2, 1), torch.zeros(4, 1))
    assert not fused.available("LSTM", x.double(), torch.zeros(2, 1), torch.zeros(4, 1))
    half = x.to(torch.bfloat16)
    assert not fused.available("LSTM", half, torch.zeros(2, 1), torch.zeros(4, 1))


def test_shape_errors_name_the_shapes():
    with pytest.raises(RuntimeError, match="w_hh"):
        state = torch.zeros(2, 2)
        torch.ops.dpfast_C.lstm_sequence(
            torch.zeros(2, 3, 8), state, state, torch.zeros(8, 3), None, None
        )

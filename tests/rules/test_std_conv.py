"""rules/std_conv.py: timm's weight-standardised convolutions (BiT's StdConv2d, NFNet's
ScaledStdConv2d with its gain, the 'same'-padded variants), materialised into buffers too."""

import pytest
import torch

from tests.rules.harness import check_rule, float64_module, floats

timm_layers = pytest.importorskip("timm.layers")

CASES = {
    "stdconv": (lambda: timm_layers.StdConv2d(3, 4, 3), floats(2, 3, 6, 5)),
    # >= 512 output positions: one weight-gradient convolution per example on CPU
    "stdconv-high-res": (lambda: timm_layers.StdConv2d(2, 3, 3, padding=1), floats(2, 2, 24, 24)),
    "stdconv-bias-groups": (
        lambda: timm_layers.StdConv2d(4, 6, 3, stride=2, groups=2, bias=True),
        floats(3, 4, 7, 6),
    ),
    "stdconv-same": (lambda: timm_layers.StdConv2dSame(2, 3, 4, stride=2), floats(2, 2, 7, 9)),
    "scaled-stdconv": (
        lambda: timm_layers.ScaledStdConv2d(3, 5, 3, padding=1),
        floats(2, 3, 5, 5),
    ),
    "scaled-stdconv-same-1x1": (
        lambda: timm_layers.ScaledStdConv2dSame(4, 3, 1),
        floats(3, 4, 5, 4),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_std_conv_rule_matches_per_example_autograd(case, gen):
    factory, make_input = CASES[case]
    check_rule(float64_module(factory), make_input(gen), gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 9, 37])
@pytest.mark.parametrize("compiled", [True, False])
def test_standardisation_jacobian_matches_autograd(dtype, n, compiled, gen, monkeypatch):
    """_apply_jacobian_ (the compiled row kernel, and the PyTorch ops) against the VJP of the
    standardisation w -> s (w - mean(w)) / sqrt(var(w) + eps), row by row, in float64."""
    from torch_dpfast import _ext
    from torch_dpfast.rules import std_conv

    if compiled and not _ext.has_kernel("std_conv_project_", "CPU"):
        pytest.skip("the compiled extension is not built")
    if not compiled:
        monkeypatch.setattr(_ext, "has_kernel", lambda *args: False)
    rows, eps = 5, 1e-6
    conv = timm_layers.ScaledStdConv2d(n, rows, 1, eps=eps).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) * 3)
        conv.gain.copy_(torch.randn(conv.gain.shape, generator=gen, dtype=torch.float64))
    grads = torch.randn(3, rows, n, generator=gen, dtype=torch.float64)

    def standardised(w):
        w = w.reshape(rows, -1)
        var = w.var(dim=1, unbiased=False, keepdim=True)
        return (
            conv.gain.reshape(rows, 1)
            * conv.scale
            * (w - w.mean(1, keepdim=True))
            / (var + eps).sqrt()
        )

    _, vjp = torch.func.vjp(standardised, conv.weight.detach().reshape(rows, n))
    expected = torch.stack([vjp(g)[0] for g in grads])
    w_hat, sigma, s = (t.to(dtype) for t in std_conv._standardise(conv))
    got = std_conv._apply_jacobian_(grads.to(dtype), w_hat, sigma, s)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), expected, **tol)

"""One check for every layer rule: its per-example gradients (plain and written into the
engine's reused buffers), norms by every method and clipped sums against brute-force
per-example autograd in float64, on the module called on one input (B, ...)."""

from __future__ import annotations

import torch
from torch import nn

from torch_dpfast.rules import rule_for
from torch_dpfast.rules._registry import keeps_output


def floats(*shape):
    """An input factory: float64 normal draws of ``shape`` from the test's generator."""
    return lambda gen: torch.randn(*shape, generator=gen, dtype=torch.float64)


def ids(vocab, *shape):
    """An input factory: token ids below ``vocab`` of ``shape``."""
    return lambda gen: torch.randint(0, vocab, shape, generator=gen)


def brute_force(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: autograd of <module(x_i), g_i> one example at a time."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    grads = {n: [] for n in params}
    for i in range(x.shape[0]):
        module.zero_grad()
        (module(x[i : i + 1]) * g[i : i + 1]).sum().backward()
        for n, p in params.items():
            grads[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in grads.items()}


def output_grad(module: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random float64 gradient of the module's output on ``x``."""
    with torch.no_grad():
        out = module(x)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


def float64_module(factory) -> nn.Module:
    """``factory()`` in float64 with its parameters moved off their (often trivial) init."""
    module = factory().double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return module


def check_rule(module: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """The module's rule against brute force on input ``x`` (float64 module): per-example
    gradients; the same written into NaN-filled buffers when the rule materialises on CPU
    (``materialise_saving``); norms by ghost, direct and auto; clipped sums with example 0
    scaled by 0 and non-finite (its NaNs must not reach the sums). A rule that keeps outputs is
    checked both on the input alone and on (input, what it keeps of the output), as the engine
    records it."""
    g = output_grad(module, x, gen)
    rule = rule_for(module)
    assert rule is not None, type(module)
    expected = brute_force(module, x, g)
    for with_output in (False, True) if _keeps_something(module, rule, x, g) else (False,):
        _check_calls(module, rule, x, g, expected, gen, with_output)


def _keeps_something(module, rule, x, g) -> bool:
    """Whether the rule keeps anything of this layer's output (GroupNormAct: behind a ReLU)."""
    if not keeps_output(rule):
        return False
    with torch.no_grad():
        return rule.kept_output(module, x, module(x), g) is not None


def _recorded(module: nn.Module, x: torch.Tensor, g: torch.Tensor, with_output: bool):
    """x as the engine records it: the input, or (input, what the rule keeps of the output)."""
    if not with_output:
        return x
    with torch.no_grad():
        return x, rule_for(module).kept_output(module, x, module(x), g)


def _check_calls(module, rule, x, g, expected, gen, with_output: bool) -> None:
    got = rule.per_example_grads(module, _recorded(module, x, g, with_output), g)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-10)

    if rule.materialise_saving(module, _recorded(module, x, g, with_output), g) is not None:
        buffers = {n: torch.full_like(v, float("nan")) for n, v in expected.items()}
        got = rule.per_example_grads(module, _recorded(module, x, g, with_output), g, out=buffers)
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-10)
        weight = got["weight"]
        assert weight.data_ptr() == buffers["weight"].data_ptr(), "not written into the buffer"

    norms = sum(v.flatten(1).square().sum(dim=1) for v in expected.values())
    if hasattr(rule, "normed_per_example_grads"):  # the compiled kernel, where it runs
        buffers = {n: torch.full_like(v, float("nan")) for n, v in expected.items()}
        normed = rule.normed_per_example_grads(
            module, _recorded(module, x, g, with_output), g, buffers
        )
        if normed is not None:
            got, norm_sq = normed
            assert got.keys() == expected.keys()
            for n in expected:
                torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-10)
                assert got[n].data_ptr() == buffers[n].data_ptr(), "not written into the buffer"
            torch.testing.assert_close(norm_sq, norms, rtol=1e-9, atol=1e-10)
    for method in ("ghost", "direct", "auto"):
        got = rule.norm_sq(module, _recorded(module, x, g, with_output), g, method)
        torch.testing.assert_close(got, norms, rtol=1e-9, atol=1e-10)

    scale = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
    scale[0] = 0.0
    if x.is_floating_point():
        x = x.clone()
        x[0] = float("nan")
    else:
        g = g.clone()
        g[0] = float("nan")
    sums = rule.clipped_sums(module, _recorded(module, x, g, with_output), g, scale)
    assert sums.keys() == expected.keys()
    for n, per_example in expected.items():
        want = torch.einsum("b,b...->...", scale[1:], per_example[1:])
        assert sums[n].shape == getattr(module, n).shape
        torch.testing.assert_close(sums[n], want, rtol=1e-9, atol=1e-10)

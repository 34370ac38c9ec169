"""embedding_norm_sq and embedding_clipped_sum against per-example autograd of F.embedding."""

import pytest
import torch

import torch_dpfast as dpf
from tests import brute_force
from tests.helpers import assert_close, backends, randn

# (ids shape (B, *), vocabulary V, embedding dim d, padding_idx)
CONFIGS = [
    ((4, 9), 5, 3, None),  # few ids: many repeats inside each example
    ((3, 1), 7, 4, 2),  # T = 1
    ((5, 6), 11, 1, -1),  # negative padding_idx, d = 1
    ((2, 3, 4), 4, 6, 0),  # two middle dims
    ((0, 5), 6, 3, None),  # empty batch
    ((6,), 13, 5, None),  # ids (B,) without a sequence dim
]


def _inputs(ids_shape, vocab, dim, gen, dtype, device):
    ids = torch.randint(0, vocab, ids_shape, generator=gen).to(device)
    g = randn(*ids_shape, dim, gen=gen, dtype=dtype, device=device)
    return ids, g


@pytest.mark.parametrize("ids_shape,vocab,dim,padding_idx", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_sq_matches_per_example_autograd(
    ids_shape, vocab, dim, padding_idx, dtype, device, gen
):
    ids, g = _inputs(ids_shape, vocab, dim, gen, dtype, device)
    expected = brute_force.norms_sq(brute_force.embedding_grads(ids, g, vocab, padding_idx))
    for backend in backends("embedding_norm_sq", device, dtype):
        out = dpf.ops.embedding_norm_sq(ids, g, vocab, padding_idx, backend=backend)
        assert out.shape == (ids.shape[0],)
        assert_close(out, expected, dtype, scale=ids[0:1].numel() ** 2 + 1)


@pytest.mark.parametrize("ids_shape,vocab,dim,padding_idx", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clipped_sum_matches_per_example_autograd(
    ids_shape, vocab, dim, padding_idx, dtype, device, gen
):
    ids, g = _inputs(ids_shape, vocab, dim, gen, dtype, device)
    scale = torch.rand(ids.shape[0], generator=gen, dtype=torch.float64)
    scale[::2] = 0.0
    g[::2] = float("inf")  # examples with scale 0 must not leak their non-finite rows
    expected = brute_force.clipped_sum(
        brute_force.embedding_grads(ids, g, vocab, padding_idx), scale
    )
    for backend in backends("embedding_clipped_sum", device, dtype):
        out = dpf.ops.embedding_clipped_sum(
            ids, g, scale.to(device), vocab, padding_idx, backend=backend
        )
        assert out.shape == (vocab, dim) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert_close(out, expected, dtype, scale=ids.numel() + 1)


def test_bad_arguments_name_the_problem():
    ids, g = torch.tensor([[0, 1], [2, 3]]), torch.randn(2, 2, 3)
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 3\)"):
        dpf.ops.embedding_norm_sq(ids, g, num_embeddings=3)
    with pytest.raises(ValueError, match="padding_idx=5 is outside"):
        dpf.ops.embedding_norm_sq(ids, g, num_embeddings=4, padding_idx=5)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        dpf.ops.embedding_norm_sq(ids.float(), g, num_embeddings=4)
    with pytest.raises(ValueError, match="must agree"):
        dpf.ops.embedding_norm_sq(ids, g[:, :1], num_embeddings=4)


def test_ops_trace_under_torch_compile_and_pass_opcheck(device, gen):
    ids, g = _inputs((3, 5), 6, 4, gen, torch.float32, device)
    scale = torch.rand(3, generator=gen).to(device)

    def step(ids, g, scale):
        return (
            dpf.ops.embedding_norm_sq(ids, g, 6, 1),
            dpf.ops.embedding_clipped_sum(ids, g, scale, 6, 1),
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(ids, g, scale), step(ids, g, scale)):
        torch.testing.assert_close(got, want)
    for backend in backends("embedding_norm_sq", device, torch.float32):
        torch.library.opcheck(torch.ops.torch_dpfast.embedding_norm_sq, (ids, g, 6, 1, backend))
    for backend in backends("embedding_clipped_sum", device, torch.float32):
        torch.library.opcheck(
            torch.ops.torch_dpfast.embedding_clipped_sum, (ids, g, scale, 6, None, backend)
        )

"""transformers models run unmodified under attach: default position_ids (1, T) broadcast over
the batch, attention masks, OPT's tokens flattened into dim 0, GPT-2's Conv1D, tied
embeddings; norms and clipped sums against float64 per-example autograd, with padding rows."""

import copy
import warnings

import pytest
import torch

import torch_dpfast as dpf
from tests.helpers import clipped_reference
from torch_dpfast.ghost import ghost_backward

transformers = pytest.importorskip("transformers")
MODES = ["auto", "bk", "per_example", "ghost"]
V = 40


def _model(name):
    small = dict(vocab_size=V, num_hidden_layers=1, num_attention_heads=2)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=V,
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(config)
    if name == "bert":
        config = transformers.BertConfig(
            **small,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return transformers.BertForMaskedLM(config)
    if name == "llama":
        config = transformers.LlamaConfig(
            **small,
            hidden_size=16,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=16,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.OPTConfig(
        **small,
        hidden_size=16,
        ffn_dim=32,
        max_position_embeddings=16,
        word_embed_proj_dim=16,
        dropout=0.0,
    )
    return transformers.OPTForCausalLM(config)


def _losses(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    return logits.sin().flatten(1).sum(dim=1)


def _reference(model, ids, mask, max_norm, kept):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(kept):
        model.zero_grad()
        _losses(model, ids[i : i + 1], mask[i : i + 1]).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        rows.append(torch.cat([g.flatten() for g in grads]))
    return clipped_reference(torch.stack(rows), max_norm)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "opt"])
def test_model_matches_per_example_autograd(name, mode, padding, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(name).double().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(1, V, (4, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    kept = 4 - padding
    expected, expected_sq = _reference(reference, ids, mask, 0.5, kept)
    att = dpf.attach(model, clipping=mode, loss_reduction="sum")
    try:
        att.begin_batch(torch.arange(4) < kept if padding else None)
        if mode == "ghost":
            norm_sq = ghost_backward(att, _losses(model, ids, mask), 0.5)
        else:
            _losses(model, ids, mask).sum().backward()
            norm_sq = att.clip_and_accumulate(0.5)
        params = [p for p in model.parameters() if p.requires_grad]
        got = torch.cat(
            [
                (torch.zeros_like(p) if p.summed_grad is None else p.summed_grad).flatten()
                for p in params
            ]
        )
    finally:
        att.detach()
    # LLaMA's RMSNorm computes in float32 whatever the model's dtype: ghost clipping's second
    # backward (with g scaled by the clip factors) rounds there at float32's precision
    rtol, atol = (1e-5, 1e-7) if name == "llama" else (1e-8, 1e-11)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(norm_sq[:kept].double(), expected_sq, rtol=rtol, atol=atol)

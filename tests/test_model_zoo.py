"""Stock models, unmodified (tiny configs): every trainable parameter on an exact path, and no
more than 1% of them on a fallback (``dpf.explain``'s method column), and the clipped update
and norms of every clipping mode equal to float64 per-example autograd (one example at a time),
with and without a padding row. Dropout and drop-path in train mode are checked against the
per-example gradients of the same batched forward (same seed, so the same masks)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import torch_dpfast as dpf
from tests.helpers import clipped_reference
from torch_dpfast.ghost import ghost_backward

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

MODES = ["auto", "bk", "per_example", "ghost"]
B, C = 3, 0.5
V = 40  # vocabulary of the language models


def _timm(name: str, **kwargs):
    """A timm model with its BatchNorms replaced (dpf.fix) and no drop-path."""
    return dpf.fix(timm.create_model(name, num_classes=3, drop_path_rate=0.0, **kwargs))


def _timm_models():
    from timm.models import maxxvit, metaformer, mlp_mixer, nfnet

    vit = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    stages = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32))  # attention heads of 32
    swin = dict(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1))
    nfnet_cfg = nfnet._dm_nfnet_cfg(depths=(1, 1, 1, 1), channels=(32, 32, 32, 32))
    maxvit_cfg = maxxvit.MaxxVitCfg(
        embed_dim=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        block_type=("M",) * 4,
        stem_width=(8, 8),
        **maxxvit._rw_max_cfg(dim_head=8, window_size=(2, 2)),
    )
    return {
        "eva02": (
            lambda: _timm("eva02_tiny_patch14_224", **{**vit, "img_size": 28, "patch_size": 14}),
            28,
        ),
        "beit": (lambda: _timm("beit_base_patch16_224", **vit), 32),
        "convnext": (lambda: _timm("convnext_atto", **stages), 32),
        "convnextv2": (lambda: _timm("convnextv2_atto", **stages), 32),
        "resmlp": (
            lambda: mlp_mixer.MlpMixer(
                num_classes=3,
                img_size=32,
                patch_size=16,
                num_blocks=1,
                embed_dim=16,
                mlp_ratio=4,
                block_layer=mlp_mixer.ResBlock,
                norm_layer=mlp_mixer.Affine,
            ),
            32,
        ),
        "edgenext": (lambda: _timm("edgenext_xx_small", **stages, heads=(2, 2, 2, 2)), 32),
        "dm_nfnet": (
            lambda: nfnet.NormFreeNet(
                dataclasses.replace(nfnet_cfg, group_size=8, stem_chs=16, num_features=32),
                num_classes=3,
            ),
            32,
        ),
        "levit": (
            lambda: _timm(
                "levit_128s",
                img_size=32,
                embed_dim=(16, 16, 16),
                depth=(1, 1, 1),
                num_heads=(2, 2, 2),
                key_dim=8,
            ),
            32,
        ),
        "swin": (lambda: _timm("swin_tiny_patch4_window7_224", **swin, num_heads=(2, 2)), 32),
        "swinv2": (lambda: _timm("swinv2_tiny_window8_256", **swin, num_heads=(2, 2)), 32),
        "mobilenetv3": (lambda: _timm("mobilenetv3_small_050"), 32),
        "maxvit": (lambda: dpf.fix(maxxvit.MaxxVit(maxvit_cfg, img_size=64, num_classes=3)), 64),
        "poolformer": (
            lambda: metaformer.MetaFormer(num_classes=3, token_mixers=metaformer.Pooling, **stages),
            32,
        ),
        "caformer": (
            lambda: metaformer.MetaFormer(
                num_classes=3,
                token_mixers=[metaformer.SepConv] * 2 + [metaformer.Attention] * 2,
                norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
                **stages,
            ),
            32,
        ),
        "fastvit": (
            lambda: _timm("fastvit_t8", layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16)),
            32,
        ),
        "vit": (lambda: _timm("vit_tiny_patch16_224", **vit), 32),
    }


TIMM = _timm_models()


def _hf(name: str):
    small = dict(vocab_size=V, num_hidden_layers=1, num_attention_heads=2)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    if name == "bert":
        config = transformers.BertConfig(
            **small, **no_dropout, hidden_size=16, intermediate_size=32, max_position_embeddings=16
        )
        return transformers.BertForMaskedLM(config)
    if name in ("llama", "qwen2"):
        config_type = transformers.LlamaConfig if name == "llama" else transformers.Qwen2Config
        model_type = (
            transformers.LlamaForCausalLM if name == "llama" else transformers.Qwen2ForCausalLM
        )
        config = config_type(
            **small,
            hidden_size=16,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=16,
        )
        return model_type(config)
    if name == "opt":
        config = transformers.OPTConfig(
            **small, hidden_size=16, ffn_dim=32, max_position_embeddings=16,
            word_embed_proj_dim=16, dropout=0.0,
        )  # fmt: skip
        return transformers.OPTForCausalLM(config)
    if name == "t5":
        config = transformers.T5Config(
            vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            dropout_rate=0.0, decoder_start_token_id=0,
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, **no_dropout,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


HF = ["gpt2", "bert", "llama", "qwen2", "opt", "t5", "vit"]


def _hf_inputs(name: str, gen: torch.Generator) -> dict:
    if name == "vit":
        return dict(pixel_values=torch.randn(B, 3, 16, 16, generator=gen, dtype=torch.float64))
    ids = torch.randint(1, V, (B, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if name == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def _losses(model, inputs: dict) -> torch.Tensor:
    """(B,) per-example losses that use every output coordinate."""
    out = model(**inputs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    return out.double().sin().flatten(1).sum(dim=1)


def _rows(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def _one_at_a_time(model, inputs: dict, kept: int, losses=None):
    """Per-example gradients by plain autograd, one example per forward, (kept, P), of
    ``losses(model, inputs)`` (default: _losses)."""
    losses = losses or _losses
    rows = []
    for i in range(kept):
        model.zero_grad()
        losses(model, _rows(inputs, i)).sum().backward()
        rows.append(
            _flat(torch.zeros_like(p) if p.grad is None else p.grad for p in _trainable(model))
        )
    return torch.stack(rows)


def _private_update(model, inputs: dict, mode: str, kept: int):
    """(flattened clipped sum, (B,) squared norms) of one attached physical batch."""
    att = dpf.attach(model, clipping=mode, loss_reduction="sum")
    try:
        att.begin_batch(torch.arange(B) < kept if kept < B else None)
        if mode == "ghost":
            norm_sq = ghost_backward(att, _losses(model, inputs), C)
        else:
            _losses(model, inputs).sum().backward()
            norm_sq = att.clip_and_accumulate(C)
        summed = [
            torch.zeros_like(p) if p.summed_grad is None else p.summed_grad
            for p in _trainable(model)
        ]
        return _flat(summed), norm_sq
    finally:
        att.detach()


def _check(model, inputs, mode, padding, rtol=1e-8, atol=1e-11) -> None:
    model = model.double().train()
    kept = B - padding
    per_example = _one_at_a_time(copy.deepcopy(model), inputs, kept)
    expected, expected_sq = clipped_reference(per_example, C)
    got, norm_sq = _private_update(model, inputs, mode, kept)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(norm_sq[:kept].double(), expected_sq, rtol=rtol, atol=atol)


def _fallback_share(model, inputs: dict) -> float:
    """Share of the trainable parameters (by count) whose method in dpf.explain names a
    fallback."""
    args = (inputs["x"],) if "x" in inputs else ()
    kwargs = {} if "x" in inputs else inputs
    explanation = dpf.explain(model, args, kwargs=kwargs)
    sizes = {
        row["parameter"]: (row["method"], torch.Size(row["shape"]).numel())
        for row in explanation.rows
    }
    total = sum(n for _, n in sizes.values())
    return sum(n for method, n in sizes.values() if "fallback" in method) / total


def _timm_case(name: str, gen: torch.Generator):
    build, size = TIMM[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    return model, dict(x=torch.randn(B, 3, size, size, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_model_leaves_at_most_one_percent_on_a_fallback(name, gen):
    model, inputs = _timm_case(name, gen)
    assert _fallback_share(model.double(), inputs) <= 0.01


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_model_matches_per_example_autograd(name, mode, padding, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model, inputs = _timm_case(name, gen)
    _check(model, inputs, mode, padding)


@pytest.mark.parametrize("name", HF)
def test_transformers_model_leaves_at_most_one_percent_on_a_fallback(name, gen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hf(name).double()
    assert _fallback_share(model, _hf_inputs(name, gen)) <= 0.01


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", HF)
def test_transformers_model_matches_per_example_autograd(name, mode, padding, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hf(name)
    # the RMSNorms of LLaMA, Qwen2 and T5 compute in float32 whatever the model's dtype
    tol = dict(rtol=1e-5, atol=1e-7) if name in ("llama", "qwen2", "t5") else {}
    _check(model, _hf_inputs(name, gen), mode, padding, **tol)


def _same_forward_reference(model, inputs: dict, seed: int):
    """Per-example gradients of one batched forward (its dropout masks), (B, P): the gradient
    of each example's loss through the batch's graph."""
    torch.manual_seed(seed)
    losses = _losses(model, inputs)
    params = _trainable(model)
    rows = []
    for i in range(B):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(_flat(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)))
    return torch.stack(rows)


def _with_dropout(name: str):
    if name == "vit":  # attention and projection dropout, drop-path
        vit = dict(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2)
        return timm.create_model(
            "vit_tiny_patch16_224", num_classes=3, drop_rate=0.2, attn_drop_rate=0.2,
            proj_drop_rate=0.2, drop_path_rate=0.3, **vit,
        )  # fmt: skip
    config = transformers.BertConfig(
        vocab_size=V, num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize("mode", ["auto", "per_example"])
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_dropout_in_train_mode_clips_the_batch_forwards_gradients(name, mode, gen):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _with_dropout(name).double().train()
    if name == "vit":
        inputs = dict(x=torch.randn(B, 3, 32, 32, generator=gen, dtype=torch.float64))
    else:
        inputs = _hf_inputs("bert", gen)
    expected, expected_sq = clipped_reference(
        _same_forward_reference(copy.deepcopy(model), inputs, seed), C
    )
    att = dpf.attach(model, clipping=mode, loss_reduction="sum")
    try:
        torch.manual_seed(seed)
        _losses(model, inputs).sum().backward()
        norm_sq = att.clip_and_accumulate(C)
        got = _flat(p.summed_grad for p in _trainable(model))
    finally:
        att.detach()
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(norm_sq.double(), expected_sq, rtol=1e-8, atol=1e-11)


def _clip():
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16,
        ),
        vision_config=dict(
            image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=8,
    )  # fmt: skip
    return transformers.CLIPModel(config)


def _clip_losses(model, inputs):
    """Each pair's own similarity (the diagonal of the (B, B) logits): per example, unlike a
    contrastive loss over the whole matrix (which the independence probe refuses)."""
    return model(**inputs).logits_per_image.diagonal().double().sin()


@pytest.mark.parametrize("mode", MODES)
def test_clip_with_its_root_owned_logit_scale_matches_per_example_autograd(mode, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _clip().double().train()
    ids = torch.randint(1, V, (B, 6), generator=gen)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(B, 3, 16, 16, generator=gen).double())
    per_example = _one_at_a_time(copy.deepcopy(model), inputs, B, _clip_losses)
    expected, expected_sq = clipped_reference(per_example, C)
    # the (B, B) logits compare every image with every text: the probe refuses such an output
    att = dpf.attach(model, clipping=mode, loss_reduction="sum", probe_coupling=False)
    try:
        if mode == "ghost":
            norm_sq = ghost_backward(att, _clip_losses(model, inputs), C)
        else:
            _clip_losses(model, inputs).sum().backward()
            norm_sq = att.clip_and_accumulate(C)
        got = _flat(
            torch.zeros_like(p) if p.summed_grad is None else p.summed_grad
            for p in _trainable(model)
        )
    finally:
        att.detach()
    assert "logit_scale" in {r["parameter"] for r in dpf.explain(model, kwargs=inputs).rows}
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(norm_sq.double(), expected_sq, rtol=1e-8, atol=1e-11)

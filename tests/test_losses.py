"""Per-example language-model losses (losses.py) and the guard against transformers' batch-wide
token mean: an example's clipped gradient must not move when another example's length does."""

import pytest
import torch
import torch.nn.functional as F

import torch_dpfast as dpf

transformers = pytest.importorskip("transformers")


def _loop_reference(logits, labels, shift):
    """(B,) losses by a per-example loop: each example's mean over its real tokens."""
    out = []
    for lg, lb in zip(logits, labels):
        if shift:
            lg, lb = lg[:-1], lb[1:]
        real = lb != -100
        out.append(F.cross_entropy(lg[real], lb[real], reduction="sum") / max(int(real.sum()), 1))
    return torch.stack(out)


@pytest.mark.parametrize("shift", [False, True])
def test_token_mean_loss_is_each_examples_own_mean(shift, gen):
    logits = torch.randn(4, 7, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 7), generator=gen)
    labels[1, 3:] = -100
    labels[2, :] = -100  # no real token: loss 0, not NaN
    loss = dpf.TokenMeanLoss(shift=shift, reduction="none")(logits, labels)
    torch.testing.assert_close(loss, _loop_reference(logits, labels, shift))
    assert loss[2] == 0
    mean = dpf.TokenMeanLoss(shift=shift)(logits, labels)
    torch.testing.assert_close(mean, loss.mean())
    assert dpf.CausalLMLoss(reduction="sum")(logits, labels) == pytest.approx(
        float(dpf.TokenMeanLoss(shift=True, reduction="sum")(logits, labels))
    )


def test_losses_refuse_bad_shapes_and_reductions():
    with pytest.raises(ValueError, match="reduction"):
        dpf.TokenMeanLoss(reduction="batchmean")
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        dpf.TokenMeanLoss()(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def _config(**extra):
    """A one-block GPT-2 configuration without dropout (exact comparisons)."""
    sizes = dict(vocab_size=11, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Config(**sizes, **no_dropout, **extra)


def _gpt2():
    return transformers.GPT2LMHeadModel(_config()).double()


def _norms(model, ids, mask, labels, hf_loss=False):
    att = dpf.attach(model, loss_reduction="mean")
    try:
        if hf_loss:  # transformers' own loss: the batch-wide token mean
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = dpf.CausalLMLoss()(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        return att.clip_and_accumulate(1e9)
    finally:
        att.detach()
        for p in model.parameters():
            p.summed_grad = None


def test_an_examples_gradient_does_not_depend_on_the_others_padding(gen):
    """The bug the guard exists for: with the batch-wide token mean, example 0's gradient norm
    moved (4.94 -> 6.18 in the report) when only example 1's padding changed."""
    torch.manual_seed(0)
    model = _gpt2()
    ids = torch.randint(0, 11, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    norms = []
    for length in (12, 5):
        mask[1, length:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        norms.append(_norms(model, ids, mask, labels)[0])
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-10, atol=0)


def test_token_labels_given_to_a_transformers_model_are_refused(gen):
    model = _gpt2()
    ids = torch.randint(0, 11, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="CausalLMLoss"):
        _norms(model, ids, mask, ids, hf_loss=True)


def test_per_example_labels_of_sequence_classification_are_allowed(gen):
    config = _config(pad_token_id=0)
    model = transformers.GPT2ForSequenceClassification(config).double()
    att = dpf.attach(model)
    try:
        ids = torch.randint(1, 11, (3, 8), generator=gen)
        model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
        att.clip_and_accumulate(1.0)
    finally:
        att.detach()


def test_ghost_mode_takes_the_token_mean_loss_as_its_criterion(gen):
    """make_private(criterion=CausalLMLoss()) in ghost mode: the criterion's per-example
    losses drive both passes; the result equals book-keeping's."""
    from torch_dpfast.ghost import DPCriterion, ghost_backward

    ids = torch.randint(0, 11, (3, 8), generator=gen)
    labels = ids.clone()
    labels[0, 5:] = -100
    sums = {}
    for mode in ("bk", "ghost"):
        torch.manual_seed(0)
        model = _gpt2()
        att = dpf.attach(model, clipping=mode)
        try:
            logits = model(input_ids=ids).logits
            if mode == "ghost":
                DPCriterion.check(dpf.CausalLMLoss())
                losses = dpf.CausalLMLoss(reduction="none")(logits, labels)
                ghost_backward(att, losses, 0.5)
            else:
                dpf.CausalLMLoss()(logits, labels).backward()
                att.clip_and_accumulate(0.5)
            sums[mode] = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
        finally:
            att.detach()
    torch.testing.assert_close(sums["ghost"], sums["bk"], rtol=1e-8, atol=1e-10)

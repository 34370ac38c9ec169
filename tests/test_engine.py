"""attach() + DPOptimizer against brute-force per-example autograd in float64, in every
implemented clipping mode: clipped sums, norms, the sensitivity bound, hard cases."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dpfast as dpf
from tests.helpers import clipped_reference
from torch_dpfast.ghost import ghost_backward

# "auto" on CPU materialises the linear layers (materialise_plan.py); "auto_fast" is auto with
# that turned off, so that its ghost/direct fast paths are checked too.
MODES = ["auto", "auto_fast", "bk", "per_example", "ghost"]


def _attach(model, mode, **kwargs):
    if mode == "auto_fast":
        return dpf.attach(model, clipping="auto", materialise_bytes=0, **kwargs)
    return dpf.attach(model, clipping=mode, **kwargs)


class ResidualCNN(nn.Module):
    """In-place ReLU and an in-place residual add after a conv, GroupNorm, reflect padding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.relu(self.norm(self.conv1(x)))
        out = self.conv2(h)
        out += h
        return self.head(self.relu(out).mean(dim=(2, 3)))


class TiedLM(nn.Module):
    """Embedding tied to the output layer, a layer called twice, LayerNorm and RMSNorm."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.rms = nn.RMSNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.ln(self.embed(ids))
        h = self.mix(torch.tanh(self.mix(h)))  # the same layer twice
        return self.out(self.rms(h)).mean(dim=1)


class AttentionLM(nn.Module):
    """Embedding + nn.MultiheadAttention (through the generic fallback) + LayerNorm, with a
    key padding mask, a causal attn_mask, bias_k/v and add_zero_attn, sequence-first."""

    def __init__(self, vocab=9, dim=8, batch_first=False, packed=False):
        super().__init__()
        self.batch_first = batch_first
        kdim, vdim = (dim, dim) if packed else (5, 6)  # packed in_proj_weight, or q/k/v weights
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(
            dim,
            2,
            bias=True,
            add_bias_kv=True,
            add_zero_attn=True,
            batch_first=batch_first,
            kdim=kdim,
            vdim=vdim,
        )
        self.to_k, self.to_v = nn.Linear(dim, kdim), nn.Linear(dim, vdim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, d)
        pad = ids == 0
        causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        k, v = self.to_k(h), self.to_v(h)  # linear layers take the batch first
        if not self.batch_first:
            h_seq, k, v = h.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q = h if self.batch_first else h_seq
        out, _ = self.attn(q, k, v, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(self.norm(out + h).mean(dim=1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))


def _timm_vit():
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=24,
        num_heads=2,
        depth=2,
        num_classes=4,
        init_values=0.1,
        reg_tokens=2,
    )


class RootOwned(nn.Module):
    """The root owns a parameter and has no rule: its forward is traced (the parameter's use
    gets per-example copies), its children keep their own rules."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x):
        return self.body(x * self.scale)


def _timm_vit_relpos():
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformerRelPos(
        img_size=16,
        patch_size=4,
        embed_dim=16,
        num_heads=2,
        depth=1,
        num_classes=4,
        rel_pos_type="bias",
        class_token=False,
        global_pool="avg",
    )


def _timm_groupnorm_resnet():
    import timm

    return timm.create_model(
        "resnet10t",
        pretrained=False,
        num_classes=4,
        norm_layer=lambda channels, **kwargs: nn.GroupNorm(2, channels),
    )


def _timm_bit():
    import functools

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1),
        channels=(32, 64),
        num_classes=4,
        stem_chs=16,
        norm_layer=functools.partial(GroupNormAct, num_groups=4),
    )


def _timm_swin(version: int):
    """Two Swin blocks on an 8 x 8 token grid with 4 x 4 windows: the second is shifted, so its
    attention mask indexes the 4 windows of each image (folded into dim 0, example-major)."""
    import timm

    name = "swin_tiny_patch4_window7_224" if version == 1 else "swinv2_tiny_window8_256"
    return timm.create_model(
        name,
        pretrained=False,
        img_size=16,
        patch_size=2,
        window_size=4,
        embed_dim=8,
        depths=(2,),
        num_heads=(2,),
        num_classes=4,
        drop_path_rate=0.0,  # stochastic depth draws differ between batched and looped runs
    )


CASES = {
    "mlp": (_mlp, lambda g: torch.randn(6, 5, generator=g, dtype=torch.float64), 3),
    "cnn": (ResidualCNN, lambda g: torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64), 5),
    "tied_lm": (TiedLM, lambda g: torch.randint(0, 11, (4, 7), generator=g), 11),
    "attention_lm": (AttentionLM, lambda g: torch.randint(1, 9, (3, 5), generator=g), 3),
    "attention_lm_packed": (
        lambda: AttentionLM(packed=True),
        lambda g: torch.randint(1, 9, (3, 5), generator=g),
        3,
    ),
    "attention_lm_square": (  # B == T: the shared (T, T) attn_mask must not be sliced
        lambda: AttentionLM(batch_first=True),
        lambda g: torch.randint(1, 9, (5, 5), generator=g),
        3,
    ),
    "attention_lm_batch_first": (
        lambda: AttentionLM(batch_first=True),
        lambda g: torch.randint(1, 9, (3, 5), generator=g),
        3,
    ),
    "timm_vit": (
        _timm_vit,
        lambda g: torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64),
        4,
    ),
    "timm_bit_resnetv2": (
        _timm_bit,
        lambda g: torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
        4,
    ),
    "root_fallback": (RootOwned, lambda g: torch.randn(4, 5, generator=g, dtype=torch.float64), 3),
    "timm_vit_relpos": (  # RelPosBias tables through their own rule
        _timm_vit_relpos,
        lambda g: torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64),
        4,
    ),
    "timm_swin": (
        lambda: _timm_swin(1),
        lambda g: torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64),
        4,
    ),
    "timm_swin_v2": (
        lambda: _timm_swin(2),
        lambda g: torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64),
        4,
    ),
    "timm_resnet_gn": (
        _timm_groupnorm_resnet,
        lambda g: torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64),
        4,
    ),
}


def _setup(name, gen):
    factory, make_x, classes = CASES[name]
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = factory().double()
    x = make_x(gen)
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    return model, x, y


def _per_example_grads(model, x, y):
    """(B, P) flattened per-example gradients of the per-example losses, by a loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([p.grad.flatten() for p in params]))
    return torch.stack(rows), params


def _clipped(per_example, max_norm, keep=None):
    norms = per_example.norm(dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    if keep is not None:
        factors = factors * keep
    return (factors[:, None] * per_example).sum(0), norms.square()


def _attached_sum(model, x, y, mode, max_norm, reduction="mean", mask=None):
    att = _attach(model, mode, loss_reduction=reduction)
    try:
        att.begin_batch(mask)
        if mode == "ghost":  # two passes over the per-example losses
            norm_sq = ghost_backward(att, F.cross_entropy(model(x), y, reduction="none"), max_norm)
            assert att.clip_and_accumulate(max_norm) is norm_sq
        else:
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            norm_sq = att.clip_and_accumulate(max_norm)
        params = [p for p in model.parameters() if p.requires_grad]
        summed = torch.cat([p.summed_grad.flatten() for p in params])
        assert all(p.grad is None for p in params)  # the weight-gradient GEMMs were skipped
    finally:
        att.detach()
        for p in model.parameters():
            p.summed_grad = None
    return summed, norm_sq


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipped_sum_and_norms_match_brute_force(name, mode, max_norm, gen):
    model, x, y = _setup(name, gen)
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, expected_norms = _clipped(per_example, max_norm)
    summed, norm_sq = _attached_sum(model, x, y, mode, max_norm)
    torch.testing.assert_close(norm_sq, expected_norms, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


class FoldsIntoBatch(nn.Module):
    """Folds two halves of each example into dim 0 around a position-wise layer (as OPT
    flattens its tokens): example-major (rows 2i, 2i + 1 are example i's) unless
    ``time_major``, which puts all first halves before all second halves."""

    def __init__(self, time_major=False):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(6, 2)
        self.time_major = time_major

    def forward(self, x):
        if self.time_major:
            halves = self.inner(x.reshape(-1, 2, 3).transpose(0, 1).reshape(-1, 3))
            return self.head(halves.reshape(2, -1, 3).transpose(0, 1).reshape(x.shape[0], 6))
        halves = self.inner(x.reshape(-1, 3))
        return self.head(halves.reshape(x.shape[0], 6))


@pytest.mark.parametrize("mode", MODES)
def test_rows_folded_example_major_into_a_position_wise_layer_are_exact(mode, gen):
    model = FoldsIntoBatch().double()
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    per_example, _ = _per_example_grads(model, x, y)
    model.zero_grad()
    expected, expected_sq = _clipped(per_example, 0.05)
    summed, norm_sq = _attached_sum(model, x, y, mode, 0.05, reduction="sum")
    torch.testing.assert_close(summed, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(norm_sq.double(), expected_sq, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_rows_folded_in_another_order_are_refused_by_the_probe(mode, gen):
    model = FoldsIntoBatch(time_major=True).double()
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="couples the examples.*'inner'"):
        _attached_sum(model, x, torch.tensor([0, 1, 0, 1]), mode, 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_removing_one_example_moves_the_sum_by_at_most_c(mode, gen):
    model, x, y = _setup("cnn", gen)
    x[2] *= 1e6  # an adversarially huge example
    max_norm = 0.5
    full, _ = _attached_sum(model, x, y, mode, max_norm, reduction="sum")
    for k in range(x.shape[0]):
        keep = [i for i in range(x.shape[0]) if i != k]
        without, _ = _attached_sum(model, x[keep], y[keep], mode, max_norm, reduction="sum")
        assert (full - without).norm() <= max_norm * (1 + 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_examples_get_factor_zero_and_a_warning(mode, gen):
    model, x, y = _setup("mlp", gen)
    x[1, 0] = float("nan")
    x[4, 2] = float("inf")
    keep = torch.ones(x.shape[0], dtype=torch.float64)
    keep[[1, 4]] = 0
    clean = x.clone()
    clean[[1, 4]] = 0
    per_example, _ = _per_example_grads(copy.deepcopy(model), clean, y)
    expected, _ = _clipped(per_example, 1.0, keep)
    with pytest.warns(RuntimeWarning, match="2 example"):
        summed, _ = _attached_sum(model, x, y, mode, 1.0, reduction="sum")
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_masked_rows_contribute_nothing(mode, gen):
    model, x, y = _setup("tied_lm", gen)
    mask = torch.tensor([True, False, True, False])
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, _ = _clipped(per_example, 0.3, mask.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summed, _ = _attached_sum(model, x, y, mode, 0.3, reduction="sum", mask=mask)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "name", ["mlp", "cnn", "tied_lm", "attention_lm", "timm_vit", "timm_bit_resnetv2"]
)
@pytest.mark.parametrize("mode", MODES)
def test_trailing_padding_rows_are_skipped_exactly(name, mode, gen):
    """The padding of a physical batch (its last rows, masked out) is left out of the fast
    paths' norms and sums altogether: the result equals brute force over the real rows, and
    NaN/Inf planted in the padding rows' inputs never show."""
    model, x, y = _setup(name, gen)
    batch = x.shape[0]
    mask = torch.arange(batch) < batch - 2
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, expected_norms = _clipped(per_example, 0.3, mask.double())
    if x.is_floating_point():
        x[-2:] = torch.tensor([float("nan"), float("inf")], dtype=x.dtype).view(
            2, *[1] * (x.dim() - 1)
        )
    summed, norm_sq = _attached_sum(model, x, y, mode, 0.3, reduction="sum", mask=mask)
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(norm_sq[mask], expected_norms[mask], rtol=1e-8, atol=1e-10)


class KeptOutputs(nn.Module):
    """StdConv -> GroupNormAct(ReLU) -> StdConv, whose rules read the layers' kept outputs;
    ``in_place`` changes the first conv's output in place after the layer returned it (the
    kept output then no longer is what the layer computed); ``self.kept`` is the last conv's
    output (a detached view: same storage and version counter)."""

    def __init__(self, in_place=False):
        super().__init__()
        from timm.layers import GroupNormAct, StdConv2d

        self.conv1 = StdConv2d(3, 4, 3, padding=1)
        self.norm = GroupNormAct(4, num_groups=2)
        self.conv2 = StdConv2d(4, 6, 1, bias=True)
        self.head = nn.Linear(6, 3)
        self.in_place = in_place

    def forward(self, x):
        h = self.conv1(x)
        if self.in_place:
            h.mul_(1.5).add_(0.25)
        z = self.conv2(self.norm(h))
        self.kept = z.detach()
        return self.head(z.mean(dim=(2, 3)))


def _kept_outputs_setup(gen, in_place=False):
    pytest.importorskip("timm")
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = KeptOutputs(in_place).double()
    x = torch.randn(4, 3, 6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_place", [False, True])
def test_rules_reading_kept_outputs_are_exact(mode, in_place, gen):
    """StdConv and GroupNormAct read the layers' outputs where those are intact (the records
    hold (input, output)) and recompute where the model changed them in place; exact both
    ways."""
    model, x, y = _kept_outputs_setup(gen, in_place)
    att = _attach(model, "bk")
    F.cross_entropy(model(x), y).backward()
    with_output = {r.module: isinstance(r.x, tuple) for r in att.recorded()}
    att.detach()
    assert with_output == {
        model.conv1: not in_place,
        model.norm: True,
        model.conv2: True,
        model.head: False,
    }
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, expected_norms = _clipped(per_example, 0.2)
    summed, norm_sq = _attached_sum(model, x, y, mode, 0.2)
    torch.testing.assert_close(norm_sq, expected_norms, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["auto", "bk"])  # the modes that read conv2's output
def test_an_output_changed_between_backward_and_clip_is_not_read(mode, gen):
    """Misuse: the model's activation is changed in place after the backward recorded it; the
    clip sees that its version moved and recomputes instead of reading it."""
    model, x, y = _kept_outputs_setup(gen)
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, expected_norms = _clipped(per_example, 0.2)
    att = _attach(model, mode)
    try:
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model.kept.mul_(0.5)
        norm_sq = att.clip_and_accumulate(0.2)
        summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    finally:
        att.detach()
    torch.testing.assert_close(norm_sq, expected_norms, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


def _training_flops(model, x, y, mask):
    """Multiply-adds x 2 of one forward and backward (not the clipping) under ``mask``."""
    from torch.utils.flop_counter import FlopCounterMode

    att = dpf.attach(model, clipping="bk", probe_coupling=False)  # counts one forward only
    try:
        att.begin_batch(mask)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
        return counter.get_total_flops()
    finally:
        att.detach()


@pytest.mark.parametrize("padding", [2, "all"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_captured_layers_compute_only_the_real_rows_of_a_padded_batch(name, padding, gen):
    """Every multiply-add of these models is in a captured layer, so the forward and backward
    of a batch whose last rows are padding cost exactly kept / B of the whole batch's, and of
    an all-masked batch 1 / B (row 0 stands for all)."""
    model, x, y = _setup(name, gen)
    batch = x.shape[0]
    kept = 0 if padding == "all" else batch - padding
    whole = _training_flops(model, x, y, None)
    trimmed = _training_flops(model, x, y, torch.arange(batch) < kept)
    assert whole > 0
    assert trimmed == pytest.approx(whole * max(kept, 1) / batch, rel=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "tied_lm",
        "attention_lm",  # nn.MultiheadAttention's q/k/v projections in one capture
        "attention_lm_packed",
        "attention_lm_square",
        "timm_vit",
        "timm_vit_relpos",
        "timm_bit_resnetv2",
        "timm_swin",  # window attention's B * W rows are not the batch: computed whole
    ],
)
def test_padded_forward_gives_the_real_rows_outputs_and_copies_of_row_0(name, gen):
    """Captured layers skip the padding rows and fill their outputs with copies of row 0's:
    the real rows' outputs are the model's own; with the padding the sampler makes (copies of
    the batch's first row) every row, so the loss too, is what the model alone computes; NaN
    or Inf in the padding rows never shows."""
    model, x, y = _setup(name, gen)
    plain = copy.deepcopy(model)
    batch = x.shape[0]
    kept = max(1, batch - 2)
    mask = torch.arange(batch) < kept
    x[kept:] = x[0]
    expected = plain(x)
    att = dpf.attach(model, clipping="auto")
    try:
        att.begin_batch(mask)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        att.discard()
        if x.is_floating_point():
            x[kept:] = float("nan")
            att.begin_batch(mask)
            out = model(x)
            torch.testing.assert_close(out[:kept], expected[:kept], rtol=1e-12, atol=1e-12)
            assert torch.isfinite(out).all()
    finally:
        att.detach()


@pytest.mark.parametrize("name", ["attention_lm", "attention_lm_square"])
def test_attention_projections_compute_only_the_real_rows(name, gen, monkeypatch):
    from torch_dpfast.rules.attention import MultiheadAttentionRule

    seen = []
    project = MultiheadAttentionRule.project

    def recording(self, module, *xs):
        seen.append([x.shape[0] for x in xs])
        return project(self, module, *xs)

    monkeypatch.setattr(MultiheadAttentionRule, "project", recording)
    model, x, y = _setup(name, gen)
    kept = x.shape[0] - 1
    att = dpf.attach(model, clipping="auto")
    try:
        att.begin_batch(torch.arange(x.shape[0]) < kept)
        F.cross_entropy(model(x), y).backward()
        assert seen == [[kept] * 3]
        att.clip_and_accumulate(1.0)
        model(x)
        assert seen[-1] == [x.shape[0]] * 3
    finally:
        att.detach()


def test_a_captured_layer_that_loses_the_batch_dim_is_refused_when_rows_are_skipped(gen):
    from torch_dpfast.rules import register_rule
    from torch_dpfast.rules.linear import LinearRule

    class PooledLinear(nn.Linear):  # pools the batch away: not per-example, but registered
        def forward(self, x):
            return super().forward(x).mean(0, keepdim=True).expand(4, -1)

    register_rule(PooledLinear)(type("PooledLinearRule", (LinearRule,), {}))
    model = PooledLinear(3, 2).double()
    att = dpf.attach(model, clipping="auto", probe_coupling=False)  # the probe refuses it too
    try:
        att.begin_batch(torch.arange(4) < 3)
        with pytest.raises(ValueError, match="PooledLinear turned an input of 3 examples"):
            model(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    finally:
        att.detach()


def test_rows_are_computed_whole_again_once_the_batch_is_clipped(gen):
    model, x, y = _setup("mlp", gen)
    plain = copy.deepcopy(model)
    att = dpf.attach(model, clipping="auto")
    try:
        att.begin_batch(torch.arange(x.shape[0]) < 2)
        F.cross_entropy(model(x), y).backward()
        att.clip_and_accumulate(1.0)
        other = torch.randn(x.shape, generator=gen, dtype=x.dtype)  # same size, all rows real
        torch.testing.assert_close(model(other), plain(other), rtol=1e-12, atol=1e-12)
    finally:
        att.detach()


def test_kept_prefix_finds_trailing_padding_only():
    from torch_dpfast.records import kept_prefix

    as_mask = lambda bits: torch.tensor(bits, dtype=torch.bool)  # noqa: E731
    assert kept_prefix(as_mask([1, 1, 1, 0, 0]), 5) == 3
    assert kept_prefix(as_mask([1, 0, 1, 0, 0]), 5) == 5  # a hole: no cut
    assert kept_prefix(as_mask([0, 0, 0]), 3) == 3  # an empty logical batch: no cut
    assert kept_prefix(as_mask([1, 1]), 2) == 2
    assert kept_prefix(None, 4) == 4


def test_fast_paths_see_only_the_real_rows(monkeypatch, gen):
    from torch_dpfast import materialise_plan

    monkeypatch.setattr(materialise_plan, "FAST_PATH_CALL_MACS", 0)  # small layers' fast paths
    model, x, y = _setup("mlp", gen)
    seen = []
    original = dpf.ops.linear_norm_sq

    def spy(a, g, *args, **kwargs):
        seen.append(a.shape[0])
        return original(a, g, *args, **kwargs)

    monkeypatch.setattr(dpf.ops, "linear_norm_sq", spy)
    mask = torch.arange(x.shape[0]) < 4
    _attached_sum(model, x, y, "auto", 1.0, reduction="sum", mask=mask)
    assert seen and set(seen) == {4}


def test_mean_and_sum_reductions_agree(gen):
    model, x, y = _setup("mlp", gen)
    mean_sum, mean_norms = _attached_sum(model, x, y, "auto", 0.2, reduction="mean")
    sum_sum, sum_norms = _attached_sum(model, x, y, "auto", 0.2, reduction="sum")
    torch.testing.assert_close(mean_sum, sum_sum)
    torch.testing.assert_close(mean_norms, sum_norms)


def test_frozen_parameters_are_left_alone(gen):
    model, x, y = _setup("mlp", gen)
    model[0].weight.requires_grad_(False)
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, _ = _clipped(per_example, 0.1)
    summed, _ = _attached_sum(model, x, y, "auto", 0.1)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)
    assert not hasattr(model[0].weight, "summed_grad") or model[0].weight.summed_grad is None


def test_bf16_autocast_matches_float64_within_bf16_error(gen):
    """Under bf16 autocast our per-example norms and clipped sum are within twice PyTorch's own
    error (per-example autograd under the same autocast) or 2^-6 relative, whichever is larger:
    on a model this small a single draw's bf16 rounding varies too much for the 2x rule alone."""
    model, x, y = _setup("mlp", gen)
    per_example, _ = _per_example_grads(copy.deepcopy(model), x, y)
    expected, expected_norms = _clipped(per_example, 0.5)
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_per_example, _ = _per_example_grads(copy.deepcopy(model), x.float(), y)
    torch_sum, torch_norms = _clipped(torch_per_example.double(), 0.5)
    att = dpf.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.float()), y)
    loss.backward()
    norm_sq = att.clip_and_accumulate(0.5)
    att.detach()
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    assert norm_sq.dtype == torch.float32 and torch.isfinite(summed).all()

    def error(a, b):
        return (a.double() - b).norm().item()

    def bound(reference, truth):
        return max(2 * error(reference, truth), 2**-6 * truth.norm().item())

    assert error(norm_sq, expected_norms) <= bound(torch_norms, expected_norms)
    assert error(summed, expected) <= bound(torch_sum, expected)


def test_attach_refuses_what_it_cannot_make_private():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(NotImplementedError, match=r"'1' \(BatchNorm1d\) is a BatchNorm"):
        dpf.attach(model)
    with pytest.raises(ValueError, match="clipping must be one of"):
        dpf.attach(nn.Linear(2, 2), clipping="fast")
    with pytest.raises(ValueError, match="loss_reduction"):
        dpf.attach(nn.Linear(2, 2), loss_reduction="max")
    model = nn.Linear(2, 2)
    att = dpf.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        dpf.attach(model)
    att.detach()
    assert "forward" not in model.__dict__
    dpf.attach(model).detach()


# ------------------------------------------------------------------ DPOptimizer


def _sgd_setup(gen, sigma=0.0, ebs=10):
    model, x, y = _setup("mlp", gen)
    reference = copy.deepcopy(model)
    att = dpf.attach(model)
    opt = dpf.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=0.3,
        expected_batch_size=ebs,
    )
    return model, reference, att, opt, x, y


def test_step_applies_the_clipped_sum_over_the_expected_batch_size(gen):
    model, reference, att, opt, x, y = _sgd_setup(gen)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    per_example, _ = _per_example_grads(reference, x, y)
    expected, _ = _clipped(per_example, 0.3)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(before - after, expected / 10, rtol=1e-8, atol=1e-12)
    att.detach()


def test_virtual_steps_accumulate_until_the_logical_batch_ends(gen):
    model, reference, att, opt, x, y = _sgd_setup(gen)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    per_example, _ = _per_example_grads(reference, x, y)
    expected, _ = _clipped(per_example, 0.3)
    for part, last in ((slice(0, 4), False), (slice(4, 6), True)):
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.signal_skip_step(not last)
        opt.step()
        if not last:  # nothing moved yet
            now = torch.cat([p.detach().flatten() for p in model.parameters()])
            assert torch.equal(now, before)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(before - after, expected / 10, rtol=1e-8, atol=1e-12)
    att.detach()


def test_noise_has_std_sigma_c_over_expected_batch_size(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = nn.Linear(200, 150).double()
    att = dpf.attach(model)
    opt = dpf.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        generator=gen,
    )
    before = model.weight.detach().clone()
    opt.zero_grad()
    opt.step()  # an empty logical batch: noise only, and the step still happens
    update = (before - model.weight.detach()).flatten()
    n = update.numel()
    assert abs(update.mean().item()) < 5.5 * 0.25 / math.sqrt(n)
    assert abs(update.std().item() / 0.25 - 1) < 5.5 * math.sqrt(0.5 / n)
    att.detach()


def test_optimizer_refuses_unattached_parameters_and_bad_arguments():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        dpf.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), -1.0, 1.0, 4)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dpf.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 0.0, 4)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dpf.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 0)
    opt = dpf.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 4)
    with pytest.raises(RuntimeError, match="not covered by torch_dpfast.attach"):
        opt.step()


def test_schedulers_state_dict_and_param_groups_keep_working(gen):
    model, _, att, opt, x, y = _sgd_setup(gen)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.25
    state = opt.state_dict()
    fresh = dpf.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 0.0, 0.3, 10)
    fresh.load_state_dict(state)
    assert fresh.steps_taken == 2 and fresh.param_groups[0]["lr"] == 0.25
    att.detach()


def test_a_parameter_used_outside_its_layer_is_an_error(gen):
    class DirectTie(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, ids):  # the output layer reads the table directly: not capturable
            return F.linear(self.mix(self.embed(ids)), self.embed.weight).mean(dim=1)

    model = DirectTie().double()
    att = dpf.attach(model)
    ids = torch.randint(0, 7, (3, 5), generator=gen)
    F.cross_entropy(model(ids), torch.tensor([1, 2, 3])).backward()
    with pytest.raises(RuntimeError, match=r"\['embed.weight'\] received an ordinary"):
        att.clip_and_accumulate(1.0)
    att.detach()


class _BatchCentred(nn.Module):
    """No rule (traced); every example sees the others through the batch mean."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, x):
        return (x - x.mean(dim=0)) * self.weight


def test_a_traced_module_that_couples_examples_is_refused_by_the_probe():
    model = nn.Sequential(_BatchCentred(), nn.Linear(4, 2)).double()
    att = dpf.attach(model)
    with pytest.raises(RuntimeError, match="couples the examples of a batch"):
        model(torch.randn(5, 4, dtype=torch.float64))
    att.detach()


class _TwoOutputs(nn.Module):
    """No rule (traced): two outputs, both computed from the parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, x):
        y = x * self.weight
        return y, y.sum(dim=-1)


def test_a_traced_module_is_clipped_through_all_its_outputs(gen):
    module = _TwoOutputs()
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def losses(m, rows):
        out, aux = m(rows)
        return out.sin().sum(dim=1) + aux.cos()

    per_example = []
    for i in range(3):
        module.zero_grad()
        losses(module, x[i : i + 1]).sum().backward()
        per_example.append(module.weight.grad.clone())
    expected, expected_sq = clipped_reference(torch.stack(per_example), 0.3)
    att = dpf.attach(module, loss_reduction="sum")
    losses(module, x).sum().backward()
    norm_sq = att.clip_and_accumulate(0.3)
    att.detach()
    torch.testing.assert_close(module.weight.summed_grad, expected)
    torch.testing.assert_close(norm_sq, expected_sq)


MHA_CONFIGS = {
    "plain": dict(),
    "packed_bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim_sequence_first": dict(kdim=3, vdim=5, batch_first=False, add_bias_kv=True),
    "no_bias": dict(bias=False),
}


def _mha_inputs(config, gen, batch=3, length=4, source=6):
    first = config.get("batch_first", True)
    shape = (lambda t, d: (batch, t, d)) if first else (lambda t, d: (t, batch, d))
    q = torch.randn(*shape(length, 8), generator=gen, dtype=torch.float64)
    k = torch.randn(*shape(source, config.get("kdim", 8)), generator=gen, dtype=torch.float64)
    v = torch.randn(*shape(source, config.get("vdim", 8)), generator=gen, dtype=torch.float64)
    pad = torch.zeros(batch, source, dtype=torch.bool)
    pad[0, -2:] = True
    return q, k, v, pad


@pytest.mark.parametrize("config", MHA_CONFIGS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool2d", "float3d"])
def test_attention_rule_forward_matches_torch(config, need_weights, mask_kind, gen):
    kwargs = dict(MHA_CONFIGS[config])
    first = kwargs.pop("batch_first", True)
    mha = nn.MultiheadAttention(8, 2, batch_first=first, **kwargs).double()
    q, k, v, pad = _mha_inputs(MHA_CONFIGS[config], gen)
    mask = None
    if mask_kind == "bool2d":
        mask = torch.rand(4, 6, generator=gen) > 0.7
        mask[:, 0] = False
    elif mask_kind == "float3d":
        mask = torch.randn(3 * 2, 4, 6, generator=gen, dtype=torch.float64)
    call = dict(key_padding_mask=pad, attn_mask=mask, need_weights=need_weights)
    expected = mha(q, k, v, average_attn_weights=False, **call)
    att = dpf.attach(mha)
    try:
        with torch.enable_grad():
            got = mha(q, k, v, average_attn_weights=False, **call)
    finally:
        att.detach()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)
    else:
        assert got[1] is None and expected[1] is None


@pytest.mark.parametrize("mode", MODES)
def test_attention_rule_is_exact_through_the_attention_weights(mode, gen):
    """Gradients that flow through the returned attention weights (which the fallback had to
    refuse) are clipped exactly: against a per-example loop on an unattached copy."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True).double()
    reference = copy.deepcopy(mha)
    q, k, v, pad = _mha_inputs({}, gen)

    def losses(module, q, k, v, pad):
        out, weights = module(q, k, v, key_padding_mask=pad)
        return out.square().sum(dim=(1, 2)) + 3 * weights.square().sum(dim=(1, 2))

    params = [p for p in reference.parameters()]
    rows = []
    for i in range(q.shape[0]):
        loss = losses(reference, q[i : i + 1], k[i : i + 1], v[i : i + 1], pad[i : i + 1]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    expected, _ = _clipped(torch.stack(rows), 0.3)
    att = _attach(mha, mode, loss_reduction="sum")
    try:
        per_example = losses(mha, q, k, v, pad)
        if mode == "ghost":
            ghost_backward(att, per_example, 0.3)
        else:
            per_example.sum().backward()
            att.clip_and_accumulate(0.3)
        summed = torch.cat([p.summed_grad.flatten() for p in mha.parameters()])
    finally:
        att.detach()
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


def test_explain_reports_the_rules_and_the_fallback():
    rows = {r["parameter"]: r for r in dpf.explain(AttentionLM(), torch.randint(1, 9, (2, 5))).rows}
    assert rows["attn.in_proj_bias"]["rule"] == "MultiheadAttentionRule"
    assert "fused attention" in rows["attn.q_proj_weight"]["method"]
    assert rows["attn.out_proj.weight"]["rule"] == "LinearRule"  # called as a module
    assert rows["to_k.weight"]["rule"] == "LinearRule"
    pytest.importorskip("timm")
    rows = dpf.explain(_timm_vit_relpos(), torch.randn(1, 3, 16, 16)).rows
    rules = {r["parameter"]: r["rule"] for r in rows}
    assert rules["blocks.0.attn.rel_pos.relative_position_bias_table"] == "GatheredBiasRule"
    assert "FallbackRule" not in rules.values()
    rows = {r["parameter"]: r for r in dpf.explain(RootOwned(), torch.randn(2, 5)).rows}
    assert rows["scale"]["rule"] == "TracedRule"
    assert rows["scale"]["method"] == "per-example copies (mul)"
    assert rows["body.0.weight"]["rule"] == "LinearRule"  # a child keeps its rule
    rows = dpf.explain(
        nn.Sequential(nn.Linear(4, 4).double(), _TwoOutputs()), torch.randn(2, 4).double()
    ).rows
    assert {r["rule"] for r in rows} == {"LinearRule", "TracedRule"}


def test_relpos_attention_takes_its_unfused_path_only_while_attached():
    pytest.importorskip("timm")
    model = _timm_vit_relpos()
    attention = model.blocks[0].attn
    fused = attention.fused_attn
    att = dpf.attach(model)
    assert attention.fused_attn is False
    att.detach()
    assert attention.fused_attn == fused

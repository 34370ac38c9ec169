"""torch_dpfast/clippers/: one clipper per mode (their results against brute force are in
test_engine.py, parametrised over every mode); here what each clipper owns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dpfast as dpf
from torch_dpfast.clippers import CLIPPING_MODES, BookKeeping, Ghost, PerExample, make_clipper


def test_each_mode_has_its_clipper():
    kinds = {mode: type(make_clipper(mode)) for mode in CLIPPING_MODES}
    assert kinds == {"auto": BookKeeping, "bk": BookKeeping, "per_example": PerExample,
                     "ghost": Ghost}  # fmt: skip
    assert make_clipper("auto").norm_method == "auto"
    assert make_clipper("bk").norm_method == "ghost"
    with pytest.raises(ValueError, match="clipping must be one of"):
        make_clipper("flat")


def test_attachments_do_not_share_workspaces(gen):
    """auto's materialised buffers are reused between batches of one attachment only, and
    released when it is detached."""
    models = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(192, 2))
              for _ in range(2)]  # fmt: skip
    attachments = [dpf.attach(m) for m in models]
    assert attachments[0].clipper is not attachments[1].clipper
    x = torch.randn(3, 2, 8, 8, generator=gen)  # 64 positions: worth materialising
    try:
        for model, att in zip(models, attachments):
            F.cross_entropy(model(x), torch.tensor([0, 1, 0])).backward()
            att.clip_and_accumulate(1.0)
        held = [set(att.clipper.workspace) for att in attachments]
        assert held[0] and held[1] and held[0].isdisjoint(held[1])
    finally:
        for att in attachments:
            att.detach()
    assert not attachments[0].clipper.workspace


def test_ghost_refuses_a_plain_backward(gen):
    model = nn.Linear(3, 2)
    att = dpf.attach(model, clipping="ghost")
    try:
        F.cross_entropy(model(torch.randn(4, 3, generator=gen)), torch.zeros(4).long()).backward()
        with pytest.raises(RuntimeError, match="two backward passes"):
            att.clip_and_accumulate(1.0)
    finally:
        att.detach()

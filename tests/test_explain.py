"""dpf.explain: the per-parameter plan, and clear refusals of what cannot be made private."""

import pytest
import torch
from torch import nn

import torch_dpfast as dpf


def test_explain_lists_every_parameter_with_rule_and_method():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    plan = dpf.explain(model, torch.randn(2, 3, 8, 8), materialise_bytes=0)
    rows = {r["parameter"]: r for r in plan.rows}
    assert set(rows) == {n for n, _ in model.named_parameters()}
    assert rows["0.weight"]["rule"] == "ConvRule" and rows["0.weight"]["method"] == "direct"
    assert rows["0.weight"]["macs"] == 64 * 27 * 16  # T * d_in * d_out
    assert rows["4.weight"]["method"] == "ghost"  # T = 1
    assert rows["1.weight"]["method"] == "materialised"
    text = str(plan)
    assert "GroupNormRule" in text and "MACs/example" in text
    on_cpu = {r["parameter"]: r for r in dpf.explain(model, torch.randn(2, 3, 8, 8)).rows}
    assert on_cpu["0.weight"]["method"] == "materialised"  # T = 64: worth it (materialise_plan)
    assert on_cpu["0.weight"]["macs"] == 16 * 27 + 16  # its sum of squares
    # T = 1: its ghost norm is cheap, but the fast path's fixed cost per layer is not
    assert on_cpu["4.weight"]["method"] == "materialised"
    per_example = dpf.explain(model, torch.randn(2, 3, 8, 8), clipping="per_example")
    assert {r["method"] for r in per_example.rows} == {"materialised"}


def test_explain_reports_layers_the_forward_does_not_reach():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    rows = {r["parameter"]: r for r in dpf.explain(Partial(), torch.randn(1, 3)).rows}
    assert rows["unused.weight"]["method"] == "not reached by the forward"


def test_batch_norm_is_rejected_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(NotImplementedError, match="Replace it with GroupNorm or LayerNorm"):
        dpf.explain(model, torch.randn(2, 3))
    # frozen but still normalising with batch statistics: refused when clipping
    model[1].requires_grad_(False)
    att = dpf.attach(model)
    with pytest.raises(ValueError, match="normalises with batch statistics"):
        model(torch.randn(4, 3))  # the first forward's independence probe
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="normalises with batch statistics"):
        att.clip_and_accumulate(1.0)
    model[1].eval()  # running statistics only: allowed
    model(torch.randn(4, 3)).sum().backward()
    att.clip_and_accumulate(1.0)
    att.detach()

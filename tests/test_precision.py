"""The precision switch drives torch's TF32 flags and restores them."""

import pytest
import torch

import torch_dpfast as dpf


@pytest.fixture(autouse=True)
def _restore_flags():
    saved = (
        dpf.get_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    dpf.set_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


@pytest.mark.parametrize("name,tf32", [("ieee", False), ("tf32", True), ("bf16", True)])
def test_set_precision_sets_torch_flags(name, tf32):
    dpf.set_precision(name)
    assert dpf.get_precision() == name
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32


def test_context_manager_restores_everything():
    dpf.set_precision("ieee")
    torch.backends.cudnn.allow_tf32 = True  # a user's own setting survives the context
    with dpf.precision("tf32"):
        assert dpf.get_precision() == "tf32" and torch.backends.cuda.matmul.allow_tf32
    assert dpf.get_precision() == "ieee"
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        dpf.set_precision("fp8")

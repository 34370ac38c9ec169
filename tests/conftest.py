"""Shared fixtures. Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here,
before torch_dpfast is imported, whenever no GPU is present."""

import os
import secrets

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator with a fresh random seed, printed so that a failure can be replayed:
    DPFAST_TEST_SEED=<seed> pytest <nodeid> runs it again with that seed."""
    seed = int(os.environ.get("DPFAST_TEST_SEED") or secrets.randbits(63))
    print(f"{request.node.nodeid}: seed {seed}")
    return torch.Generator().manual_seed(seed)

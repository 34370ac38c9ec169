"""Training-loop idioms that used to train silently on noise, release partial sums or merge
examples, and samplers that used to be replaced silently: each now works or is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import torch_dpfast as dpf


def _data(gen, n=24):
    return TensorDataset(torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _private(dataset, loader_kwargs=None, **kwargs):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    kwargs.setdefault("noise_multiplier", 0.0)
    kwargs.setdefault("max_grad_norm", 0.5)
    engine = dpf.PrivacyEngine()
    loader = DataLoader(dataset, **(loader_kwargs or {"batch_size": 8}))
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        **kwargs,
    )
    return engine, model, optimizer, loader


@pytest.mark.parametrize("clipping", ["auto", "bk", "per_example"])
def test_zero_grad_between_forward_and_backward_trains_as_the_usual_order(clipping, gen):
    """forward -> zero_grad -> backward -> step (a common tutorial order) used to drop the
    captured activations: the model trained on noise only."""
    dataset = _data(gen)
    results = []
    for order in ("usual", "zero_grad after forward"):
        torch.manual_seed(11)
        engine, model, optimizer, loader = _private(
            dataset, clipping=clipping, physical_batch_size=4
        )
        for x, y in loader:
            if order == "usual":
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(p, q) for p, q in zip(results[1], _initial()))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _initial():
    torch.manual_seed(7)
    return list(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).parameters())


def test_a_second_step_for_one_physical_batch_is_refused(gen):
    engine, model, optimizer, loader = _private(_data(gen), physical_batch_size=4)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    steps = len(engine.accountant)
    with pytest.raises(RuntimeError, match="twice for one physical batch"):
        optimizer.step()
    assert len(engine.accountant) == steps


def test_accumulating_two_backward_calls_without_poisson_batches_is_refused(gen):
    """poisson_sampling=False: two batches' gradients before one step used to be merged row by
    row (example i of each batch clipped together: sensitivity 2C)."""
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        engine, model, optimizer, loader = _private(_data(gen), poisson_sampling=False)
    batches = iter(loader)
    optimizer.zero_grad()
    for _ in range(2):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="several backward"):
        optimizer.step()


def test_opacus_batch_memory_manager_is_refused_with_the_replacement(gen):
    bmm = pytest.importorskip("opacus.utils.batch_memory_manager")
    engine, model, optimizer, loader = _private(_data(gen))
    with pytest.raises(RuntimeError, match="physical_batch_size="):
        with bmm.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=2, optimizer=optimizer
        ) as split:
            for x, y in split:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()


@pytest.mark.parametrize("kind", ["subset", "weighted", "batch_sampler", "with_replacement"])
def test_a_user_sampler_is_refused_not_replaced(kind, gen):
    dataset = _data(gen)
    samplers = {
        "subset": {"batch_size": 4, "sampler": SubsetRandomSampler(range(12))},
        "weighted": {"batch_size": 4, "sampler": WeightedRandomSampler([1.0] * 24, 24)},
        "batch_sampler": {
            "batch_sampler": BatchSampler(SubsetRandomSampler(range(12)), 4, drop_last=False)
        },
        "with_replacement": {
            "batch_size": 4,
            "sampler": RandomSampler(dataset, replacement=True),
        },
    }
    with pytest.raises(ValueError, match="Subset"):
        _private(dataset, samplers[kind])


def test_stock_samplers_are_replaced_by_poisson_sampling(gen):
    dataset = _data(gen)
    for kwargs in ({"batch_size": 4}, {"batch_size": 4, "shuffle": True}):
        engine, *_ = _private(dataset, kwargs)
        assert engine.sample_rate == 4 / 24
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        _private(
            dataset,
            {"batch_size": 4, "sampler": SubsetRandomSampler(range(12))},
            poisson_sampling=False,
        )


def test_one_backward_of_a_model_with_per_example_parameter_leaves_is_one_pass(gen):
    """A ViT's cls_token/pos_embed capture records no backward of its own: a custom loop's
    single backward must not count as several."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3
    )
    attachment = dpf.attach(model, clipping="bk")
    try:
        x = torch.randn(3, 3, 32, 32, generator=gen)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
        assert attachment.clip_and_accumulate(1.0).shape == (3,)
    finally:
        attachment.detach()

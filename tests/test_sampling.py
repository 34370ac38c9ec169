"""Poisson sampling and fixed-shape physical batches (sampling.py, data_loader.py).

The statistical tests use fixed seeds and bounds of 5 standard deviations (Bonferroni-corrected
where many quantities are checked at once), so they are deterministic and a correct sampler
passes them, while a shuffling sampler (variance 0) or a wrong rate fails them by far.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from torch_dpfast.data_loader import DPDataLoader
from torch_dpfast.random_source import RandomSource
from torch_dpfast.sampling import PoissonBatchSampler


def _logical_batches(num_samples, q, steps, seed, physical_batch_size=None, padding="full"):
    """[(indices of the real rows)] per logical step, gathered from the physical batches."""
    sampler = PoissonBatchSampler(
        num_samples, q, steps, physical_batch_size, RandomSource(seed), padding=padding
    )
    out, queue = [], None
    it = iter(sampler)
    queue = sampler.latest_queue
    for rows in it:
        info = queue.popleft()
        if info.first:
            out.append([])
        out[-1] += [r for r, keep in zip(rows, info.mask.tolist()) if keep]
    return out


def test_logical_batch_sizes_are_binomial():
    n, q, steps = 1000, 0.05, 2000
    sizes = torch.tensor(
        [len(b) for b in _logical_batches(n, q, steps, seed=1)], dtype=torch.float64
    )
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    # The sample variance has standard deviation about var * sqrt(2 / (steps - 1)).
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (steps - 1))


def test_each_example_is_included_with_probability_q_independently():
    n, q, steps = 40, 0.2, 4000
    counts = torch.zeros(n)
    pair = 0
    for batch in _logical_batches(n, q, steps, seed=2, physical_batch_size=3):
        assert len(set(batch)) == len(batch)  # no example twice in one logical batch
        counts[batch] += 1
        pair += 0 in batch and 1 in batch
    # Bonferroni over 40 examples: 5.5 standard deviations.
    assert (counts - steps * q).abs().max() < 5.5 * math.sqrt(steps * q * (1 - q))
    # Independence: examples 0 and 1 are together with probability q^2.
    assert abs(pair - steps * q * q) < 5 * math.sqrt(steps * q * q * (1 - q * q))


@pytest.mark.parametrize("physical_batch_size", [1, 4, 7])
def test_physical_batches_have_one_shape_and_cover_the_sample(physical_batch_size):
    n, q, steps = 30, 0.2, 60
    sampler = PoissonBatchSampler(n, q, steps, physical_batch_size, RandomSource(3))
    planned = len(sampler)
    it = iter(sampler)
    queue = sampler.latest_queue
    yielded, empty_steps = 0, 0
    for rows in it:
        info = queue.popleft()
        yielded += 1
        assert len(rows) == physical_batch_size and info.mask.shape == (physical_batch_size,)
        assert info.mask.sum() > 0 or info.count == 1
        if not info.mask.any():
            empty_steps += 1
        # Real rows first, padding after: copies of the batch's first row (what the engine
        # copies into the padding rows' layer outputs instead of computing them).
        assert info.mask.tolist() == sorted(info.mask.tolist(), reverse=True)
        if info.mask.any():
            assert all(row == rows[0] for row in rows[int(info.mask.sum()) :])
    assert yielded == planned
    assert sampler.epoch == 1
    sizes = [len(b) for b in _logical_batches(n, q, steps, 3, physical_batch_size)]
    assert empty_steps == sizes.count(0) and len(sizes) == steps


@pytest.mark.parametrize("physical_batch_size", [1, 4, 6, 8])
def test_pow2_padding_keeps_the_sample_and_shrinks_only_the_last_batch(physical_batch_size):
    n, q, steps, p = 40, 0.3, 50, physical_batch_size
    full = _logical_batches(n, q, steps, 7, p)
    assert _logical_batches(n, q, steps, 7, p, padding="pow2") == full  # the same sample
    sampler = PoissonBatchSampler(n, q, steps, p, RandomSource(7), padding="pow2")
    planned = len(sampler)
    it = iter(sampler)
    queue, rows_full, rows_pow2, narrower = sampler.latest_queue, 0, 0, 0
    for rows in it:
        info = queue.popleft()
        real = int(info.mask.sum())
        assert len(rows) == info.mask.shape[0]
        assert info.mask.tolist() == sorted(info.mask.tolist(), reverse=True)  # padding last
        if not info.last:
            assert len(rows) == p and real == p
        else:
            expected = p if real >= p else min(p, 1 << max(real - 1, 0).bit_length())
            assert len(rows) == expected and real <= len(rows) < max(2 * real, 2)
        rows_pow2 += len(rows)
        rows_full += p
        narrower += len(rows) < p
    assert narrower > 0 or p == 1  # the padding really changed
    assert rows_pow2 <= rows_full
    assert rows_full == p * planned and planned == sum(max(1, math.ceil(len(b) / p)) for b in full)


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="padding must be one of"):
        PoissonBatchSampler(10, 0.5, 2, 4, RandomSource(0), padding="half")


def test_an_empty_logical_batch_is_one_all_masked_batch():
    # q so small that most logical batches are empty.
    batches = []
    sampler = PoissonBatchSampler(5, 0.01, 20, 4, RandomSource(4))
    it = iter(sampler)
    for rows in it:
        batches.append((rows, sampler.latest_queue.popleft()))
    empty = [(rows, info) for rows, info in batches if not info.mask.any()]
    assert empty and len(batches) == 20  # every step is one physical batch here
    for rows, info in empty:
        assert len(rows) == 4 and info.first and info.last


def test_variable_size_mode_gives_one_batch_per_step():
    sampler = PoissonBatchSampler(50, 0.1, 100, None, RandomSource(5))
    it = iter(sampler)
    shapes = set()
    for rows in it:
        info = sampler.latest_queue.popleft()
        assert info.first and info.last and len(rows) == info.mask.shape[0]
        shapes.add(len(rows))
        if not info.mask.any():
            assert len(rows) == 1
    assert len(shapes) > 3


class _Squares(Dataset):
    def __len__(self):
        return 37

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i)]), "i": i}


def _collate(items):
    return torch.cat([it["x"] for it in items]), [it["i"] for it in items]


def _run(loader):
    infos = []
    loader.on_batch = infos.append
    batches = [(x.clone(), ids) for x, ids in loader]
    return batches, infos


def test_loader_keeps_collate_and_worker_options_and_order():
    base = dict(batch_size=6, collate_fn=_collate)
    serial = DPDataLoader(DataLoader(_Squares(), **base), 6 / 37, 4, random=RandomSource(6))
    parallel = DPDataLoader(
        DataLoader(_Squares(), num_workers=2, persistent_workers=True, pin_memory=False, **base),
        6 / 37,
        4,
        random=RandomSource(6),
    )
    assert parallel.num_workers == 2 and parallel.persistent_workers
    assert parallel.collate_fn is _collate
    assert len(serial) == len(parallel)
    a, infos_a = _run(serial)
    b, infos_b = _run(parallel)
    assert len(a) == len(b) == len(infos_a) == len(infos_b)
    assert [i.mask.tolist() for i in infos_a] == [i.mask.tolist() for i in infos_b]
    for (xa, ia), (xb, ib) in zip(a, b):
        assert ia == ib and torch.equal(xa, xb) and len(ia) == 4
        assert xa.tolist() == [float(i) for i in ia]  # the user's collate_fn built the batch
    # Two epochs draw different samples (the second epoch continues the random stream).
    c, _ = _run(serial)
    assert [ids for _, ids in c] != [ids for _, ids in a]


def test_same_seed_same_sample_and_secure_mode_differs():
    ds = TensorDataset(torch.arange(50.0))
    ids = lambda loader: [x.tolist() for (x,) in loader]  # noqa: E731
    first = ids(DPDataLoader(DataLoader(ds, batch_size=5), 0.1, 3, random=RandomSource(7)))
    again = ids(DPDataLoader(DataLoader(ds, batch_size=5), 0.1, 3, random=RandomSource(7)))
    assert first == again
    secure = [
        ids(DPDataLoader(DataLoader(ds, batch_size=5), 0.1, 3, random=RandomSource(secure=True)))
        for _ in range(2)
    ]
    assert secure[0] != secure[1]
    torch.manual_seed(0)
    default_a = ids(DPDataLoader(DataLoader(ds, batch_size=5), 0.1, 3))
    torch.manual_seed(0)
    default_b = ids(DPDataLoader(DataLoader(ds, batch_size=5), 0.1, 3))
    assert default_a == default_b  # torch.manual_seed makes the default source reproducible
    assert RandomSource(secure=True).state_dict() == {}
    with pytest.raises(ValueError, match="secure_mode"):
        RandomSource(seed=1, secure=True)


@pytest.mark.parametrize("stop", [1, 5, 11, 17])
@pytest.mark.parametrize("physical_batch_size", [3, None])
def test_resume_continues_the_same_sample(stop, physical_batch_size):
    ds = TensorDataset(torch.arange(40.0))

    def make():
        return DPDataLoader(
            DataLoader(ds, batch_size=8), 0.2, physical_batch_size, random=RandomSource(8)
        )

    def epochs(loader, count):
        out = []
        for _ in range(count):
            out += [x.tolist() for (x,) in loader]
        return out

    reference = epochs(make(), 6)
    loader = make()
    seen = []
    while len(seen) < stop:  # across epoch boundaries
        for (x,) in loader:
            seen.append(x.tolist())
            if len(seen) == stop:
                break
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = epochs(resumed, 3)
    assert seen == reference[:stop]
    assert len(rest) >= 10 and rest[:10] == reference[stop : stop + 10]


def test_iterable_and_sizeless_datasets_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ValueError, match="IterableDataset"):
        DPDataLoader(DataLoader(Stream(), batch_size=2), 0.1, 2)


def test_default_padding_is_pow2_on_cpu_with_a_physical_batch_size_else_full():
    from torch import nn

    from torch_dpfast.sampling import default_padding

    assert default_padding(nn.Linear(2, 2), 8) == "pow2"
    assert default_padding(nn.Linear(2, 2), None) == "full"  # one unpadded batch per step
    assert default_padding(nn.Linear(2, 2, device="meta"), 8) == "full"  # not a CPU model

"""``DPDataLoader``: the user's DataLoader, re-batched by Poisson sampling into physical batches.

It keeps the user's dataset, ``collate_fn``, ``num_workers`` (batches arrive in order),
``pin_memory``, ``persistent_workers``, ``worker_init_fn``, ``prefetch_factor`` and
``multiprocessing_context``; only the batching changes (see sampling.py). Each batch it yields
is announced first to ``on_batch`` with its :class:`~torch_dpfast.sampling.PhysicalBatch`
(mask, whether it ends its logical batch), which is how the PrivacyEngine tells the optimizer
and the clipping which rows are real and when to step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.utils._pytree import tree_leaves
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from .accounting import steps_per_epoch as default_steps_per_epoch
from .batch_layout import LoaderBatch
from .random_source import RandomSource
from .sampling import PhysicalBatch, PoissonBatchSampler


class DPDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson-sampled, fixed-shape physical batches.

    Args:
        data_loader: the user's loader (its dataset and loading options are kept).
        sample_rate: q; each example joins each logical batch with this probability.
        physical_batch_size: rows per physical batch (None: one variable-size batch per step).
        steps_per_epoch: logical steps per epoch (default round(1/q)).
        random: source of the sample (default: seeded from torch's default generator).
        on_batch: called with each batch's :class:`PhysicalBatch` just before it is yielded.
        rank, world_size, plan_random: under torch.distributed, this rank samples its shard
            of the dataset; ``plan_random`` (seeded alike on every rank) draws every rank's
            batch sizes (see distributed.py).
        padding: "full" (every batch has ``physical_batch_size`` rows) or "pow2" (the last
            batch of a logical batch only up to the next power of two); see sampling.py.
    """

    def __init__(
        self,
        data_loader: DataLoader,
        sample_rate: float,
        physical_batch_size: int | None,
        steps_per_epoch: int | None = None,
        random: RandomSource | None = None,
        on_batch: Callable[[PhysicalBatch], None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        plan_random: RandomSource | None = None,
        padding: str = "full",
    ):
        dataset = data_loader.dataset
        check_map_style(dataset)
        num_samples = len(dataset)
        sampler = PoissonBatchSampler(
            num_samples,
            sample_rate,
            steps_per_epoch or default_steps_per_epoch(sample_rate),
            physical_batch_size,
            random or RandomSource(),
            rank=rank,
            world_size=world_size,
            plan_random=plan_random,
            padding=padding,
        )
        options = dict(
            num_workers=data_loader.num_workers,
            collate_fn=data_loader.collate_fn,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            generator=data_loader.generator,
            persistent_workers=data_loader.persistent_workers,
            pin_memory_device=data_loader.pin_memory_device,
        )
        if data_loader.num_workers > 0:
            options["prefetch_factor"] = data_loader.prefetch_factor
        super().__init__(dataset, batch_sampler=sampler, in_order=True, **options)
        self.sample_rate = sample_rate
        self.physical_batch_size = physical_batch_size
        self.on_batch = on_batch
        self.latest_batch = None  # the batch yielded last (the probe compares the model's inputs)

    @property
    def steps_per_epoch(self) -> int:
        return self.batch_sampler.steps_per_epoch

    @property
    def expected_batch_size(self) -> float:
        """q * N, what the noisy sum is divided by."""
        return self.sample_rate * len(self.dataset)

    def __iter__(self):
        batches = super().__iter__()
        queue = self.batch_sampler.latest_queue
        for batch in batches:
            info = queue.popleft()
            self.batch_sampler.consumed = info.cursor
            self.latest_batch = batch
            if self.on_batch is not None:
                self.on_batch(info)
            yield batch

    def latest(self) -> LoaderBatch:
        """The tensors of the batch yielded last, and whether batches are padded by position."""
        tensors = [t for t in tree_leaves(self.latest_batch) if isinstance(t, Tensor)]
        return LoaderBatch(tensors, padded=self.physical_batch_size is not None)

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def check_map_style(dataset) -> None:
    """Poisson sampling needs random access to every example and the dataset size."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"the data loader's dataset is an IterableDataset ({type(dataset).__name__}): Poisson "
            "sampling needs random access to a dataset of known size. Use a map-style Dataset "
            "(with __getitem__ and __len__), e.g. load the data into a TensorDataset"
        )
    try:
        size = len(dataset)
    except TypeError:
        raise ValueError(
            f"the data loader's dataset ({type(dataset).__name__}) has no len(); Poisson sampling "
            "needs the dataset size"
        ) from None
    if size < 1:
        raise ValueError("the data loader's dataset is empty")


def check_replaceable_sampler(data_loader) -> None:
    """Poisson sampling replaces the loader's sampler and samples the whole dataset. That is
    what the user meant only for the stock samplers (sequential, shuffling without replacement,
    a distributed shard, Opacus's Poisson sampler); any other (a SubsetRandomSampler holding
    out examples, a weighted or custom sampler) is refused rather than silently replaced."""
    batch_sampler = data_loader.batch_sampler
    if _is_opacus_poisson(batch_sampler):
        return
    if type(batch_sampler) is not BatchSampler:
        raise ValueError(
            f"the data loader draws its batches with a {type(batch_sampler).__name__} "
            "(batch_sampler=...); Poisson sampling would replace it and sample every example of "
            "the dataset with q = 1/len(loader). Give the examples to train on as the dataset "
            "(e.g. torch.utils.data.Subset(dataset, indices)) with batch_size=, or keep your "
            "sampler with poisson_sampling=False (the epsilon is then not a proven guarantee)"
        )
    sampler = batch_sampler.sampler
    stock = type(sampler) in (SequentialSampler, DistributedSampler) or (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(data_loader.dataset)
    )
    if not stock:
        raise ValueError(
            f"the data loader samples with a {type(sampler).__name__}; Poisson sampling would "
            f"replace it and draw from all {len(data_loader.dataset)} examples of the dataset "
            "(training on any it holds out, with q over the wrong N). Give the examples to "
            "train on as the dataset (e.g. torch.utils.data.Subset(dataset, indices)), or keep "
            "your sampler with poisson_sampling=False (the epsilon is then not a proven "
            "guarantee)"
        )


def _is_opacus_poisson(batch_sampler) -> bool:
    """Opacus's UniformWithReplacementSampler: Poisson sampling of the whole dataset already."""
    cls = type(batch_sampler)
    return cls.__name__ == "UniformWithReplacementSampler" and cls.__module__.startswith("opacus")

"""Poisson sampling of logical batches, cut into fixed-shape physical batches.

Every logical step includes each of the N examples independently with probability q. We draw
this in two stages that give exactly the same distribution: the batch size s ~ Binomial(N, q),
then a uniformly random subset of size s (for any set S, P(S) = q^|S| (1-q)^(N-|S|) either
way). Drawing the sizes of a whole epoch first makes the number of physical batches in the epoch
known in advance, so ``len(loader)`` is exact.

A logical batch of s examples becomes max(1, ceil(s / P)) physical batches of exactly P rows;
the last is padded with copies of its own first row and a mask marks the real rows. An empty
logical batch becomes one all-masked batch, so the step still happens (noise only), as the
accountant assumes.
With ``padding="pow2"`` the last batch is padded only to the next power of two (at most P):
fewer padding rows, a few batch shapes instead of one. The sample is the same either way.
With ``physical_batch_size=None`` each logical batch is one batch of s rows (1 masked row when
s = 0).

Across W processes (distributed.py) each rank samples its own shard; the sizes of *all* ranks
come from a generator seeded alike everywhere, so every rank pads its step to the largest
physical batch count of any rank without communicating.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .random_source import RandomSource
from .validation import check_choice


@dataclass(frozen=True)
class PhysicalBatch:
    """What the loader knows about one physical batch it yields."""

    epoch: int
    step: int  # logical step within the epoch
    index: int  # physical batch within the logical batch
    count: int  # physical batches in this logical batch (the same on every rank)
    mask: Tensor  # (rows,) bool: True for real examples, False for padding
    cursor: dict  # the sampler state once this batch is consumed (for resuming)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def physical_count(size: int, physical_batch_size: int | None) -> int:
    """Physical batches for a logical batch of ``size`` examples."""
    if physical_batch_size is None:
        return 1
    return max(1, math.ceil(size / physical_batch_size))


PADDINGS = ("full", "pow2")


def default_padding(module, physical_batch_size: int | None) -> str:
    """make_private's padding when none is given: "pow2" for a model on CPU with a physical
    batch size (its layers outside the captured ones still compute the padding rows there, and
    CPUs gain nothing from one fixed shape), "full" otherwise (one shape: CUDA graphs, no
    recompiles)."""
    param = next(iter(module.parameters()), None)
    on_cpu = param is None or param.device.type == "cpu"
    return "pow2" if on_cpu and physical_batch_size is not None else "full"


def padded_width(real: int, width: int, padding: str) -> int:
    """Rows of a physical batch of at most ``width`` rows holding ``real`` examples: ``width``
    ("full"), or the least power of two >= real, at most ``width`` ("pow2"; 1 when empty)."""
    if padding == "full" or real >= width:
        return width
    return min(width, 1 << max(real - 1, 0).bit_length())


def split(
    indices: Tensor,
    physical_batch_size: int | None,
    filler: int,
    count: int,
    padding: str = "full",
):
    """[(rows, mask)] for one logical batch, ``count`` physical batches: rows are dataset
    indices, padded to :func:`padded_width` rows with copies of the batch's first row (the
    engine's captured layers copy that row's outputs into the padding rows instead of computing
    them, so this is what they would compute), or with ``filler`` in whole all-masked batches
    where ``count`` asks for more."""
    size = len(indices)
    width = physical_batch_size if physical_batch_size is not None else max(size, 1)
    batches = []
    for k in range(count):
        real = indices[k * width : (k + 1) * width].tolist()
        rows = padded_width(len(real), width, padding)
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[: len(real)] = True
        batches.append((real + [real[0] if real else filler] * (rows - len(real)), mask))
    return batches


def _derived(random: RandomSource) -> RandomSource:
    """A second source, seeded from ``random`` (or secure if it is)."""
    if random.secure:
        return RandomSource(secure=True)
    return RandomSource(seed_from=random.seed)  # seeded at its first draw


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Yields physical batches of dataset indices for DP-SGD with Poisson sampling.

    Args:
        num_samples: N, the dataset size.
        sample_rate: q in (0, 1].
        steps_per_epoch: logical steps per epoch (usually round(1/q)).
        physical_batch_size: P, rows per physical batch; None for one batch per logical step.
        random: the source of the sample (seeded or secure).
        rank, world_size: this process's place among W processes (each samples its shard).
        padding: "full" or "pow2", how the last physical batch of a step is padded (above).
        plan_random: the source of all ranks' batch sizes, seeded alike on every rank
            (default, for one process: a source seeded from ``random``). Sizes and subsets come
            from separate streams, so when the next epoch's sizes are drawn does not matter.

    The metadata of each yielded batch (:class:`PhysicalBatch`) is queued on the iteration that
    produced it (``latest_queue``), for the loader to pop in step with the batches.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int,
        physical_batch_size: int | None,
        random: RandomSource,
        rank: int = 0,
        world_size: int = 1,
        plan_random: RandomSource | None = None,
        padding: str = "full",
    ):
        self.padding = check_choice("padding", padding, PADDINGS)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.physical_batch_size = physical_batch_size
        self.random = random
        self.plan_random = plan_random or _derived(random)
        self.rank, self.world_size = rank, world_size
        self.shard = torch.arange(rank, num_samples, world_size)  # this rank's examples
        self.epoch = 0
        self._sizes: Tensor | None = None  # (steps, W) planned logical batch sizes of all ranks
        self._resume: dict | None = None  # where to continue (set by load_state_dict)
        self.consumed: dict | None = None  # the cursor of the last consumed batch
        self.latest_queue: collections.deque = collections.deque()

    def _plan(self) -> Tensor:
        if self._sizes is None:
            shards = [
                len(range(r, self.num_samples, self.world_size)) for r in range(self.world_size)
            ]
            count = torch.tensor(shards, dtype=torch.float64).expand(self.steps_per_epoch, -1)
            prob = torch.full_like(count, self.sample_rate)
            self._sizes = self.plan_random.binomial(count.contiguous(), prob).long()
        return self._sizes

    def _count(self, sizes_of_step: Tensor) -> int:
        """Physical batches of a step: the most any rank needs."""
        return max(physical_count(int(s), self.physical_batch_size) for s in sizes_of_step)

    def __len__(self) -> int:
        """Physical batches in the coming (or resumed) epoch: exact, drawn in advance."""
        if self._resume is not None:
            cursor = self._resume
            sizes = cursor["sizes"]
            rest = self._count(sizes[cursor["step"]]) - cursor["consumed"]
            return rest + sum(self._count(row) for row in sizes[cursor["step"] + 1 :])
        return sum(self._count(row) for row in self._plan())

    def __iter__(self):
        queue = collections.deque()
        self.latest_queue = queue
        return self._generate(queue)

    def _draw(self, size: int) -> Tensor:
        if size == 0:
            return torch.zeros(0, dtype=torch.long)
        perm = self.random.randperm(len(self.shard))
        return self.shard[perm[:size]].sort().values

    def _generate(self, queue):
        if self._resume is not None:
            cursor, self._resume = self._resume, None
            epoch, sizes, start = cursor["epoch"], cursor["sizes"], cursor["step"]
            resumed = (cursor["indices"], cursor["consumed"])
            self.random.load_state_dict(cursor["random"])
            plan_state = cursor["plan_random"]
        else:
            epoch, sizes, start, resumed = self.epoch, self._plan(), 0, None
            plan_state = self.plan_random.state_dict()  # after this epoch's sizes were drawn
        self._sizes = None
        for step in range(start, len(sizes)):
            if resumed is not None:
                indices, skip = resumed
                resumed = None
            else:
                indices, skip = self._draw(int(sizes[step, self.rank])), 0
            random_state = self.random.state_dict()
            filler = (
                int(indices[0]) if len(indices) else int(self.shard[0]) if len(self.shard) else 0
            )
            count = self._count(sizes[step])
            batches = split(indices, self.physical_batch_size, filler, count, self.padding)
            for k, (rows, mask) in enumerate(batches):
                if k < skip:
                    continue
                cursor = {
                    "epoch": epoch,
                    "sizes": sizes,
                    "step": step,
                    "indices": indices,
                    "consumed": k + 1,
                    "random": random_state,
                    "plan_random": plan_state,
                }
                queue.append(PhysicalBatch(epoch, step, k, len(batches), mask, cursor))
                yield rows
        self.epoch = epoch + 1

    def state_dict(self) -> dict:
        """Where the last consumed batch left the sampling, to resume from."""
        state = {
            "epoch": self.epoch,
            "random": self.random.state_dict(),
            "plan_random": self.plan_random.state_dict(),
        }
        state["physical_batch_size"] = self.physical_batch_size
        if self.consumed is not None:
            state["cursor"] = self.consumed
        return state

    def resumable_cursor(self, state: dict) -> dict | None:
        """The cursor of ``state`` for this sampler's physical batch size, checked; changes
        nothing. The cursor counts physical batches consumed, so a checkpoint taken inside a
        logical batch resumes only at the physical batch size it was taken with (a smaller one
        would count some examples twice into one noisy sum); at the end of a logical batch any
        size resumes."""
        if "physical_batch_size" not in state:
            raise ValueError(
                "the sampler state does not say which physical batch size it was taken with "
                "(written by an older torch_dpfast); it cannot be resumed safely"
            )
        cursor, saved = state.get("cursor"), state["physical_batch_size"]
        if cursor is None or saved == self.physical_batch_size:
            return cursor
        row = cursor["sizes"][cursor["step"]]
        if cursor["consumed"] < max(physical_count(int(s), saved) for s in row):
            raise ValueError(
                f"the checkpoint was taken inside a logical batch at physical_batch_size={saved}, "
                f"and this run uses {self.physical_batch_size}: the examples of that logical "
                f"batch would be split differently, and some counted twice. Resume with "
                f"physical_batch_size={saved}, or save checkpoints at the end of a logical batch "
                "(when optimizer.step() really stepped)"
            )
        return {**cursor, "consumed": self._count(row)}  # the step was complete

    def load_state_dict(self, state: dict) -> None:
        cursor = self.resumable_cursor(state)
        self._sizes, self._resume = None, None
        self.consumed = cursor
        if cursor is None:
            self.epoch = state["epoch"]
            self.random.load_state_dict(state["random"])
            self.plan_random.load_state_dict(state["plan_random"])
            return
        self.plan_random.load_state_dict(cursor["plan_random"])
        sizes = cursor["sizes"]
        if cursor["step"] == len(sizes) - 1 and cursor["consumed"] == self._count(sizes[-1]):
            self.epoch = cursor["epoch"] + 1  # the epoch was finished
            self.random.load_state_dict(cursor["random"])
        else:
            self._resume = cursor

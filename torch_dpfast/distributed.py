"""DP-SGD across processes with torch.distributed (torchrun; NCCL on GPU, gloo on CPU).

Each of the W ranks holds a disjoint shard of the dataset (rank r: indices r, r + W, ...; no
example is duplicated, which would double its privacy cost) and Poisson-samples it with the
*global* rate q = batch_size / N, so the union of the ranks' samples is a Poisson sample of the
whole dataset. The logical batch sizes of every rank are drawn from one generator seeded
identically on all ranks, so each rank knows how many physical batches the others will run and
pads to the largest count without communicating; only the choice of examples inside a shard
uses a per-rank generator. At the end of a logical step the clipped sums are all-reduced once
(bucketed); rank 0 alone adds the Gaussian noise before the all-reduce, so it is added exactly
once and every rank ends the step with the same gradient, hence the same parameters.
"""

from __future__ import annotations

import os
import secrets
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .random_source import KEY_BYTES, RandomSource

#: Bytes per all-reduce bucket.
BUCKET_BYTES = 25 * 2**20


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_samples: int, rank: int, world_size: int) -> Tensor:
    """The dataset indices rank ``rank`` holds: rank, rank + W, ... (disjoint, no padding)."""
    return torch.arange(rank, num_samples, world_size)


def _device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_agreement(settings: dict) -> None:
    """Raises on every rank unless all ranks give the same ``settings`` (numbers, strings,
    None, bools): ranks that disagree on the batch size, dataset size, sigma or C would drift
    apart and then hang in a collective. One all-gather of a fingerprint per make_private."""
    codes = [_code(value) for value in settings.values()]
    mine = torch.tensor(codes, dtype=torch.float64, device=_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).cpu()
    differing = []
    for k, name in enumerate(settings):
        column = table[:, k]
        if bool((column == column[0]).all()):
            continue
        values = ", ".join(f"rank {r}: {_decode(settings[name], v)}" for r, v in enumerate(column))
        differing.append(f"{name} ({values})")
    if differing:
        raise ValueError(
            "torch_dpfast: the ranks disagree on " + "; ".join(differing) + ". Every rank must "
            "call make_private with the same data set, batch size, physical batch size, "
            "noise and clipping settings and the same model; otherwise they drift apart and "
            "hang in a collective"
        )


def _code(value) -> float:
    """A number that two ranks' values share exactly when the values are equal."""
    if value is None:
        return -1.0
    if isinstance(value, (bool, int, float)):
        return float(value)
    return float(zlib.crc32(str(value).encode()))


def _decode(mine, code: Tensor) -> str:
    """A rank's value for the error: the number itself, or (strings) its fingerprint."""
    if isinstance(mine, str):
        return f"#{int(code)}"
    return f"{float(code):g}"


def broadcast_seed(seed: int | None = None) -> int:
    """A 63-bit seed equal on every rank: rank 0's ``seed`` (or one from the OS CSPRNG)."""
    value = torch.tensor([seed if seed is not None else secrets.randbits(63)], dtype=torch.int64)
    value = value.to(_device())
    dist.broadcast(value, src=0)
    return int(value.item())


def broadcast_module(module: nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank (as DistributedDataParallel does)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
                staged = tensor.detach().to(_device())
                dist.broadcast(staged, src=0)
                tensor.copy_(staged)
            else:
                dist.broadcast(tensor.data, src=0)


class _Buckets:
    """Sums tensors across ranks in place, in buckets of about 25 MiB of one dtype and device;
    each bucket's all-reduce is launched as soon as it is full (after ``before_launch`` ran on
    its tensors), all stay in flight until ``finish()``."""

    def __init__(self, before_launch=None):
        self.before_launch = before_launch
        self.bucket: list[Tensor] = []
        self.size = 0
        self.pending: list = []
        self.bytes = 0

    def add(self, t: Tensor) -> None:
        if self.bucket and (t.dtype, t.device) != (self.bucket[0].dtype, self.bucket[0].device):
            self.launch()
        self.bucket.append(t)
        self.size += t.numel() * t.element_size()
        if self.size >= BUCKET_BYTES:
            self.launch()

    def launch(self) -> None:
        if not self.bucket:
            return
        if self.before_launch is not None:
            self.before_launch(self.bucket)
        flat = torch.cat([t.reshape(-1) for t in self.bucket])
        staged = flat.to(_device()) if flat.device.type == "cpu" else flat
        self.pending.append((self.bucket, staged, dist.all_reduce(staged, async_op=True)))
        self.bytes += flat.numel() * flat.element_size()
        self.bucket, self.size = [], 0

    def finish(self) -> None:
        self.launch()
        for tensors, flat, work in self.pending:
            work.wait()
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.pending.clear()


def all_reduce_sum(tensors: list[Tensor]) -> int:
    """Sums ``tensors`` in place across ranks (bucketed, see _Buckets); returns the bytes."""
    buckets = _Buckets()
    for t in tensors:
        buckets.add(t)
    buckets.finish()
    return buckets.bytes


def check_not_ddp(module: nn.Module) -> None:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "the module is wrapped in DistributedDataParallel, whose per-backward gradient "
            "all-reduce would bypass clipping (and never fires: attached layers produce no "
            ".grad). Pass the unwrapped model (ddp_model.module): make_private detects the "
            "process group and all-reduces the clipped, noised gradients once per logical step"
        )


def shared_secure_source() -> RandomSource:
    """Secure mode across ranks: the batch-size stream, which every rank must draw alike, is
    SHAKE-256 keyed with 256 bits that rank 0 takes from the OS CSPRNG and broadcasts once; the
    key is never stored (random_source.py)."""
    key = torch.frombuffer(bytearray(os.urandom(KEY_BYTES)), dtype=torch.int64).clone()
    staged = key.to(_device())
    dist.broadcast(staged, src=0)
    return RandomSource(key=staged.cpu().numpy().tobytes())


def sources(secure: bool, sample_generator: torch.Generator | None, rank: int):
    """(per-rank sample source, shared batch-size source) for a run across ranks."""
    if secure:
        return RandomSource(secure=True, generator=sample_generator), shared_secure_source()
    base = broadcast_seed(int(torch.randint(2**62, ())))
    if sample_generator is not None:
        return RandomSource(generator=sample_generator), RandomSource(seed=base)
    return RandomSource(seed=(base + 1 + rank) % 2**63), RandomSource(seed=base)


class OverlappedReduction:
    """All-reduces of clipped sums that are final before the backward ends (ghost clipping's
    second pass computes each layer's sum inside that layer's backward): as parameters become
    final, rank 0 adds their noise, every rank scales them, and a bucket's all-reduce is launched
    while the rest of the backward runs. ``finish()`` launches the last bucket, waits for all and
    returns the ids of the parameters done."""

    def __init__(self, noise_and_scale):
        self.buckets = _Buckets(before_launch=noise_and_scale)
        self.done: set[int] = set()

    @property
    def bytes(self) -> int:
        return self.buckets.bytes

    def ready(self, params) -> None:
        for p in params:
            if id(p) in self.done or getattr(p, "summed_grad", None) is None:
                continue
            self.done.add(id(p))
            self.buckets.add(p.summed_grad)

    def finish(self) -> set[int]:
        self.buckets.finish()
        return self.done

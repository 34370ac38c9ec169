"""An analytic model of data-parallel scaling, DP-SGD vs non-private training.

Per synchronisation (one optimizer step of non-private DDP; one *logical* step of our DP-SGD,
whatever its number of physical batches) each of K workers computes for

    t_compute = examples per worker per sync / single-device throughput

and then the gradients (S bytes) are all-reduced with a ring:

    t_allreduce(K) = 2 (K - 1) / K * S / bandwidth(K) + 2 (K - 1) * latency

where bandwidth(K) is the intra-node link while the K workers fit on one node and the
inter-node link beyond. Without overlap of communication and computation, the parallel
efficiency (throughput over K times the single-device throughput) is

    efficiency(K) = t_compute / (t_compute + t_allreduce(K)).

DP-SGD differs from non-private training in two ways that both raise its efficiency: it is
slower per example (t_compute grows by 1 / r, r = DP throughput / non-private throughput), and
with virtual batching it synchronises once per m physical batches (t_compute grows by m). One
way lowers it: with Poisson sampling the ranks' logical batches differ in size, and a
synchronous step waits for the rank with the most physical batches (every rank runs that many,
padding with masked batches), so a step costs max_r ceil(s_r / P) physical batches instead of
the mean s / P (:func:`straggler_factor`).

``python benchmarks/distributed/scaling_model.py`` prints the predictions of docs/distributed.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cluster:
    """Links of a cluster: bandwidths in bytes/s, latency per ring hop in seconds."""

    gpus_per_node: int
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    latency: float = 10e-6

    def bandwidth(self, workers: int) -> float:
        if workers <= self.gpus_per_node:
            return self.intra_node_bandwidth
        return self.inter_node_bandwidth


def allreduce_seconds(nbytes: float, workers: int, cluster: Cluster) -> float:
    """Ring all-reduce time of ``nbytes`` over ``workers`` (0 for one worker)."""
    if workers <= 1:
        return 0.0
    hops = 2 * (workers - 1)
    return hops / workers * nbytes / cluster.bandwidth(workers) + hops * cluster.latency


def efficiency(compute_seconds: float, nbytes: float, workers: int, cluster: Cluster) -> float:
    """Parallel efficiency with ``compute_seconds`` of work between all-reduces of ``nbytes``."""
    return compute_seconds / (compute_seconds + allreduce_seconds(nbytes, workers, cluster))


def efficiency_from_ratio(comm_over_compute: float) -> float:
    """Efficiency when the all-reduce takes ``comm_over_compute`` times the compute."""
    return 1.0 / (1.0 + comm_over_compute)


def comm_over_compute_from_efficiency(value: float) -> float:
    """Inverse of :func:`efficiency_from_ratio`: calibrates the model from one measurement."""
    return 1.0 / value - 1.0


def straggler_factor(mean_per_rank: float, workers: int, physical: int, draws: int = 4000) -> float:
    """E[max over ranks of ceil(s_r / P)] * P / mean, s_r ~ Binomial(n, q) with mean n q =
    ``mean_per_rank`` (n large: Poisson), by Monte Carlo with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    rate = torch.full((draws, workers), float(mean_per_rank), dtype=torch.float64)
    sizes = torch.poisson(rate, generator=generator)
    batches = torch.ceil(sizes / physical).clamp(min=1).max(dim=1).values
    return batches.mean().item() * physical / mean_per_rank


PAPER_NON_PRIVATE_80 = 0.533  # seed paper, Sec. 6.2: ViT-B on 80 V100s (4 per node)
PAPER_DP_80 = 0.692  # the same, Opacus DP-SGD


def _dp_efficiency(r: float, batches: float, straggle: float, comm: float) -> float:
    """Efficiency of DP-SGD syncing every ``batches`` physical batches, each 1/r of a
    non-private one, waiting ``straggle`` times the mean, with ``comm`` (in non-private
    physical-batch times) per sync."""
    compute = batches / r
    return compute / (compute * straggle + comm)


def paper_table(gpus=(1, 2, 4, 8, 16, 32, 64, 80), intra_over_inter: float = 10.0) -> str:
    """Predictions for the paper's setting, calibrated on its non-private 80-GPU efficiency.

    Assumptions (stated in docs/distributed.md): 4 GPUs per node with links ``intra_over_inter``
    times faster than the network; ring all-reduce bandwidth-bound (latency neglected);
    non-private DDP synchronises every physical batch; DP-SGD throughput r = 1/3 of non-private
    (the paper's Opacus ViT figure) or 0.9 (our goal); DP synchronises once per logical step of
    L = 25,000 examples (the paper's logical batch) split over the GPUs in physical batches of
    32, and waits for the slowest rank (Poisson straggler factor).
    """
    ring = lambda k: 2 * (k - 1) / k  # noqa: E731 - the ring's bandwidth term, times S / bw
    # comm/compute of non-private DDP per physical batch at 80 GPUs (inter-node), calibrated.
    c80 = comm_over_compute_from_efficiency(PAPER_NON_PRIVATE_80)
    per_byte = c80 / ring(80)  # S / (bw_inter * t_compute_physical)

    def comm(k):
        return ring(k) * per_byte / (intra_over_inter if k <= 4 else 1.0)

    lines = [
        "| GPUs | non-private DDP | DP, r = 1/3, sync per physical batch | "
        "DP, r = 1/3, sync per logical step | DP, r = 0.9, sync per physical batch | "
        "DP, r = 0.9, sync per logical step |",
        "|---|---|---|---|---|---|",
    ]
    for k in gpus:
        physical_per_rank = 25_000 / k / 32
        straggle = straggler_factor(25_000 / k, k, 32) if k > 1 else 1.0

        cells = [
            _dp_efficiency(1 / 3, 1.0, 1.0, comm(k)),
            _dp_efficiency(1 / 3, physical_per_rank, straggle, comm(k)),
            _dp_efficiency(0.9, 1.0, 1.0, comm(k)),
            _dp_efficiency(0.9, physical_per_rank, straggle, comm(k)),
        ]
        cells = " | ".join(f"{c:.1%}" for c in cells)
        lines.append(f"| {k} | {efficiency_from_ratio(comm(k)):.1%} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(paper_table())

"""DP-SGD on several processes with torchrun: the same make_private call as on one device.

    torchrun --nproc-per-node 2 examples/torchrun_ddp.py            # one machine, 2 processes
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/torchrun_ddp.py          # 4 nodes x 8 GPUs

Each process samples its shard of the data at the global rate q = batch_size / len(dataset);
make_private detects the process group, aligns the ranks' parameters, and all-reduces the
clipped, noised gradient once per logical step. Do not wrap the model in
DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="expected logical batch")
    parser.add_argument("--physical-batch-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=3.0)
    args = parser.parse_args()

    # NCCL needs one GPU per process on a node; otherwise train on CPUs with gloo.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)

    # A synthetic task, identical on every rank (each rank reads only its own shard of it).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 32, generator=generator)
    y = (x[:, :4].sum(dim=1) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)

    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 2)).to(device)
    engine = dpf.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=data,
        max_grad_norm=1.0,
        target_epsilon=args.epsilon,
        target_delta=1e-5,
        epochs=args.epochs,
        physical_batch_size=args.physical_batch_size,
    )
    for epoch in range(args.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        if rank == 0:
            with torch.no_grad():
                accuracy = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
            print(
                f"epoch {epoch}: accuracy {accuracy:.3f}, "
                f"epsilon {engine.get_epsilon(1e-5):.2f} (delta 1e-5), "
                f"{optimizer.bytes_communicated / 2**20:.1f} MiB all-reduced so far",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A custom DP-SGD loop from the parts: attach, DPDataLoader, DPOptimizer, an accountant.

PrivacyEngine.make_private wires exactly these together; doing it by hand lets a loop decide
things itself (here: the loop itself tells the clipping which rows are real and when a logical
batch ends, through the loader's on_batch callback).

    python examples/custom_loop.py [--epochs 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf
from torch_dpfast.random_source import RandomSource


def main(argv=None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(2000, 20)
    y = (x[:, :3].sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(inplace=True), nn.Linear(64, 2))

    batch_size, sigma, clip = 100, 1.0, 1.0
    q = batch_size / len(x)
    attachment = dpf.attach(model, clipping="auto")  # per-example clipping on every layer
    optimizer = dpf.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=q * len(x),
    )
    accountant = dpf.accounting.PRVAccountant()
    optimizer.step_hooks.append(
        lambda opt: accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=q)
    )

    def on_batch(batch):  # before each physical batch: its mask, and whether it ends the step
        if batch.first:
            optimizer.start_logical_batch()
        attachment.begin_batch(batch.mask)
        optimizer.signal_skip_step(not batch.last)

    loader = dpf.DPDataLoader(
        DataLoader(TensorDataset(x, y)),
        sample_rate=q,
        physical_batch_size=32,
        random=RandomSource(seed=0),
        on_batch=on_batch,
    )
    for epoch in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        epsilon = accountant.get_epsilon(1e-5)
        print(f"epoch {epoch + 1}: accuracy {accuracy:.3f}, epsilon {epsilon:.2f}")
    attachment.detach()
    return accuracy


if __name__ == "__main__":
    main()

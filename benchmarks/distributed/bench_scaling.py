"""Data-parallel scaling on the machine at hand: our DP-SGD vs non-private DDP.

For K = 1 .. --max-procs processes (gloo on CPU, one thread each, so one "device" is one core),
both modes train the same MLP on synthetic data (weak scaling: each rank has the same share):

- dp: ``PrivacyEngine.make_private`` with Poisson sampling at the global rate, expected logical
  batch L per rank cut into physical batches of P rows; one all-reduce per logical step;
- non_private: ``DistributedDataParallel``, one optimizer step (and gradient all-reduce) per
  physical batch of P rows, the usual way.

Reported per (K, mode): examples/s over all ranks, parallel efficiency (examples/s over K times
the K = 1 figure of the same mode), all-reduce bytes per logical step (ours counted by the
optimizer, DDP's by a communication hook), and the efficiency the analytic model of
scaling_model.py predicts from the K = 1 compute time and an all-reduce micro-benchmark.

Usage: python benchmarks/distributed/bench_scaling.py [--max-procs 2] [--steps 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.distributed.scaling_model import efficiency_from_ratio  # noqa: E402

WIDTH, DEPTH, CLASSES = 512, 3, 10


def build_model():
    from torch import nn

    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def _worker(rank, world_size, init_file, out_dir, cfg):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    import torch_dpfast as dpf

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        logical, physical = cfg["logical"], cfg["physical"]
        n = world_size * logical * 200  # q = logical / (n / K): 200 logical steps per epoch
        x = torch.randn(n, WIDTH)
        y = torch.randint(0, CLASSES, (n,))
        dataset = TensorDataset(x, y)
        model = build_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        comm = {"bytes": 0}
        if cfg["mode"] == "dp":
            engine = dpf.PrivacyEngine()
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=DataLoader(dataset, batch_size=world_size * logical),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                physical_batch_size=physical,
            )
            steps_of = lambda: optimizer.steps_taken  # noqa: E731
        else:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            model = torch.nn.parallel.DistributedDataParallel(model)

            def counting_hook(state, bucket):
                comm["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(None, bucket)

            model.register_comm_hook(None, counting_hook)
            loader = DataLoader(
                dataset, batch_size=physical, sampler=DistributedSampler(dataset, seed=0)
            )
            counter = {"steps": 0}
            steps_of = lambda: counter["steps"] // (logical // physical)  # noqa: E731
        warmup, steps = 2, cfg["steps"]
        start = None
        for xb, yb in loader:
            if steps_of() == warmup and start is None:
                dist.barrier()
                start, comm_start = time.perf_counter(), comm["bytes"]
                dp_bytes = getattr(optimizer, "bytes_communicated", 0)
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            if cfg["mode"] != "dp":
                counter["steps"] += 1
            if steps_of() == warmup + steps:
                break
        dist.barrier()
        elapsed = time.perf_counter() - start
        if cfg["mode"] == "dp":
            comm_bytes = optimizer.bytes_communicated - dp_bytes
        else:
            comm_bytes = comm["bytes"] - comm_start
        # Examples per logical step: the expected logical batch over all ranks.
        result = dict(
            seconds=elapsed,
            logical_steps=steps,
            examples_per_s=world_size * logical * steps / elapsed,
            bytes_per_logical_step=comm_bytes / steps,
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def _allreduce_worker(rank, world_size, init_file, out_dir, nbytes):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        t = torch.zeros(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        repeats = 10
        for _ in range(repeats):
            dist.all_reduce(t)
        seconds = (time.perf_counter() - start) / repeats
        if rank == 0:
            torch.save({"seconds": seconds}, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            fn, args=(world_size, init_file, tmp, *args), nprocs=world_size, start_method="spawn"
        )
        return torch.load(os.path.join(tmp, "result.pt"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed logical steps")
    parser.add_argument("--logical", type=int, default=64, help="expected logical batch per rank")
    parser.add_argument("--physical", type=int, default=16, help="physical batch size")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    cfg = dict(steps=args.steps, logical=args.logical, physical=args.physical)
    param_bytes = sum(p.numel() * 4 for p in build_model().parameters())
    rows = []
    for workers in range(1, args.max_procs + 1):
        comm_s = spawn(_allreduce_worker, workers, param_bytes)["seconds"] if workers > 1 else 0.0
        for mode in ("non_private", "dp"):
            print(f"[bench_scaling] {workers} process(es), {mode} ...", flush=True)
            result = spawn(_worker, workers, dict(cfg, mode=mode))
            rows.append(dict(workers=workers, mode=mode, allreduce_s=comm_s, **result))
    for row in rows:
        single = next(r for r in rows if r["workers"] == 1 and r["mode"] == row["mode"])
        row["efficiency"] = row["examples_per_s"] / (row["workers"] * single["examples_per_s"])
        syncs_per_logical = 1 if row["mode"] == "dp" else args.logical // args.physical
        compute_s = single["seconds"] / single["logical_steps"] / syncs_per_logical
        row["predicted_efficiency"] = efficiency_from_ratio(row["allreduce_s"] / compute_s)
    payload = dict(
        environment=environment(),
        settings=vars(args) | {"out": str(args.out)},
        param_bytes=param_bytes,
        results=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_scaling.json", payload)
    table = markdown(payload)
    (args.out / "bench_scaling.md").write_text(table)
    print(table)
    return payload


def markdown(payload: dict) -> str:
    env, s = payload["environment"], payload["settings"]
    lines = [
        "# Data-parallel scaling: DP-SGD vs non-private DDP (gloo, one thread per process)",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; MLP {DEPTH}x{WIDTH}, "
        f"{payload['param_bytes'] / 2**20:.1f} MiB of parameters; expected logical batch "
        f"{s['logical']} per rank in physical batches of {s['physical']}; {s['steps']} timed "
        "logical steps after 2.",
        "",
        "| processes | mode | examples/s | efficiency | model predicts "
        "| all-reduce bytes per logical step |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['workers']} | {r['mode']} | {r['examples_per_s']:.0f} | {r['efficiency']:.2f} | "
            f"{r['predicted_efficiency']:.2f} | {r['bytes_per_logical_step'] / 2**20:.2f} MiB "
            f"({r['bytes_per_logical_step'] / payload['param_bytes']:.2f}x the parameters) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Triton kernels vs the reference PyTorch path and vs their floor, on ViT-B/16 and ResNet-50
layer shapes, at each precision setting.

Floor = max(FLOPs / peak rate at that precision, bytes read once / HBM bandwidth), with the
datasheet peaks of the GPU (dense tensor-core rates; FP32 FMA for "ieee"). The clipped sum is
also compared with a plain cuBLAS GEMM g^T a of the same size (the non-private weight gradient).

Usage:  python benchmarks/kernels/bench_triton.py [--out DIR] [--smoke] [--batch 64]
Writes DIR/bench_triton.json, DIR/bench_triton.md and DIR/bench_triton.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch_dpfast as dpf  # noqa: E402
from benchmarks.common import environment, measure, pyplot, summary, write_json  # noqa: E402
from benchmarks.kernels.shapes import VIT_B_BLOCK  # noqa: E402

# Dense peaks (FLOP/s) per precision and HBM bandwidth (B/s), from NVIDIA's datasheets (SXM).
PEAKS = {
    "H100": {"ieee": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "bandwidth": 3.35e12},
    "H200": {"ieee": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "bandwidth": 4.8e12},
}
LINEAR_SHAPES = [
    *VIT_B_BLOCK,
    ("vit_b.head", 1, 768, 100),
]
# (name, C_in, H, C_out, kernel, stride, padding, method)
CONV_SHAPES = [
    ("resnet50.l1.3x3", 64, 56, 64, 3, 1, 1, "direct"),
    ("resnet50.l4.3x3", 512, 7, 512, 3, 1, 1, "ghost"),
]
SMOKE_LINEAR = [("smoke.seq", 20, 8, 6)]
SMOKE_CONV = [("smoke.conv", 3, 6, 4, 3, 1, 1, "direct")]


def _peaks(env: dict) -> dict | None:
    return next((p for name, p in PEAKS.items() if name in env["device"]), None)


def _floor_ms(flops: float, nbytes: float, peaks: dict | None, precision: str) -> float | None:
    if peaks is None:
        return None
    return max(flops / peaks[precision], nbytes / peaks["bandwidth"]) * 1e3


def bench_linear(device, batch, shapes, precisions, repeats, gen, peaks):
    rows = []
    for name, t, d_in, d_out in shapes:
        a = torch.randn(batch, t, d_in, generator=gen).to(device)
        g = torch.randn(batch, t, d_out, generator=gen).to(device)
        scale = torch.rand(batch, generator=gen).to(device)
        io_bytes = 4 * batch * t * (d_in + d_out)
        cases = {
            "ghost_norm": (
                batch * t * t * (d_in + d_out),
                io_bytes,
                lambda b, a=a, g=g: dpf.ops.linear_norm_sq(a, g, "ghost", b),
            ),
            "direct_norm": (
                2 * batch * t * d_in * d_out,
                io_bytes,
                lambda b, a=a, g=g: dpf.ops.linear_norm_sq(a, g, "direct", b),
            ),
            "clipped_sum": (
                2 * batch * t * d_in * d_out,
                io_bytes + 4 * d_in * d_out,
                lambda b, a=a, g=g, s=scale: dpf.ops.linear_clipped_sum(a, g, s, b),
            ),
        }
        for precision in precisions:
            with dpf.precision(precision):
                for kernel, (flops, nbytes, fn) in cases.items():
                    row = dict(
                        case=name,
                        kernel=kernel,
                        precision=precision,
                        shape=[batch, t, d_in, d_out],
                        flops=flops,
                        bytes=nbytes,
                        floor_ms=_floor_ms(flops, nbytes, peaks, precision),
                    )
                    for backend in ("reference", "triton"):
                        times = measure(lambda fn=fn, b=backend: fn(b), device, repeats)
                        row[backend] = dict(times_ms=times, **summary(times))
                    if kernel == "clipped_sum":
                        times = measure(
                            lambda a=a, g=g: g.flatten(0, 1).mT @ a.flatten(0, 1), device, repeats
                        )
                        row["cublas_gemm"] = dict(times_ms=times, **summary(times))
                    rows.append(row)
    return rows


def bench_conv(device, batch, shapes, precisions, repeats, gen, peaks):
    rows = []
    for name, c_in, h, c_out, k, s, p, method in shapes:
        x = torch.randn(batch, c_in, h, h, generator=gen).to(device)
        h_out = (h + 2 * p - k) // s + 1
        g = torch.randn(batch, c_out, h_out, h_out, generator=gen).to(device)
        t, d_in = h_out * h_out, c_in * k * k
        flops = (
            batch * t * t * (d_in + c_out) if method == "ghost" else 2 * batch * t * d_in * c_out
        )
        nbytes = 4 * batch * t * (d_in + c_out)
        for precision in precisions:
            with dpf.precision(precision):
                row = dict(
                    case=name,
                    kernel=f"conv_{method}_norm",
                    precision=precision,
                    shape=[batch, c_in, h, c_out, k, s, p],
                    flops=flops,
                    bytes=nbytes,
                    floor_ms=_floor_ms(flops, nbytes, peaks, precision),
                )
                for backend in ("reference", "triton"):
                    times = measure(
                        lambda b=backend, x=x, g=g, k=k, s=s, p=p, m=method: dpf.ops.conv_norm_sq(
                            x, g, k, s, p, method=m, backend=b
                        ),
                        device,
                        repeats,
                    )
                    row[backend] = dict(times_ms=times, **summary(times))
                rows.append(row)
    return rows


def markdown(env: dict, settings: dict, rows: list[dict]) -> str:
    lines = [
        f"# Triton kernels vs reference and floor on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
        f"{env['time_utc']}; batch {settings['batch']}. Median milliseconds; speed-up = "
        "reference / triton; floor ratio = triton / floor.",
        "",
        "| case | kernel | precision | reference | triton | speed-up | floor | "
        "triton / floor | cuBLAS GEMM | triton / GEMM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref, tri = r["reference"]["median_ms"], r["triton"]["median_ms"]
        floor = f"{r['floor_ms']:.3f}" if r["floor_ms"] else "n/a"
        vs_floor = f"{tri / r['floor_ms']:.2f}x" if r["floor_ms"] else "n/a"
        gemm = r.get("cublas_gemm", {}).get("median_ms")
        lines.append(
            f"| {r['case']} | {r['kernel']} | {r['precision']} | {ref:.3f} | {tri:.3f} | "
            f"{ref / tri:.2f}x | {floor} | {vs_floor} | "
            f"{f'{gemm:.3f}' if gemm else ''} | {f'{tri / gemm:.2f}x' if gemm else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    fig, axes = plt.subplots(
        1, len(precisions), figsize=(6 * len(precisions), 4.5), sharey=True, squeeze=False
    )
    for ax, precision in zip(axes[0], precisions):
        sel = [r for r in rows if r["precision"] == precision]
        labels = [f"{r['case']}\n{r['kernel']}" for r in sel]
        xs = range(len(sel))
        speedup = [r["reference"]["median_ms"] / r["triton"]["median_ms"] for r in sel]
        ax.bar(xs, speedup, color="tab:blue", label="reference / triton")
        floors = [r["floor_ms"] / r["triton"]["median_ms"] if r["floor_ms"] else 0 for r in sel]
        ax.plot(xs, floors, "o", color="tab:red", label="floor / triton (1 = at floor)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=60, fontsize=6, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"precision {precision}")
        ax.legend(fontsize=7)
    fig.suptitle("Triton kernels: speed-up over the reference path, and distance to the floor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (interpreter on CPU)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if "triton" not in dpf.ops.available("linear_norm_sq"):
        raise SystemExit("bench_triton: Triton is not installed")
    device, gen = args.device, torch.Generator().manual_seed(0)
    batch = 2 if args.smoke else args.batch
    repeats = args.repeats or (2 if args.smoke else 20)
    linear, conv = (SMOKE_LINEAR, SMOKE_CONV) if args.smoke else (LINEAR_SHAPES, CONV_SHAPES)
    precisions = ["ieee"] if args.smoke else ["ieee", "tf32", "bf16"]
    env = environment()
    peaks = _peaks(env)
    print(f"[bench_triton] linear layers on {device} ...", flush=True)
    rows = bench_linear(device, batch, linear, precisions, repeats, gen, peaks)
    print(f"[bench_triton] conv layers on {device} ...", flush=True)
    rows += bench_conv(device, max(1, batch // 4), conv, precisions, repeats, gen, peaks)
    settings = dict(
        device=device,
        batch=batch,
        conv_batch=max(1, batch // 4),
        repeats=repeats,
        smoke=args.smoke,
        peaks=peaks,
    )
    write_json(
        args.out / "bench_triton.json", {"environment": env, "settings": settings, "results": rows}
    )
    (args.out / "bench_triton.md").write_text(markdown(env, settings, rows))
    print(f"wrote {args.out / 'bench_triton.md'}")
    plot(rows, args.out / "bench_triton.png")


if __name__ == "__main__":
    main()

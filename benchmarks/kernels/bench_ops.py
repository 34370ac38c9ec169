"""Micro-benchmarks of torch_dpfast.ops on ViT-B/16 and ResNet-50 layer shapes.

Measures, side by side in one process:
  * norm methods: ghost vs direct per-example norms (and which one ``method="auto"`` picks);
  * book-keeping clipped sums vs the non-private weight-gradient GEMM of the same layer;
  * multi-tensor clip_accumulate_ and add_noise_ per backend vs a per-parameter Python loop
    (how Opacus clips and noises);
  * the layer ops (norms, clipped sums) on every backend of the device against the reference
    (on CPU: the C++ kernels; Triton is left out there, its interpreter is not a kernel).

Usage:  python benchmarks/kernels/bench_ops.py [--out DIR] [--smoke] [--repeats N]
Writes DIR/bench_ops.json (environment + raw timings), DIR/bench_ops.md and DIR/bench_ops.png.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch_dpfast as dpf  # noqa: E402
from benchmarks.common import environment, measure, pyplot, summary, write_json  # noqa: E402
from benchmarks.kernels.shapes import VIT_B_BLOCK, VIT_S_BLOCK  # noqa: E402
from torch_dpfast.ops._checks import norm_method  # noqa: E402

# (name, T, d_in, d_out): ViT-B/16 at 224 (T = 197) and a 512-token text layer.
LINEAR_SHAPES = [
    *VIT_B_BLOCK,
    ("vit_b.head", 1, 768, 1000),
    ("text512.ffn", 512, 768, 3072),
]
# (name, C_in, H, C_out, kernel, stride, padding): ResNet-50 at 224.
CONV_SHAPES = [
    ("resnet50.stem", 3, 224, 64, 7, 2, 3),
    ("resnet50.l1.3x3", 64, 56, 64, 3, 1, 1),
    ("resnet50.l1.1x1", 256, 56, 64, 1, 1, 0),
    ("resnet50.l3.3x3", 256, 14, 256, 3, 1, 1),
    ("resnet50.l4.3x3", 512, 7, 512, 3, 1, 1),
]
VIT_S_PATCH = ("vit_s.patch_embed", 3, 224, 384, 16, 16, 0)
SMOKE_LINEAR = [("smoke.seq", 5, 8, 6), ("smoke.flat", 1, 8, 6)]
SMOKE_CONV = [("smoke.conv", 3, 8, 4, 3, 1, 1)]


def _vit_b_parameter_shapes(depth: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT-B/16 (``depth`` blocks): ~7M parameters per block."""
    d, hidden = 768, 3072
    block = [
        (d,),
        (d,),
        (3 * d, d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (hidden, d),
        (hidden,),
        (d, hidden),
        (d,),
    ]
    return [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)] + block * depth + [(d,), (d,)]


def bench_norm_methods(device, batch, shapes, conv_shapes, repeats, gen):
    rows = []
    for name, t, d_in, d_out in shapes:
        a = torch.randn(batch, t, d_in, generator=gen).to(device)
        g = torch.randn(batch, t, d_out, generator=gen).to(device)
        chosen = norm_method("auto", t, d_in, d_out)
        for method in ("ghost", "direct"):
            times = measure(
                lambda a=a, g=g, m=method: dpf.ops.linear_norm_sq(a, g, m, "reference"),
                device,
                repeats,
            )
            rows.append(
                dict(
                    group="norm_method",
                    case=name,
                    shape=[batch, t, d_in, d_out],
                    variant=method,
                    auto_choice=chosen,
                    times_ms=times,
                    **summary(times),
                )
            )
    batch = max(1, batch // 2)  # the ghost Grams of a stem conv are B x 12544^2 floats
    for name, c_in, h, c_out, k, s, p in conv_shapes:
        x = torch.randn(batch, c_in, h, h, generator=gen).to(device)
        h_out = (h + 2 * p - k) // s + 1
        g = torch.randn(batch, c_out, h_out, h_out, generator=gen).to(device)
        chosen = norm_method("auto", h_out * h_out, c_in * k * k, c_out)
        for method in ("ghost", "direct"):
            times = measure(
                lambda x=x, g=g, k=k, s=s, p=p, m=method: dpf.ops.conv_norm_sq(
                    x, g, k, s, p, method=m, backend="reference"
                ),
                device,
                repeats,
            )
            rows.append(
                dict(
                    group="norm_method",
                    case=name,
                    shape=[batch, c_in, h, c_out, k, s, p],
                    variant=method,
                    auto_choice=chosen,
                    times_ms=times,
                    **summary(times),
                )
            )
    return rows


def _linear_inputs(device, batch, t, d_in, d_out, gen):
    """A linear layer's a (B, T, d_in), g (B, T, d_out) and per-example scales (B,)."""
    a = torch.randn(batch, t, d_in, generator=gen).to(device)
    g = torch.randn(batch, t, d_out, generator=gen).to(device)
    return a, g, torch.rand(batch, generator=gen).to(device)


def bench_clipped_sums(device, batch, shapes, repeats, gen):
    """BK clipped sum vs the plain weight gradient g^T a of the same layer (non-private)."""
    rows = []
    for name, t, d_in, d_out in shapes:
        a, g, scale = _linear_inputs(device, batch, t, d_in, d_out, gen)
        variants = {
            "non_private_weight_grad": lambda a=a, g=g: g.flatten(0, 1).mT @ a.flatten(0, 1),
            "linear_clipped_sum": lambda a=a, g=g, c=scale: dpf.ops.linear_clipped_sum(
                a, g, c, "reference"
            ),
        }
        for variant, fn in variants.items():
            times = measure(fn, device, repeats)
            rows.append(
                dict(
                    group="clipped_sum",
                    case=name,
                    shape=[batch, t, d_in, d_out],
                    variant=variant,
                    times_ms=times,
                    **summary(times),
                )
            )
    return rows


def _device_backends(op: str, device: str) -> list[str]:
    """The backends of ``op`` that run compiled on ``device`` (Triton only on CUDA)."""
    runs_on = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda"}
    return [b for b in dpf.ops.available(op) if runs_on.get(b, device) == device]


def _layer_calls(device, batch, shapes, conv_shapes, gen):
    """(op, case, shape, call(backend)) for every layer op on the given layer shapes."""
    calls = []
    for name, t, d_in, d_out in shapes:
        a, g, c = _linear_inputs(device, batch, t, d_in, d_out, gen)
        shape = [batch, t, d_in, d_out]
        for m in ("ghost", "direct"):
            norm = functools.partial(dpf.ops.linear_norm_sq, a, g, m)
            calls.append(("linear_norm_sq", f"{name} {m}", shape, norm))
        clipped = functools.partial(dpf.ops.linear_clipped_sum, a, g, c)
        calls.append(("linear_clipped_sum", name, shape, clipped))
    for name, c_in, h, c_out, k, s, p in conv_shapes:
        x = torch.randn(batch, c_in, h, h, generator=gen).to(device)
        h_out = (h + 2 * p - k) // s + 1
        g = torch.randn(batch, c_out, h_out, h_out, generator=gen).to(device)
        c = torch.rand(batch, generator=gen).to(device)
        shape, geometry = [batch, c_in, h, c_out, k, s, p], dict(stride=s, padding=p)
        norm = functools.partial(dpf.ops.conv_norm_sq, x, g, k, **geometry)
        clipped = functools.partial(dpf.ops.conv_clipped_sum, x, g, c, k, **geometry)
        calls.append(("conv_norm_sq", f"{name} auto", shape, lambda b, f=norm: f(backend=b)))
        calls.append(("conv_clipped_sum", name, shape, lambda b, f=clipped: f(backend=b)))
    vocab, t, d = 30522, 128, 768  # a BERT-base token embedding; frequent tokens repeat
    ids = torch.randint(0, 2000, (batch, t), generator=gen).to(device)
    g = torch.randn(batch, t, d, generator=gen).to(device)
    norm = functools.partial(dpf.ops.embedding_norm_sq, ids, g, vocab)
    shape = [batch, t, vocab, d]
    calls.append(("embedding_norm_sq", "bert.tokens", shape, lambda b, f=norm: f(backend=b)))
    return calls


def bench_layer_backends(device, batch, shapes, conv_shapes, repeats, gen):
    """Every compiled backend of each layer op against the reference, on the same inputs."""
    rows = []
    for op, case, shape, call in _layer_calls(device, batch, shapes, conv_shapes, gen):
        for backend in ["reference"] + [
            b for b in _device_backends(op, device) if b != "reference"
        ]:
            try:
                call(backend)
            except ValueError as refused:  # e.g. tensor-core kernels at "ieee" precision
                print(f"[bench_ops] {op} {case}: {backend} skipped ({refused})", flush=True)
                continue
            times = measure(lambda b=backend, f=call: f(b), device, repeats)
            rows.append(
                dict(
                    group="layer_backends",
                    case=f"{op}: {case}",
                    shape=shape,
                    variant=backend,
                    times_ms=times,
                    **summary(times),
                )
            )
    return rows


def _loop_clip_accumulate(per_example, summed, max_norm):
    """Opacus-style: one norm per tensor, stacked, then one scaled sum per tensor."""
    norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in per_example], dim=1).norm(2, dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g, s in zip(per_example, summed):
        s.add_(torch.einsum("i,i...", factors, g))


def _loop_add_noise(grads, std, scale, generator):
    for g in grads:
        g.add_(torch.normal(0.0, std, g.shape, device=g.device, generator=generator)).mul_(scale)


def _foreach_add_noise(grads, std, scale, generator):
    """torch._foreach_* for the arithmetic; the noise itself is still one draw per tensor."""
    noise = [torch.randn(g.shape, device=g.device, generator=generator) for g in grads]
    torch._foreach_add_(grads, noise, alpha=std)
    torch._foreach_mul_(grads, scale)


def _bit_parameter_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of timm's BiT-R50x1 (resnetv2_50x1_bit), built on the meta device."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("resnetv2_50x1_bit", num_classes=1000)
    return [tuple(p.shape) for p in model.parameters()]


def parameter_lists(device: str, smoke: bool) -> dict[str, list[tuple[int, ...]]]:
    """The parameter lists the multi-tensor ops run on: ViT-B/16 (12 blocks on CUDA, 1 on CPU,
    where per-example gradients of the whole model do not fit a quick run) and BiT-R50x1 (CUDA)."""
    if smoke:
        return {"smoke": [(3, 4), (5,)]}
    if device == "cpu":
        return {"ViT-B/16, 1 block": _vit_b_parameter_shapes(depth=1)}
    return {"ViT-B/16": _vit_b_parameter_shapes(depth=12), "BiT-R50x1": _bit_parameter_shapes()}


def bench_multi_tensor(device, batch, param_lists, repeats, gen):
    rows = []
    for name, param_shapes in param_lists.items():
        rows += _bench_one_list(device, batch, name, param_shapes, repeats, gen)
    return rows


def _bench_one_list(device, batch, name, param_shapes, repeats, gen):
    rows = []
    n_params = sum(math.prod(s) for s in param_shapes)
    case = f"{name}: {len(param_shapes)} tensors"
    summed = [torch.zeros(s, device=device) for s in param_shapes]
    per_example = [torch.randn(batch, *s, generator=gen).to(device) for s in param_shapes]
    variants = {"python_loop": lambda: _loop_clip_accumulate(per_example, summed, 1.0)}
    for backend in dpf.ops.available("clip_accumulate_"):
        if {"cpp": "cpu", "cuda": "cuda"}.get(backend, device) == device:
            variants[backend] = lambda b=backend: dpf.ops.clip_accumulate_(
                per_example, summed, 1.0, backend=b
            )
    for variant, fn in variants.items():
        times = measure(fn, device, repeats)
        rows.append(
            dict(
                group="clip_accumulate_",
                case=case,
                shape=[batch, len(param_shapes), n_params],
                variant=variant,
                times_ms=times,
                **summary(times),
            )
        )
    per_example.clear()  # frees the per-example gradients before the noise runs
    generator = torch.Generator(device=device).manual_seed(0)
    variants = {
        "python_loop": lambda: _loop_add_noise(summed, 1.0, 0.5, generator),
        "foreach": lambda: _foreach_add_noise(summed, 1.0, 0.5, generator),
    }
    for backend in dpf.ops.available("add_noise_"):
        if {"cpp": "cpu", "cuda": "cuda"}.get(backend, device) == device:
            variants[backend] = lambda b=backend: dpf.ops.add_noise_(summed, 1.0, 0.5, None, b)
    for variant, fn in variants.items():
        times = measure(fn, device, repeats)
        rows.append(
            dict(
                group="add_noise_",
                case=case,
                shape=[len(param_shapes), n_params],
                variant=variant,
                times_ms=times,
                **summary(times),
            )
        )
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Kernel micro-benchmarks on {env['device']}",
        "",
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}. "
        "Median of the repeats (interquartile range in brackets), milliseconds.",
        "",
    ]
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], {}).setdefault(row["case"], []).append(row)
    titles = {
        "norm_method": "Per-example norms (reference backend): ghost vs direct, and auto's pick",
        "clipped_sum": "Book-keeping clipped sum vs the non-private weight gradient",
        "clip_accumulate_": "clip_accumulate_ vs a per-parameter Python loop",
        "add_noise_": "add_noise_ vs a per-parameter Python loop and torch._foreach_*",
        "layer_backends": "Layer ops: each compiled backend vs the reference",
    }
    for group, cases in groups.items():
        variants = list(dict.fromkeys(r["variant"] for c in cases.values() for r in c))
        extra = ["auto picks", "auto is fastest"] if group == "norm_method" else ["ratio to first"]
        lines += [
            f"## {titles[group]}",
            "",
            "| case | shape | " + " | ".join(variants) + " | " + " | ".join(extra) + " |",
            "|---" * (2 + len(variants) + len(extra)) + "|",
        ]
        for case, case_rows in cases.items():
            by = {r["variant"]: r for r in case_rows}
            cells = [
                f"{by[v]['median_ms']:.3f} [{by[v]['q1_ms']:.3f}-{by[v]['q3_ms']:.3f}]"
                if v in by
                else ""
                for v in variants
            ]
            if group == "norm_method":
                pick = case_rows[0]["auto_choice"]
                fastest = min(by, key=lambda v: by[v]["median_ms"])
                tail = [pick, "yes" if pick == fastest else f"no ({fastest} faster)"]
            else:
                first = by[variants[0]]["median_ms"]
                tail = [" / ".join(f"{by[v]['median_ms'] / first:.2f}x" for v in variants[1:])]
            lines.append(f"| {case} | {case_rows[0]['shape']} | " + " | ".join(cells + tail) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    norm_rows = [r for r in rows if r["group"] == "norm_method"]
    if not norm_rows:
        return
    cases = list(dict.fromkeys(r["case"] for r in norm_rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.38
    for offset, method in ((-width / 2, "ghost"), (width / 2, "direct")):
        values = [
            next(r["median_ms"] for r in norm_rows if r["case"] == c and r["variant"] == method)
            for c in cases
        ]
        ax.bar([i + offset for i in range(len(cases))], values, width, label=method)
    picks = [next(r["auto_choice"] for r in norm_rows if r["case"] == c) for c in cases]
    labels = [f"{c}\n(auto: {pick})" for c, pick in zip(cases, picks)]
    ax.set_xticks(range(len(cases)), labels, rotation=20, fontsize=7, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms)")
    ax.set_title("Per-example gradient norms: ghost vs direct (reference backend)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds on CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        default="ieee",
        choices=["ieee", "tf32", "bf16"],
        help="dpf.set_precision for the whole run (the CUDA layer kernels need tf32 or bf16)",
    )
    parser.add_argument(
        "--groups",
        default="norm_method,clipped_sum,multi_tensor,layer_backends",
        help="comma-separated subset of norm_method, clipped_sum, multi_tensor, layer_backends",
    )
    args = parser.parse_args(argv)
    with dpf.precision(args.precision):  # restored on return (the tests call main in-process)
        run(args, parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    device = args.device
    repeats = args.repeats or (2 if args.smoke else 20)
    gen = torch.Generator().manual_seed(0)
    if args.smoke:
        batch, shapes, conv_shapes = 2, SMOKE_LINEAR, SMOKE_CONV
    else:
        batch, shapes, conv_shapes = 32, LINEAR_SHAPES, CONV_SHAPES
    params = parameter_lists(device, args.smoke)
    # CPU: ViT-S/16 at batch 8 (the CPU training benchmark) and ViT-B/16; CUDA: ViT-B/16 at 32.
    if args.smoke:
        layer_setup = (batch, shapes, conv_shapes)
    elif device == "cpu":
        layer_setup = (8, VIT_S_BLOCK + LINEAR_SHAPES[:4], [VIT_S_PATCH, *CONV_SHAPES[1:3]])
    else:
        layer_setup = (batch, LINEAR_SHAPES, [VIT_S_PATCH, *CONV_SHAPES])
    env = environment()
    rows = []
    groups = {
        "norm_method": lambda: bench_norm_methods(device, batch, shapes, conv_shapes, repeats, gen),
        "clipped_sum": lambda: bench_clipped_sums(device, batch, shapes, repeats, gen),
        "multi_tensor": lambda: bench_multi_tensor(
            device, batch if args.smoke else 8, params, repeats, gen
        ),
        "layer_backends": lambda: bench_layer_backends(device, *layer_setup, repeats, gen),
    }
    chosen = args.groups.split(",")
    unknown = set(chosen) - set(groups)
    if unknown:
        parser.error(f"unknown --groups {sorted(unknown)}; choose from {sorted(groups)}")
    for name in chosen:
        print(f"[bench_ops] {name} on {device} ...", flush=True)
        rows += groups[name]()
    settings = dict(
        device=device,
        batch=batch,
        repeats=repeats,
        smoke=args.smoke,
        groups=chosen,
        precision=dpf.get_precision(),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
    )
    write_json(
        args.out / "bench_ops.json", {"environment": env, "settings": settings, "results": rows}
    )
    (args.out / "bench_ops.md").write_text(markdown(env, rows))
    print(f"wrote {args.out / 'bench_ops.md'}")
    plot(rows, args.out / "bench_ops.png")


if __name__ == "__main__":
    main()

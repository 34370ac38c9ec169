"""How far honest examples are from the certification limit: U_i / ||G_i|| per layer.

certify.py trusts a fast-path norm when U_i^2 <= ||G_i||^2 * 1e-3 / (16 u), i.e.
U_i / ||G_i|| <= 32 in float32, where U_i is the rule's cancellation-free bound. This runs one
batch of random images through a model, takes every linear and conv layer's (x, g) from the
engine's own captures, and prints, per layer, the largest U_i / ||G_i|| (||G_i|| exact, float64
per-example gradients) and the float32 ghost norm's largest relative error against it.

Usage: python benchmarks/bound_ratios.py --models vit_small,resnet18_gn --batch 4
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __name__ == "__main__":  # run as a script: import from the repository root, not benchmarks/
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.training import MODELS, build_model  # noqa: E402


def ratios(model_name: str, batch: int) -> list[tuple[str, tuple, float, float]]:
    """[(layer type, output gradient shape, max U/||G||, max relative error of the float32
    norm)]."""
    import torch_dpfast as dpf
    from torch_dpfast import certify

    torch.manual_seed(0)
    model = build_model(model_name)
    size = MODELS[model_name][1]
    attachment = dpf.attach(model, clipping="bk", probe_coupling=False)
    rows = []
    try:
        x = torch.randn(batch, 3, size, size)
        F.cross_entropy(model(x), torch.randint(0, 100, (batch,)), reduction="sum").backward()
        for record in attachment._records:
            if record.g is None or not hasattr(record.rule, "norm_bound"):
                continue
            bound = record.rule.norm_bound(record.module, record.x, record.g)
            exact, _ = certify.recompute(record, record.x, record.g, torch.arange(batch))
            fast = record.rule.norm_sq(record.module, record.x, record.g).double()
            nonzero = exact > 0
            if not nonzero.any():
                continue
            ratio = (bound[nonzero] / exact[nonzero].sqrt()).max().item()
            error = ((fast - exact).abs()[nonzero] / exact[nonzero]).max().item()
            rows.append((type(record.module).__name__, tuple(record.g.shape[1:]), ratio, error))
    finally:
        attachment.detach()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small,resnet18_gn")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        rows = ratios(name, args.batch)
        print(f"{MODELS[name][2]}: {len(rows)} layer calls")
        for kind, shape, ratio, error in rows:
            print(f"  {kind:10s} g {str(shape):18s} max U/||G|| {ratio:7.2f}  error {error:.1e}")
        if rows:
            print(f"  largest U/||G||: {max(r[2] for r in rows):.2f} (float32 limit 32)")


if __name__ == "__main__":
    main()

"""Plots of the training benchmarks in the style of the seed paper's figures (PNG, matplotlib).

Each function takes the ``results`` list that throughput.py or max_batch.py writes to JSON and
an output folder, draws what the results support and returns the files it wrote.
"""

from __future__ import annotations

import pathlib

from benchmarks.common import pyplot
from benchmarks.training import MODELS


def _label(model: str) -> str:
    return MODELS[model][2]


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


def best_rows(results: list[dict], precision: str) -> dict[tuple[str, str], dict]:
    """(model, mode) -> the row of that mode's highest throughput over physical batch sizes."""
    best = {}
    for r in _ok(results):
        key = (r["model"], r["mode"])
        if r["precision"] == precision and (
            key not in best or r["samples_per_s"] > best[key]["samples_per_s"]
        ):
            best[key] = r
    return best


def _grouped_bars(ax, models, modes, value, ylabel, spread=None):
    """Bars of ``value(model, mode)``; ``spread(model, mode)`` -> (low, high) draws its range."""
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        xs = [i + j * width for i in range(len(models))]
        heights = [value(m, mode) for m in models]
        yerr = None
        if spread is not None:
            ranges = [spread(m, mode) for m in models]
            yerr = [
                [h - low for h, (low, _) in zip(heights, ranges)],
                [high - h for h, (_, high) in zip(heights, ranges)],
            ]
        ax.bar(xs, heights, width, label=mode, yerr=yerr, capsize=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
    ax.set_xticklabels([_label(m) for m in models], rotation=20)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def throughput_figures(results: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """Fig. 1 (throughput relative to non-private), Fig. 3 (non-private / DP: how many times
    more a DP example costs), Fig. 6 (throughput vs physical batch) and Fig. 7 (TF32 over FP32
    throughput), each from what ``results`` holds."""
    plt = pyplot()
    good = _ok(results)
    if plt is None or not good:
        return []
    written = []
    precision = good[0]["precision"]
    models = list(dict.fromkeys(r["model"] for r in good))
    private = [m for m in dict.fromkeys(r["mode"] for r in good) if m != "non_private"]
    best = best_rows(results, precision)

    def ratio(model, mode):
        return best.get((model, mode), {}).get("ratio", 0.0)

    def cost(model, mode):
        r = ratio(model, mode)
        return 1.0 / r if r else 0.0

    def ratio_range(model, mode):
        row = best.get((model, mode), {})
        return row.get("ratio_min", ratio(model, mode)), row.get("ratio_max", ratio(model, mode))

    def cost_range(model, mode):
        low, high = ratio_range(model, mode)
        return (1.0 / high if high else 0.0), (1.0 / low if low else 0.0)

    for name, value, spread, ylabel in (
        ("relative_throughput.png", ratio, ratio_range, "throughput / non-private"),
        ("dp_cost.png", cost, cost_range, "non-private / DP throughput"),
    ):
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models)), 3.6))
        _grouped_bars(ax, models, private, value, ylabel, spread)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(
            f"{precision}, each mode at its best physical batch\n"
            "median of the per-round ratios; whiskers: their range",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    if len({r["physical"] for r in good}) > 1:
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            for mode in dict.fromkeys(r["mode"] for r in good):
                rows = sorted(
                    (
                        r
                        for r in good
                        if (r["model"], r["mode"], r["precision"]) == (model, mode, precision)
                    ),
                    key=lambda r: r["physical"],
                )
                ax.errorbar(
                    [r["physical"] for r in rows],
                    [r["samples_per_s"] for r in rows],
                    yerr=[
                        [r["samples_per_s"] - r["samples_per_s_min"] for r in rows],
                        [r["samples_per_s_max"] - r["samples_per_s"] for r in rows],
                    ],
                    marker="o",
                    capsize=3,
                    label=mode,
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("physical batch size")
            ax.set_ylabel("examples / s")
            ax.set_title(f"{_label(model)}, {precision}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_batch.png", dpi=120)
        plt.close(fig)
        written.append(out / "throughput_vs_batch.png")

    if {"fp32", "tf32"} <= {r["precision"] for r in good}:
        fp32, tf32 = best_rows(results, "fp32"), best_rows(results, "tf32")
        modes = list(dict.fromkeys(r["mode"] for r in good))

        def speedup(model, mode):
            a, b = fp32.get((model, mode)), tf32.get((model, mode))
            return b["samples_per_s"] / a["samples_per_s"] if a and b else 0.0

        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models)), 3.6))
        _grouped_bars(ax, models, modes, speedup, "TF32 / FP32 throughput")
        ax.axhline(1.0, color="black", linewidth=0.8)
        fig.tight_layout()
        fig.savefig(out / "tf32_speedup.png", dpi=120)
        plt.close(fig)
        written.append(out / "tf32_speedup.png")
    return written


def max_batch_figures(results: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """Fig. 2 (largest physical batch per model and mode) and Fig. 5 (throughput at it)."""
    plt = pyplot()
    good = _ok(results)
    if plt is None or not good:
        return []
    written = []
    models = list(dict.fromkeys(r["model"] for r in good))
    modes = list(dict.fromkeys(r["mode"] for r in good))
    table = {(r["model"], r["mode"]): r for r in good}
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models)), 3.6))
    _grouped_bars(
        ax, models, modes, lambda m, k: table.get((m, k), {}).get("max_batch", 0), "max batch"
    )
    fig.tight_layout()
    fig.savefig(out / "max_batch.png", dpi=120)
    plt.close(fig)
    written.append(out / "max_batch.png")
    if any("samples_per_s" in r for r in good):
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models)), 3.6))
        _grouped_bars(
            ax,
            models,
            modes,
            lambda m, k: table.get((m, k), {}).get("samples_per_s", 0),
            "examples / s at the max batch",
        )
        fig.tight_layout()
        fig.savefig(out / "throughput_at_max_batch.png", dpi=120)
        plt.close(fig)
        written.append(out / "throughput_at_max_batch.png")
    return written

"""The model-level benchmark suite (throughput, max_batch, profile): the training harness counts
what it claims, the batch search finds the boundary, the profile files parts under the right
phase, and each script's CPU smoke run writes its JSON, table and plots."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import max_batch, profile, throughput
from benchmarks.training import Run, Settings
from torch_dpfast import coupling


def test_dp_steps_count_real_examples_not_padding_rows():
    physical, logical, size = 3, 5, 40
    run = Run(Settings("smoke_vit", "dpfast_auto", "fp32", physical, logical, "cpu", size))
    rows = []
    # training forwards only (not the independence probe's on the first batch)
    run.model.register_forward_hook(
        lambda m, args, out: None if coupling.probing() else rows.append(len(args[0]))
    )
    steps = list(run.logical_steps(40))
    examples = [n for n, _, _ in steps]
    assert all(seconds > 0 for _, _, seconds in steps)
    assert all(rows_seen == physical for rows_seen in rows)  # fixed-shape physical batches
    assert sum(examples) <= len(rows) * physical == sum(r for _, r, _ in steps)
    # Poisson sizes: Binomial(40, 1/8) has mean 5, sd 2.1; the mean of 40 draws is within
    # 5 sigma = 1.7 of 5, and padding counted as examples would give multiples of 3 only.
    assert abs(sum(examples) / len(examples) - logical) < 5 * math.sqrt(5 * 7 / 8 / 40)
    assert any(n % physical for n in examples)


def test_non_private_steps_accumulate_whole_physical_batches():
    run = Run(Settings("smoke_vit", "non_private", "fp32", 3, 7, "cpu", 60))
    steps = list(run.logical_steps(4))
    assert [(n, r) for n, r, _ in steps] == [(9, 9)] * 4  # ceil(7 / 3) = 3 batches of 3


def test_unknown_model_mode_or_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown mode 'flat'"):
        Settings("smoke_vit", "flat")
    with pytest.raises(ValueError, match="precision must be one of"):
        Settings("smoke_vit", "non_private", "fp16")
    with pytest.raises(SystemExit):
        throughput.main(["--models", "resnet9000", "--out", "/tmp/unused"])


def test_throughput_smoke_run_writes_json_table_and_plots(tmp_path):
    payload = throughput.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in payload["results"]}
    assert set(rows) == {"non_private", "dpfast_auto", "opacus_hooks"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["peak_memory_mib"] > 0
        (round_,) = r["rounds"]
        assert len(round_["examples"]) == 3  # logical steps, the first not timed
        assert r["samples_per_s"] == pytest.approx(
            sum(round_["examples"][1:]) / sum(round_["seconds"][1:])
        )
        assert r["rows_per_s"] == pytest.approx(
            sum(round_["rows"][1:]) / sum(round_["seconds"][1:])
        )
    assert rows["non_private"]["ratio"] == 1.0
    assert rows["dpfast_auto"]["ratio"] == pytest.approx(
        rows["dpfast_auto"]["samples_per_s"] / rows["non_private"]["samples_per_s"]
    )
    assert json.loads((tmp_path / "throughput.json").read_text())["environment"]["commit"]
    assert (
        "| tiny ViT (2 blocks, 32x32) | fp32 | 4 | dpfast_auto |"
        in (tmp_path / "throughput.md").read_text()
    )
    assert (tmp_path / "relative_throughput.png").exists() and (tmp_path / "dp_cost.png").exists()


@pytest.mark.parametrize("largest", [0, 1, 2, 5, 37, 63, 64, 100])
def test_max_batch_search_finds_the_largest_batch_that_fits(largest):
    tried = []

    def fits(b):
        tried.append(b)
        return {"fits": b <= largest}

    result = max_batch.search(fits, cap=64, progress=lambda msg: None)
    assert result["max_batch"] == min(largest, 64)
    assert result["capped"] == (largest >= 64)
    assert len(tried) == len(set(tried)) <= 2 * math.log2(64) + 1
    assert [p["batch"] for p in result["probes"]] == tried


def test_max_batch_search_stops_at_an_error_that_is_not_out_of_memory():
    result = max_batch.search(
        lambda b: {"fits": True} if b < 4 else {"error": "RuntimeError: boom"},
        cap=64,
        progress=lambda msg: None,
    )
    assert result["error"] == "RuntimeError: boom" and "max_batch" not in result


def test_max_batch_probe_runs_out_of_memory_in_a_small_budget_and_fits_in_a_large_one():
    settings = Settings("smoke_vit", "non_private", "fp32", 2, 4, "cpu")
    assert max_batch.probe_in_process(settings, memory_gib=0.005) == {"fits": False}
    assert max_batch.probe_in_process(settings, memory_gib=0.5) == {"fits": True}


def test_max_batch_smoke_run_writes_json_table_and_plots(tmp_path):
    payload = max_batch.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in payload["results"]}
    assert set(rows) == {"non_private", "dpfast_auto"}
    for r in rows.values():
        assert r["max_batch"] == 2 and r["capped"] and r["samples_per_s"] > 0, r
        assert [p["batch"] for p in r["probes"]] == [1, 2]
    assert "| >= 2 |" in (tmp_path / "max_batch.md").read_text()
    assert (tmp_path / "max_batch.png").exists()
    assert (tmp_path / "throughput_at_max_batch.png").exists()


def _event(name, parent=None, micros=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, cpu_time_total=micros)


def test_profile_files_parts_under_their_phase_and_counts_nested_ones_once():
    step = _event("phase::step", micros=100.0)
    noise = _event("torch_dpfast::add_noise_", step, 30.0)
    inner = _event("torch_dpfast::clip_factors", noise, 5.0)  # inside another labelled part
    backward = _event("phase::backward", micros=50.0)
    norms = _event("torch_dpfast::linear_norm_sq", _event("aten::mm", backward), 20.0)
    orphan = _event("torch_dpfast::linear_norm_sq", None, 7.0)  # outside any phase
    parts, phases = profile.profiled_parts(
        [step, noise, inner, backward, norms, orphan], on_cuda=False
    )
    assert parts == {"step/noise": 30e-6, "backward/per-example norms": 20e-6}
    assert phases == {"forward": 0.0, "backward": 50e-6, "step": 100e-6}


def test_profile_smoke_run_splits_phases_for_us_and_for_opacus(tmp_path):
    payload = profile.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in payload["results"]}
    for r in rows.values():
        assert "error" not in r, r
        assert all(ms > 0 for ms in r["phases_ms"].values())
    assert rows["non_private"]["parts_ms"] == {}
    # Per 4 real examples (the smoke run's physical batch): non-private's batches are full.
    assert rows["non_private"]["examples"] == 4 * rows["non_private"]["physical_batches"]
    ours, opacus = rows["dpfast_auto"]["parts_ms"], rows["opacus_hooks"]["parts_ms"]
    assert ours["step/noise"] > 0 and any("norms" in k for k in ours)
    assert opacus["backward/per-example gradients (Opacus hooks)"] > 0
    assert opacus["step/clip and accumulate"] > 0
    for r in (rows["dpfast_auto"], rows["opacus_hooks"]):
        for key, ms in r["parts_ms"].items():
            assert ms <= r["phases_ms"][key.split("/")[0]] * (1 + 1e-9)
    table = (tmp_path / "profile.md").read_text()
    assert "| forward |" in table and "&nbsp;&nbsp;noise" in table
    assert (tmp_path / "profile.png").exists()


def test_our_modes_name_their_clipping_and_padding():
    from benchmarks.training import OURS, dpfast_options

    assert dpfast_options("dpfast_auto_pow2") == ("auto", "pow2")
    assert dpfast_options("dpfast_per_example") == ("per_example", "full")
    assert all(dpfast_options(m)[0] in ("auto", "bk", "ghost", "per_example") for m in OURS)


def test_certify_cost_times_the_step_with_and_without_the_certification(tmp_path, monkeypatch):
    from benchmarks import certify_cost
    from torch_dpfast import certify

    calls = []
    real = certify.check
    monkeypatch.setattr(certify, "check", lambda *a: calls.append(1) or real(*a))
    payload = certify_cost.main(
        ["--models", "smoke_vit", "--modes", "bk,ghost", "--batch", "3", "--repeats", "2"]
        + ["--out", str(tmp_path)]
    )
    assert [r["mode"] for r in payload["results"]] == ["bk", "ghost"]
    for result in payload["results"]:
        assert len(result["pairs"]) == 2 and all(on > 0 and off > 0 for on, off in result["pairs"])
        assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
    assert calls  # the certified runs went through certify.check
    assert certify.check.__name__ == "<lambda>"  # restored to what it was
    assert "certified / uncertified" in (tmp_path / "certify_cost.md").read_text()


def test_language_model_harness_trains_on_next_token_labels():
    """gpt2_lm: token ids (B, T) in, next-token labels (B, T), one private logical step."""
    pytest.importorskip("transformers")
    from benchmarks.training import Run, Settings

    run = Run(Settings("gpt2_lm", "dpfast_auto", physical=2, logical=2, dataset_size=4))
    ids, labels = run.loader.dataset[0]
    assert ids.shape == labels.shape == (128,) and torch.equal(ids[1:], labels[:-1])
    (examples, rows, seconds) = next(run.logical_steps(1))
    assert rows >= examples >= 0 and seconds > 0


def test_step_ab_writes_the_interleaved_ratios(tmp_path):
    from benchmarks import step_ab

    step_ab.main(["--models", "smoke_vit:2", "--steps", "2", "--opacus", "--out", str(tmp_path)])
    (result,) = json.loads((tmp_path / "step_ab.json").read_text())["results"]
    assert result["model"] == "smoke_vit" and len(result["ratios"]) == 2
    assert result["ratio"] > 0 and result["dpfast_auto_ms"] > 0
    assert result["ours_vs_opacus"] > 0 and len(result["raw_seconds"]["opacus"]) == 2
    assert set(result["raw_seconds"]["opacus"][0]) == {"non_private", "opacus_hooks"}
    assert "| tiny ViT" in (tmp_path / "step_ab.md").read_text()

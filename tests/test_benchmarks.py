"""The benchmark scripts run end to end (tiny shapes on CPU) and write their result files."""

import json

import torch

from benchmarks.kernels import bench_ops
from torch_dpfast import _ext


def test_bench_ops_smoke_run_writes_json_table_and_plot(tmp_path):
    bench_ops.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_ops.json").read_text())
    assert payload["environment"]["torch"] and payload["settings"]["smoke"]
    groups = {row["group"] for row in payload["results"]}
    assert groups == {
        "norm_method",
        "clipped_sum",
        "clip_accumulate_",
        "add_noise_",
        "layer_backends",
    }
    layer = {row["variant"] for row in payload["results"] if row["group"] == "layer_backends"}
    assert "reference" in layer and ("cpp" in layer) == _ext.cpu_loaded
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 2 for row in payload["results"])
    table = (tmp_path / "bench_ops.md").read_text()
    assert "| case | shape |" in table and "auto picks" in table


def test_bench_triton_smoke_run_writes_json_table_and_plot(tmp_path):
    import pytest

    import torch_dpfast as dpf

    if "triton" not in dpf.ops.available("linear_norm_sq"):
        pytest.skip("Triton is not installed")
    from benchmarks.kernels import bench_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_triton.main(["--smoke", "--device", device, "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_triton.json").read_text())
    kernels = {row["kernel"] for row in payload["results"]}
    assert kernels == {"ghost_norm", "direct_norm", "clipped_sum", "conv_direct_norm"}
    assert all(row["triton"]["median_ms"] > 0 for row in payload["results"])
    assert "| case | kernel | precision |" in (tmp_path / "bench_triton.md").read_text()


def test_bench_scaling_smoke_run(tmp_path):
    from benchmarks.distributed import bench_scaling

    payload = bench_scaling.main(
        [
            "--max-procs",
            "2",
            "--steps",
            "1",
            "--logical",
            "16",
            "--physical",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    rows = {(r["workers"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {(1, "non_private"), (1, "dp"), (2, "non_private"), (2, "dp")}
    # One all-reduce of the parameters per logical step for DP, one per physical batch for DDP.
    assert rows[2, "dp"]["bytes_per_logical_step"] == payload["param_bytes"]
    assert rows[2, "non_private"]["bytes_per_logical_step"] == 2 * payload["param_bytes"]
    assert (tmp_path / "bench_scaling.md").exists()

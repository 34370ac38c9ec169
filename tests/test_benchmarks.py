"""The benchmark scripts run end to end (tiny shapes on CPU) and write their result files."""

import json

from benchmarks.kernels import bench_ops


def test_bench_ops_smoke_run_writes_json_table_and_plot(tmp_path):
    bench_ops.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_ops.json").read_text())
    assert payload["environment"]["torch"] and payload["settings"]["smoke"]
    groups = {row["group"] for row in payload["results"]}
    assert groups == {"norm_method", "clipped_sum", "clip_accumulate_", "add_noise_"}
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 2 for row in payload["results"])
    table = (tmp_path / "bench_ops.md").read_text()
    assert "| case | shape |" in table and "auto picks" in table

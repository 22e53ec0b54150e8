"""Smoke runs of the benchmark scripts at tiny scale: the published tables come from these code paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark, save_tiny_fmnist


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The scripts set torch's thread count (--threads); later tests compare logits bit for bit with a child
    process, which only holds with the same thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_metadata(meta: dict, script: str) -> None:
    """Every result states where it came from: date, the command that reproduces it, the machine."""
    assert meta["command"].startswith(f"python benchmarks/{script}.py ")
    assert meta["date"] and meta["arguments"]
    assert {"cpu", "cpus", "torch_threads", "torch", "load_average_at_start"} <= set(meta["machine"])


def test_speed_size_smoke(tmp_path):
    rows = load_benchmark("speed_size").main([
        "--models", "resnet14_cifar", "--budgets", "0.5,0.99", "--batch_sizes", "1", "--repeats", "1",
        "--device", "cpu", "--output_dir", str(tmp_path), "--tag", "_smoke",
    ])
    assert [r["budget"] for r in rows] == [0.0, 0.5]  # 0.99 is out of a ResNet-14's reach: skipped, said so
    assert rows[1]["params"] <= 0.5 * rows[0]["params"] and rows[1]["size_mb"] < rows[0]["size_mb"]
    payload = json.loads((tmp_path / "speed_size_cpu_smoke.json").read_text())
    check_metadata(payload["meta"], "speed_size")
    assert "| resnet14_cifar | 0.5 |" in (tmp_path / "speed_size_cpu_smoke.md").read_text()


def test_step_overhead_smoke(tmp_path):
    result = load_benchmark("step_overhead").main([
        "--model", "resnet14_cifar", "--batch-sizes", "2", "--image-size", "8", "--rounds", "1", "--warmup", "0", "--penalty-reps", "1",
        "--ks", "1", "2", "--efficacy-steps", "2", "--efficacy-batch", "4", "--efficacy-data", "random",
        "--no-alternatives", "--threads", "1", "--out-dir", str(tmp_path), "--tag", "_smoke",
    ])
    check_metadata(result, "step_overhead")
    assert result["arguments"]["output_dir"] == str(tmp_path) and result["machine"]["torch_threads"] == 1
    saved = json.loads((tmp_path / "step_overhead_smoke.json").read_text())
    assert saved["step_time"][0]["batch_size"] == 2 and "efficacy" in saved
    assert "Machine: " in (tmp_path / "step_overhead_smoke.md").read_text()


def test_transformers_path_vit_smoke(tmp_path):
    data = save_tiny_fmnist(tmp_path / "tiny")
    written = load_benchmark("transformers_path").main([
        "--parts", "vit", "--vit_dataset", data, "--vit_train_samples", "32", "--vit_test_samples", "16",
        "--vit_max_steps", "2", "--vit_batch_size", "16", "--vit_smooth", "1:1", "--vit_budgets", "0.5",
        "--output_dir", str(tmp_path / "results"), "--run_dir", str(tmp_path / "runs"), "--num_threads", "1",
    ])
    assert {p.name for p in written} == {"transformers_path_vit.json", "transformers_path_vit.md", "transformers_path_vit.png"}
    payload = json.loads((tmp_path / "results" / "transformers_path_vit.json").read_text())
    check_metadata(payload, "transformers_path")
    assert set(payload["results"]) == {"plain", "smooth (fo=1, nn=1)"}
    assert all(row["removed"] >= row["budget"] for rows in payload["results"].values() for row in rows)


@pytest.mark.parametrize("spelling", ["--threads", "--num_threads"])
def test_common_flags_keep_their_older_spellings(spelling, tmp_path):
    args = load_benchmark("transformers_path").parse_args([spelling, "3", "--out-dir", str(tmp_path)])
    assert args.threads == 3 and args.output_dir == tmp_path

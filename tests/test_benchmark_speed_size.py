"""benchmarks/speed_size.py at tiny scale: a timm CNN and a BERT encoder saved as dense folders, a small
image test set, eager and ONNX Runtime (torch.compile is covered by tests/test_deploy.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_resnet14
from datasets import Dataset, DatasetDict

from smooth_hf.auto import save_dense

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_size.py"


def load_script():
    spec = importlib.util.spec_from_file_location("speed_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_speed_size_runs_tiny_and_writes_its_tables(tmp_path):
    save_dense(tiny_resnet14(channels=(8, 16, 16), layers=(1, 1, 1), num_classes=3), tmp_path / "cnn" / "dense")
    save_dense(tiny_bert().eval(), tmp_path / "bert")
    g = np.random.default_rng(0)
    DatasetDict({"train": Dataset.from_dict({"image": g.integers(0, 255, (8, 8, 8), dtype=np.uint8).tolist(),
                                             "label": [0, 1, 2, 0, 1, 2, 0, 1]}),
                 "test": Dataset.from_dict({"image": g.integers(0, 255, (12, 8, 8), dtype=np.uint8).tolist(),
                                            "label": [0, 1, 2] * 4})}).save_to_disk(tmp_path / "data")
    result = load_script().main([
        "--models", str(tmp_path / "cnn" / "dense"), str(tmp_path / "bert"),
        "--param_budgets", "0.1", "--macs_budgets", "0.3", "--keep_budgets", "0.1", "--batch_sizes", "1,4",
        "--runtimes", "eager,onnx", "--eval_dataset", str(tmp_path / "data"), "--image_size", "8", "--seq_len", "6",
        "--threads", "1", "--rounds", "2", "--min_round_ms", "1", "--warmup", "1", "--compress_repeats", "1",
        "--results_dir", str(tmp_path / "results"), "--tag", "_tiny",
    ])
    saved = json.loads((tmp_path / "results" / "speed_size_cpu_tiny.json").read_text())
    assert saved["models"] == json.loads(json.dumps(result["models"]))
    cnn, bert = result["models"]
    assert (cnn["model"], cnn["text"], bert["model"], bert["text"]) == ("cnn", False, "bert", True)
    for model in (cnn, bert):
        rows = {row["variant"]: row for row in model["rows"]}
        assert {"dense", "param0.1", "macs0.3"} <= set(rows)
        # Keeping the slower layers dense can put a budget out of reach (on tiny layers it often does): the
        # variant is then listed with the reason instead.
        keep = {f"{rule}0.1+keep@b{b}" for rule in ("param", "macs") for b in (1, 4)}
        assert keep <= set(rows) | set(model["skipped"]) and "out of reach" not in json.dumps(rows)
        assert rows["param0.1"]["params_removed"] >= 0.1 and rows["macs0.3"]["macs_removed"] >= 0.3
        for key in ("eager_b1", "eager_b4", "onnx_b1", "onnx_b4"):
            assert rows["dense"]["speedup"][key] == 1.0 and rows["param0.1"]["latency_ms"][key] > 0
            assert rows["macs0.3"]["max_abs_diff"][key] < 1e-4  # ONNX Runtime computes what PyTorch computes
        # A keep_slower_dense variant is timed only at the batch its layers were timed at.
        for name in keep & set(rows):
            assert set(rows[name]["latency_ms"]) == {f"eager_{name[-2:]}", f"onnx_{name[-2:]}"}
        assert all("at most" in reason for reason in model["skipped"].values())
    assert all(0 <= row["accuracy"] <= 1 for row in cnn["rows"])
    assert all(row["accuracy"] is None for row in bert["rows"])  # no text test set: latency and size only
    table = (tmp_path / "results" / "speed_size_cpu_tiny.md").read_text()
    assert "### cnn" in table and "| param0.1 | " in table and "onnx b4 ms (x dense)" in table

"""The GPU lease's scripts on a CPU: what benchmarks/gpu_lease.sh runs must work before a lease, not during it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import load_benchmark
from test_data import write_idx

import smooth_hf.data.images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_latency_times_every_cut_of_saved_weights(tmp_path, monkeypatch):
    latency = load_benchmark("gpu_latency")
    recipe = sys.modules["cnn_recipe"]  # the module gpu_latency reads the data and builds the model with
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for prefix, n in (("train", 8), ("t10k", 16)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setattr(smooth_hf.data.images, "FASHION_MNIST_DIR", data)
    spec = recipe.RunSpec(name="tiny", model="resnet14_cifar", channels=[8, 16, 16])
    recipe.save_shards(recipe.build(spec), tmp_path, "tiny")  # as cnn_recipe.py --save_weights writes them

    out = tmp_path / "latency.json"
    results = latency.main([
        "--weights", str(tmp_path / "tiny-*.safetensors"), "--model", "resnet14_cifar", "--channels", "8,16,16",
        "--param_budgets", "0.5", "--mac_budgets", "0.5", "--batch_sizes", "2", "--dtypes", "fp32", "--compile", "",
        "--reps", "2", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    models = results["models"]
    assert set(models) == {"dense", "param0.5", "macs0.5"}
    assert models["param0.5"]["params_removed"] >= 0.5 and models["macs0.5"]["macs_removed"] >= 0.5
    assert models["dense"]["params_removed"] == 0 and models["dense"]["speedup_eager_fp32_b2"] == 1.0
    for row in models.values():
        assert row["ms_eager_fp32_b2"] > 0 and 0 <= row["accuracy_fp32"] <= 1

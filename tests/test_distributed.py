"""Real multi-process training: `accelerate launch` with two CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, save_tiny_fmnist, subprocess_env
from safetensors.torch import load_file

SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"
CONFIG = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _run(cmd: list[str]) -> str:
    # One thread per process: two processes share the cores, and tiny models gain nothing from more.
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # 2 processes x batch 2 x GA 2 = global batch 8 per optimizer step, vs 1 process x batch 8.
    _run([ACCELERATE, "launch", "--config_file", str(CONFIG), str(SCRIPT), str(tmp_path / "ddp"), "2", "2", "4"])
    _run([sys.executable, str(SCRIPT), str(tmp_path / "single"), "8", "1", "4"])

    infos = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world_size"] == 2 for i in infos)
    assert [i["samples"] for i in infos] == [16, 16]  # both ranks took part, each saw half the data
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    assert all((rank0[k] == rank1[k]).all() for k in rank0)  # DDP kept the replicas identical
    # The penalty counts once per step, not once per rank or per micro-batch; the projection acts alike.
    assert max((rank0[k] - single[k]).abs().max().item() for k in rank0) < 1e-5
    logs = [e for e in infos[0]["logs"] if "loss" in e]
    assert logs and all("smooth/nuclear_norm" in e for e in logs)


def test_the_recipe_launched_as_the_readme_shows_is_distributed(tmp_path):
    """docs/training.md's launch table: `accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml recipes/train.py ...`,
    no --use_cpu. 32 images at batch 8 per process: 2 steps if the two processes share the data, 4 if each
    trains alone on all of it."""
    out = tmp_path / "run"
    stdout = _run([
        ACCELERATE, "launch", "--config_file", "recipes/accelerate_configs/cpu_2proc.yaml", "recipes/train.py",
        "--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[4,8,8],layers=[1,1,1]",
        "--dataset_name", save_tiny_fmnist(tmp_path / "tiny"), "--max_train_samples", "32", "--do_train", "--do_eval",
        "--output_dir", str(out), "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
        "--learning_rate", "1e-2", "--first_order_coef", "1", "--save_strategy", "no", "--report_to", "none",
    ])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2, "each process trained alone on all the data"
    assert stdout.count("***** train metrics *****") == 1 and stdout.count("***** eval metrics *****") == 1
    assert json.loads((out / "data_args.json").read_text())["num_train"] == 32

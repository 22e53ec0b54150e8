"""Real multi-process training: `accelerate launch` with two CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"
CONFIG = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    # 2 processes x batch 2 x GA 2 = global batch 8 per optimizer step, vs 1 process x batch 8.
    _run([accelerate, "launch", "--config_file", str(CONFIG), str(SCRIPT), str(tmp_path / "ddp"), "2", "2", "4"])
    _run([sys.executable, str(SCRIPT), str(tmp_path / "single"), "8", "1", "4"])

    infos = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world_size"] == 2 for i in infos)
    assert [i["samples"] for i in infos] == [16, 16]  # both ranks took part, each saw half the data
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    assert all((rank0[k] == rank1[k]).all() for k in rank0)  # DDP kept the replicas identical
    # The penalty counts once per step, not once per rank or per micro-batch.
    assert max((rank0[k] - single[k]).abs().max().item() for k in rank0) < 1e-5
    logs = [e for e in infos[0]["logs"] if "loss" in e]
    assert logs and all("smooth/nuclear_norm" in e for e in logs)

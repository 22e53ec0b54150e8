"""Training speed of the CNN recipe on this CPU under each way of launching ``recipes/train.py``.

``accelerate launch`` gives a one-process CPU run a single thread (it sets ``OMP_NUM_THREADS=1`` unless
``--num_cpu_threads_per_process`` says otherwise); several processes, one thread each, split the batch and the work
with gloo DDP. Each launch trains the CNN recipe (``smooth_hf.training.presets``, global batch 128: the per-process batch
is divided by the process count) for ``--max_steps`` steps and reports the Trainer's own ``train_runtime``, so start-up
and data preparation are not counted::

    .venv/bin/python benchmarks/cpu_launch.py                      # all launches, 60 steps each
    .venv/bin/python benchmarks/cpu_launch.py --launches threads --max_steps 20
    .venv/bin/python benchmarks/cpu_launch.py --launches threads,threads_contiguous \
        --output benchmarks/results/cpu_launch_channels_last.json     # the recipe's channels_last on and off

Results: ``benchmarks/results/cpu_launch.json``. Run it on an otherwise idle machine, one benchmark at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, run_metadata, write_json

from smooth_hf.core.machine import usable_cores
from smooth_hf.training.presets import CNN_TRAINING, as_flags, cnn_flags

ROOT = Path(__file__).resolve().parents[1]

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CORES = len(usable_cores())
# name -> (accelerate launch options, processes, recipe flags changed)
LAUNCHES: dict[str, tuple[list[str], int, dict[str, Any]]] = {
    "default": ([], 1, {}),  # what `accelerate launch recipes/train.py` does on a CPU: one process, one thread
    "threads": (["--num_cpu_threads_per_process", str(CORES)], 1, {}),
    "processes": (["--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml")], 2, {}),
    # the recipe's channels_last off: what the memory layout alone is worth
    "threads_contiguous": (["--num_cpu_threads_per_process", str(CORES)], 1, {"channels_last": False}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--launches", default=",".join(LAUNCHES), help=f"Subset of {','.join(LAUNCHES)}.")
    p.add_argument("--max_steps", type=int, default=60, help="Training steps per launch.")
    p.add_argument("--model_name_or_path", default="resnet14_cifar")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "cpu_launch.json", help="The JSON result file.")
    args = p.parse_args(argv)
    args.launches = [name for name in args.launches.split(",") if name]
    unknown = sorted(set(args.launches) - set(LAUNCHES))
    if unknown or not args.launches:
        p.error(f"--launches: unknown {unknown or 'empty'}; choose from {','.join(LAUNCHES)}")
    return args


def launch(name: str, max_steps: int, model: str) -> dict[str, Any]:
    options, processes, changed = LAUNCHES[name]
    batch = CNN_TRAINING["per_device_train_batch_size"] // processes
    with tempfile.TemporaryDirectory() as out:
        command = [
            ACCELERATE, "launch", *options, str(ROOT / "recipes/train.py"), "--model_name_or_path", model,
            "--dataset_name", "fashion_mnist", "--do_train", "--output_dir", out, "--save_strategy", "no",
            *cnn_flags(), *as_flags({**changed, "per_device_train_batch_size": batch, "max_steps": max_steps}),
        ]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the launcher decide, as for a user
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
        metrics = json.loads((Path(out) / "train_results.json").read_text())
    return {"launch": name, "accelerate_options": options, "processes": processes, "recipe_changes": changed,
            "channels_last": changed.get("channels_last", CNN_TRAINING.get("channels_last", False)),
            "per_process_batch": batch,
            "max_steps": max_steps, "train_runtime": metrics["train_runtime"],
            "steps_per_second": max_steps / metrics["train_runtime"], "wall_seconds": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = []
    for name in args.launches:
        runs.append(launch(name, args.max_steps, args.model_name_or_path))
        print(f"{name}: {runs[-1]['steps_per_second']:.3f} steps/s (train_runtime {runs[-1]['train_runtime']:.1f} s)",
              flush=True)
    payload = {**run_metadata(__file__, argv, args), "usable_cores": CORES, "runs": runs}
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()

"""FSDP2: smoothness penalties and rank projection on the blocks of each weight that ``fully_shard`` leaves each process.

Two gloo processes on this CPU. The public API on models split by torch's ``fully_shard`` is checked against the same
models held whole (``scripts/fsdp_checks.py``); SmoothTrainer and ``recipes/train.py`` run under Accelerate's FSDP2,
which Accelerate 1.15 enables only for GPU process groups, through ``scripts/accelerate_fsdp2_cpu.py`` (one switch of
Accelerate's distributed type; the sharding, optimizer and state dicts are Accelerate's and torch's own), and must
equal one process with the whole batch, and a DDP run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TinyConvNet, save_tiny_fmnist, subprocess_env
from safetensors.torch import load_file

import smooth_hf
from smooth_hf import SmoothTrainer, SmoothTrainingArguments
from smooth_hf.scripts import compress as compress_recipe

SCRIPTS = ROOT / "tests" / "scripts"
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ROUND_OFF = 1e-5  # relative, float32 weights after a few steps


def _run(cmd: list[str]) -> str:
    # One thread per process: two processes share the cores, and tiny models gain nothing from more.
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checks")
    _run([*TORCHRUN, str(SCRIPTS / "fsdp_checks.py"), str(out)])
    results = json.loads((out / "checks.json").read_text())
    assert results["world_size"] == 2
    return results


def _values(checks: dict, prefix: str) -> dict:
    found = {k: v for k, v in checks.items() if k.startswith(prefix)}
    assert found, prefix
    return found


def test_penalties_on_split_weights_give_the_whole_weights_values_and_gradients(checks):
    # Every penalty together, each normalization, the whole and the tail nuclear norm, on a CNN-like model (a wide conv,
    # a tall and a wide Linear, one split unevenly, one of a single row), GPT-2's Conv1D (split along the input features)
    # and BERT: the value and logged terms, each block's gradient and the saved directions.
    found = _values(checks, "penalty/")
    assert len(found) == 3 * 3 * 2 * 4 + 1
    assert all(value < ROUND_OFF for value in found.values()), {k: v for k, v in found.items() if v >= ROUND_OFF}


def test_rank_projection_on_split_weights_equals_the_whole_weights(checks):
    for case in ("mixed/param_reduction", "gpt2/param_reduction", "mixed/input_shape+macs_reduction",
                 "bert/embeddings+param_reduction"):
        assert checks[f"projection/{case}/ranks_equal"] == 1.0, case
        assert checks[f"projection/{case}/weights"] < ROUND_OFF, case
        assert checks[f"projection/{case}/moved"] > 1e-2, case  # the projection did cut


def test_whitened_projection_on_split_weights_or_a_clear_refusal(checks):
    for name in ("mixed", "bert"):  # rows split (Linear, Conv2d); an embedding split along its vocabulary
        assert checks[f"whitened/{name}/ranks_equal"] == 1.0, name
        assert checks[f"whitened/{name}/weights"] < ROUND_OFF, name
        assert checks[f"whitened/{name}/moved"] > 1e-2, name
    refusal = checks["whitened/gpt2/refused"]
    assert "h.0.attn.c_attn" in refusal and "Drop --rank_projection_method whitened" in refusal


def test_weights_split_other_than_by_rows_are_refused(checks):
    assert "Shard(dim=1)" in checks["refused/column_split"]
    assert "turn the penalties and rank projection off" in checks["refused/column_split"]


def test_whole_weights_gathers_on_the_main_process_and_restores_the_blocks(checks):
    assert checks["whole_weights/plain"] == 1.0
    assert checks["whole_weights/values"] == 0.0
    assert checks["whole_weights/restored"] == 1.0


# ---------------------------------------------------------------------------------------------- SmoothTrainer
RUNS = ["first_order", "second_order", "nuclear_exact", "nuclear_cached", "nuclear_tail", "all_relative",
        "all_accumulated", "projection", "projection_whitened"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Every run of scripts/fsdp_train.py: 2 processes under FSDP2 (a global batch of 8, 4 per process; 2 x 2 with
    gradient accumulation) and 1 process (batch 8), 4 steps each."""
    split, alone = tmp_path_factory.mktemp("fsdp2"), tmp_path_factory.mktemp("one")
    _run([*TORCHRUN, str(SCRIPTS / "fsdp_train.py"), str(split)])
    _run([sys.executable, str(SCRIPTS / "fsdp_train.py"), str(alone)])
    return split, alone


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_training_equals_one_process(trained, run):
    split, alone = trained
    records = [json.loads((folder / f"{run}.json").read_text()) for folder in (split, alone)]
    assert records[0]["fsdp"] and records[0]["world_size"] == 2 and not records[1]["fsdp"]
    if run != "projection_whitened":  # the penalty acted on the blocks (and on the classifier, whole in the root)
        assert records[0]["penalty_layers"]["split"] > 0
        assert records[0]["penalty_layers"]["whole"] == (4 if run == "all_relative" else 0)
    weights = [load_file(str(folder / f"{run}.safetensors")) for folder in (split, alone)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[1].items():
        assert torch.allclose(weights[0][key], value, rtol=ROUND_OFF, atol=1e-6), key
    if run == "nuclear_cached":  # its checkpoint at step 2 holds the directions, saved whole by the FSDP2 run too
        states = [load_file(str(folder / f"{run}.penalty.safetensors")) for folder in (split, alone)]
        assert states[0].keys() == states[1].keys() and len(states[1]) > 1
        assert all(torch.allclose(states[0][k], v, rtol=ROUND_OFF, atol=1e-6) for k, v in states[1].items())
    logs = [[{k: v for k, v in entry.items() if k.startswith("smooth/")} for entry in record["logs"] if "loss" in entry]
            for record in records]
    assert len(logs[0]) == len(logs[1]) == 4
    for mine, theirs in zip(*logs, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(math.isclose(mine[k], theirs[k], rel_tol=1e-6, abs_tol=2e-6) for k in mine), (mine, theirs)


# ---------------------------------------------------------------------------------------------- the recipe
def test_the_recipe_under_fsdp2_saves_the_ddp_folder_which_compresses_and_reloads(tmp_path):
    """recipes/train.py with penalties and rank projection, once under FSDP2 and once under DDP (the launch table's
    cpu_2proc.yaml): the same files, weights and evaluation; recipes/compress.py cuts both the same, and the cut reloads."""
    data = save_tiny_fmnist(tmp_path / "tiny")
    fsdp_config = tmp_path / "fsdp.json"  # timm's ResNet has no _no_split_modules: name its blocks
    fsdp_config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["BasicBlock"]}))
    flags = ["--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[4,8,8],layers=[1,1,1]",
             "--dataset_name", data, "--max_train_samples", "32", "--do_train", "--do_eval",
             "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-2",
             "--first_order_coef", "1", "--nuclear_norm_coef", "1", "--rank_projection_param_reduction", "0.3",
             "--rank_projection_every", "1", "--save_strategy", "no", "--report_to", "none"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    _run([*TORCHRUN, str(SCRIPTS / "accelerate_fsdp2_cpu.py"), "recipes/train.py", *flags, "--output_dir", str(fsdp),
          "--fsdp", "--fsdp_config", str(fsdp_config)])
    _run([ACCELERATE, "launch", "--config_file", "recipes/accelerate_configs/cpu_2proc.yaml", "recipes/train.py",
          *flags, "--output_dir", str(ddp)])

    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    for name in ("config.json", "data_args.json"):
        assert json.loads((fsdp / name).read_text()) == json.loads((ddp / name).read_text()), name
    evaluations = [json.loads((folder / "eval_results.json").read_text()) for folder in (fsdp, ddp)]
    for key in ("eval_accuracy", "eval_loss"):
        assert evaluations[0][key] == pytest.approx(evaluations[1][key], rel=1e-6), key
    weights = [load_file(str(folder / "model.safetensors")) for folder in (fsdp, ddp)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[1].items():  # BatchNorm statistics included: rank 0's in both
        assert torch.allclose(weights[0][key].double(), value.double(), rtol=ROUND_OFF, atol=1e-6), key
    assert json.loads((fsdp / "training_args.json").read_text())["fsdp"] is True

    cuts = [compress_recipe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / f"{folder.name}-cut")])
            for folder in (fsdp, ddp)]  # no rule given: the one training planned (--rank_projection_param_reduction)
    assert cuts[0]["model"].lowrank_config.ranks == cuts[1]["model"].lowrank_config.ranks
    assert cuts[0]["accuracy"] == cuts[1]["accuracy"]
    reloaded = smooth_hf.from_pretrained(tmp_path / "fsdp-cut")
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(cuts[0]["model"].eval()(x), reloaded(x))


def test_the_fsdp2_config_launches_fsdp2_which_smooth_training_accepts(tmp_path, monkeypatch):
    """recipes/accelerate_configs/fsdp2.yaml needs GPUs to launch; what `accelerate launch` would set from it is
    derived by Accelerate's own launcher code, and SmoothTrainer accepts it with penalties and projection on."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", "recipes/accelerate_configs/fsdp2.yaml", "recipes/train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(parsed)[0])
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"]) == ("true", "2",
                                                                                               "SHARDED_STATE_DICT")
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE", "FSDP_AUTO_WRAP_POLICY"):
        monkeypatch.setenv(name, env[name])
    assert FullyShardedDataParallelPlugin().fsdp_version == 2  # the plugin Accelerate builds from these variables
    args = SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], first_order_coef=1.0,
                                   nuclear_norm_coef=1.0, rank_projection_param_reduction=0.3,
                                   penalty_skip_first_last=False)
    trainer = SmoothTrainer(model=TinyConvNet(), args=args)
    assert trainer.smoothness.active and trainer.rank_projection is not None

"""Every command in the recipes' docstrings works as written: the ones that need only local data run (on
tiny data, with flags appended that shrink them), the ones that need the Hub parse and validate."""

from __future__ import annotations

import ast
import shlex

import pytest
from conftest import ROOT, save_tiny_fmnist

import smooth_hf
from smooth_hf.scripts import compress as compress_recipe
from smooth_hf.scripts import train as train_recipe
from smooth_hf.training.presets import CNN_DATA, CNN_TRAINING

# The smallest widths at which the recipe's 80% rank projection can still be planned.
TINY_RESNET = ["--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[8,16,16],layers=[1,1,1]"]


def docstring_commands(name: str) -> list[list[str]]:
    """The commands of a recipe's docstring (continuation lines joined), as argument lists after the script."""
    text = ast.get_docstring(ast.parse((ROOT / "smooth_hf" / "scripts" / name).read_text()))
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip().startswith(("python ", "accelerate launch ")) else []
        if f"recipes/{name}" in words:
            commands.append(words[words.index(f"recipes/{name}") + 1 :])
    return commands


def test_docstring_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands write runs/... relative to where they are typed
    data = save_tiny_fmnist(tmp_path / "tiny")
    train_cmds, compress_cmds = docstring_commands("train.py"), docstring_commands("compress.py")
    assert len(train_cmds) == 5 and len(compress_cmds) == 8, "a command was added or removed: update this test"
    resnet, two_processes, gpus, vit, hub_vit = train_cmds
    assert two_processes == gpus == ["...same", "flags..."]  # abbreviations of the first command
    # The CNN command is the recommended recipe, setting for setting (smooth_hf.training.presets is its one source).
    _, data_args, training_args = train_recipe.parse_args(resnet)
    for key, value in {**CNN_TRAINING, **CNN_DATA}.items():
        parsed = getattr(training_args, key, getattr(data_args, key, None))
        assert str(parsed) == str(value) or parsed == value, f"--{key}: docstring {parsed!r}, recipe {value!r}"

    # The CNN recipe, then the ViT: only the data and the sizes are swapped for tiny ones.
    train_recipe.main([*resnet, *TINY_RESNET, "--dataset_name", data, "--max_train_samples", "32",
                       "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--num_train_epochs", "1"])
    assert (tmp_path / "runs" / "smooth" / "model.safetensors").is_file()
    metrics = train_recipe.main([*vit, "--dataset_name", data, "--max_train_samples", "16", "--max_eval_samples", "8",
                                 "--max_steps", "2"])
    assert "eval_accuracy" in metrics and (tmp_path / "runs" / "vit" / "config.json").is_file()
    # A Hub checkpoint on Hub data: the arguments parse and validate (no Hub here).
    _, data_args, training_args = train_recipe.parse_args(hub_vit)
    assert data_args.dataset_name == "cifar10" and data_args.augment and training_args.learning_rate == 2e-5

    one_budget, pushed, whitened, sensitivity, sweep, sweep_kept, trained_for_cut, macs = compress_cmds
    result = compress_recipe.main(one_budget)  # on the data recorded by the training run above
    assert result["reduction"] >= 0.7
    assert smooth_hf.from_pretrained(tmp_path / "runs" / "smooth-lowrank-70").lowrank_report.reduction >= 0.7
    args, _, rank_args = compress_recipe.parse_args(pushed)  # tests/test_hub_e2e.py pushes to a local Hub
    assert args.push_to_hub and args.hub_model_id == "you/resnet18-smooth-lowrank-70" and rank_args.param_reduction == 0.7
    result = compress_recipe.main([*whitened, "--calibration_samples", "16"])  # the tiny data has 32 images
    assert result["reduction"] >= 0.7
    assert smooth_hf.from_pretrained(tmp_path / "runs" / "smooth-whitened-70").lowrank_config.method == "whitened"
    result = compress_recipe.main([*sensitivity, "--calibration_samples", "16"])
    assert result["reduction"] >= 0.7
    assert smooth_hf.from_pretrained(tmp_path / "runs" / "smooth-sensitivity-70").lowrank_config.rank_allocation == "sensitivity"
    (rows,) = compress_recipe.main([*sweep, "--budgets", "0.5,0.7"]).values()  # a tiny model cannot lose 90%
    assert [row["budget"] for row in rows] == [0.0, 0.5, 0.7]
    assert (tmp_path / "runs" / "smooth-sweep" / "results.md").is_file()
    (rows,) = compress_recipe.main([*sweep_kept, "--budgets", "0.5,0.7"]).values()  # the 70% cut is saved too
    assert [row["budget"] for row in rows] == [0.0, 0.5, 0.7]
    kept = smooth_hf.from_pretrained(tmp_path / "runs" / "smooth-lowrank-70")
    assert kept.lowrank_report.reduction == pytest.approx(rows[-1]["removed"])
    # The training docstring's faster model (its first command with the multiply-adds plan), cut as it was trained.
    speed = [*resnet[: resnet.index("--output_dir")], "--output_dir", "runs/speed",
             *resnet[resnet.index("--output_dir") + 2 : resnet.index("--rank_projection_param_reduction")],
             "--rank_projection_macs_reduction", "0.5"]  # a tiny model cannot lose the docstring's 70%
    train_recipe.main([*speed, *TINY_RESNET, "--dataset_name", data, "--max_train_samples", "32",
                       "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--num_train_epochs", "1"])
    result = compress_recipe.main(trained_for_cut)
    assert result["max_logit_change"] < 1e-3  # trained at its planned ranks: the cut only rounds
    assert smooth_hf.from_pretrained(tmp_path / "runs" / "speed-cut").lowrank_config.macs_reduction == 0.5
    result = compress_recipe.main([*macs[: macs.index("0.7")], "0.5", *macs[macs.index("0.7") + 1 :]])
    assert smooth_hf.from_pretrained(tmp_path / "runs" / "smooth-macs-70").lowrank_config.macs_reduction == 0.5


def test_main_job_docstring_commands_parse():
    from smooth_hf.scripts import smooth_vs_plain

    cnn, resnet18 = docstring_commands("smooth_vs_plain.py")
    job, model_args, data_args, training_args = smooth_vs_plain.parse_args(cnn)
    assert job.recipe == "cnn-full" and model_args.model_name_or_path == "resnet14_cifar"
    assert training_args.output_dir == "runs/main-cnn-full" and training_args.optim == "sgd"
    job, model_args, _, training_args = smooth_vs_plain.parse_args(resnet18)
    assert model_args.model_name_or_path == "resnet18_cifar" and model_args.config_overrides is None
    assert training_args.rank_projection_param_reduction == CNN_TRAINING["rank_projection_param_reduction"]

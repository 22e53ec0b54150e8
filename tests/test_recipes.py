"""The recipes as users run them, on a tiny dataset in the Fashion-MNIST format (no Hub)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark, save_tiny_fmnist
from huggingface_hub import ModelCard

import smooth_hf
from smooth_hf.data.images import prepare_image_splits
from smooth_hf.data.processors import image_input_config
from smooth_hf.evaluation.accuracy import logits_of
from smooth_hf.scripts import compress as compress_recipe
from smooth_hf.scripts import smooth_vs_plain
from smooth_hf.scripts import train as train_recipe
from smooth_hf.scripts.args import DATA_RECORD_NAME
from smooth_hf.training.presets import CNN_SPEED_TRAINING, CNN_TRAINING, VIT_TRAINING

TINY_MODEL = ["--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[4,8,8],layers=[1,1,1]"]
EVAL_SAMPLES = 24  # of the 32 test images: a subset, so that which subset matters
SEED = 7  # not the default seed: compress.py must take the training run's from its record


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory) -> str:
    """64 train / 32 test 12x12 grey images with 3 classes: the brightness of a quadrant decides the class."""
    return save_tiny_fmnist(tmp_path_factory.mktemp("data") / "tiny_fmnist")


@pytest.fixture(scope="module")
def training_run(tiny_fmnist, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("runs") / "smooth"
    metrics = train_recipe.main([
        *TINY_MODEL, "--dataset_name", tiny_fmnist, "--output_dir", str(out), "--do_train", "--do_eval",
        "--max_train_samples", "48", "--max_eval_samples", str(EVAL_SAMPLES), "--num_train_epochs", "6",
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-2", "--nuclear_norm_coef", "1",
        "--first_order_coef", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1",
        "--seed", str(SEED),
    ])
    return out, metrics


@pytest.fixture(scope="module")
def trained(training_run) -> Path:
    return training_run[0]


def test_train_learns_and_writes_a_rebuildable_checkpoint_with_its_data(training_run, tiny_fmnist):
    folder, metrics = training_run
    assert metrics["eval_accuracy"] >= 0.6  # chance: about 1/3
    assert {"model.safetensors", "config.json", "training_args.json", DATA_RECORD_NAME} <= {p.name for p in folder.iterdir()}
    state = json.loads((folder / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged and all("smooth/nuclear_norm" in e and "smooth/first_order" in e for e in logged)
    model = smooth_hf.checkpoint.dense.load_dense(folder)
    assert model.num_classes == 3 and model.in_chans == 1
    record = json.loads((folder / DATA_RECORD_NAME).read_text())
    assert record["dataset_name"] == tiny_fmnist and record["seed"] == SEED
    assert (record["num_train"], record["num_test"], record["max_eval_samples"]) == (48, EVAL_SAMPLES, EVAL_SAMPLES)
    assert record["labels"] == ["a", "b", "c"]
    assert json.loads((folder / "training_args.json").read_text())["learning_rate"] == 1e-2


def test_compress_recipe_evaluates_on_the_training_data_and_reloads_with_equal_logits(training_run, tiny_fmnist, tmp_path):
    folder, train_metrics = training_run
    out = tmp_path / "compressed"
    # No --dataset_name and no --seed: both come from the checkpoint's data record.
    result = compress_recipe.main(["--model_name_or_path", str(folder), "--param_reduction", "0.5",
                                   "--max_eval_samples", str(EVAL_SAMPLES), "--output_dir", str(out)])
    assert result["reduction"] >= 0.5  # the contract: at least the fraction asked for
    assert result["num_test"] == EVAL_SAMPLES
    # The same --max_eval_samples scores the same images as training did: the dense model scores the same.
    assert result["dense_accuracy"] == pytest.approx(train_metrics["eval_accuracy"])

    card = ModelCard((out / "README.md").read_text())
    (evaluation,) = card.data.eval_results
    assert evaluation.metric_value == pytest.approx(result["accuracy"])  # the card states the measured accuracy
    assert evaluation.dataset_name == Path(tiny_fmnist).name and evaluation.dataset_split == "test"
    assert "nuclear_norm_coef" in card.text

    reloaded = smooth_hf.from_pretrained(out)
    assert reloaded.lowrank_config.ranks == result["model"].lowrank_config.ranks
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(logits_of(result["model"].eval(), {"pixel_values": x}), logits_of(reloaded, {"pixel_values": x}))


def test_compress_recipe_rank_ratio_and_energy_rules(trained, tmp_path):
    folder = trained
    by_ratio = compress_recipe.main(["--model_name_or_path", str(folder), "--rank_ratio", "0.5",
                                     "--output_dir", str(tmp_path / "ratio")])["model"]
    factorised = by_ratio.lowrank_report.factorised
    assert factorised
    for layer in factorised:
        weight = smooth_hf.checkpoint.dense.load_dense(folder).get_submodule(layer.name).weight
        assert layer.rank == math.ceil(0.5 * min(weight.shape[0], weight[0].numel())), layer.name

    by_energy = compress_recipe.main(["--model_name_or_path", str(folder), "--energy", "0.9",
                                      "--output_dir", str(tmp_path / "energy")])["model"]
    assert by_energy.lowrank_report.factorised
    assert all(layer.energy_kept >= 0.9 for layer in by_energy.lowrank_report.factorised)
    assert smooth_hf.from_pretrained(tmp_path / "energy").lowrank_config.energy == 0.9


def test_compress_recipe_on_named_data_and_without_a_record(trained, tiny_fmnist, tmp_path):
    folder = trained
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns(DATA_RECORD_NAME))
    with pytest.raises(ValueError, match="name the evaluation data with --dataset_name"):
        compress_recipe.main(["--model_name_or_path", str(bare), "--param_reduction", "0.5", "--output_dir",
                              str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    result = compress_recipe.main(["--model_name_or_path", str(bare), "--dataset_name", tiny_fmnist, "--param_reduction",
                                   "0.5", "--output_dir", str(tmp_path / "named")])
    assert result["num_test"] == 32


def test_compress_recipe_sweep_writes_table_and_plot(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "sweep"
    results = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                    "--budgets", "0.3,0.5", "--recalibrate_batchnorm", "32", "--batchnorm_data_free",
                                    "--output_dir", str(out)])
    (rows,) = results.values()
    assert [r["budget"] for r in rows] == [0.0, 0.3, 0.5]
    assert all(r["removed"] >= r["budget"] for r in rows)
    assert all("accuracy_bn_recalibrated" in r and "accuracy_bn_data_free" in r for r in rows[1:])
    assert "+ BN data-free |" in (out / "results.md").read_text().splitlines()[0]
    assert (out / "accuracy_vs_params_removed.png").stat().st_size > 1000
    assert "| 50% |" in (out / "results.md").read_text()


def test_compress_recipe_sweep_keeps_the_cut_at_param_reduction(trained, tiny_fmnist, tmp_path):
    """--budgets with --param_reduction: the sweep's table, and the model cut at that budget saved with its card,
    its accuracy the one the sweep measured; the budget joins the sweep if it was not in it."""
    out = tmp_path / "kept"
    results = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                    "--budgets", "0.3,0.5", "--param_reduction", "0.4", "--output_dir", str(out)])
    (rows,) = results.values()
    assert [r["budget"] for r in rows] == [0.0, 0.3, 0.4, 0.5]
    (row,) = [r for r in rows if r["budget"] == 0.4]
    assert "| 40% |" in (out / "results.md").read_text()
    reloaded = smooth_hf.from_pretrained(out)
    assert reloaded.lowrank_config.param_reduction == 0.4 and reloaded.lowrank_report.reduction == pytest.approx(row["removed"])
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(row["accuracy"])
    # the saved model scores what the sweep said (the same test images, as compress.py scores them)
    rescored = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                     "--param_reduction", "0.4", "--output_dir", str(tmp_path / "alone")])
    assert rescored["accuracy"] == pytest.approx(row["accuracy"]) and rescored["dense_accuracy"] == rows[0]["accuracy"]
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), rescored["model"].eval()(x), atol=1e-5)


def test_compress_recipe_rejects_ambiguous_rules(trained):
    with pytest.raises(ValueError, match="give one of"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--param_reduction", "0.5",
                              "--rank_ratio", "0.5"])
    with pytest.raises(ValueError, match="not both"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--param_reduction", "0.5",
                              "--recalibrate_batchnorm", "32", "--batchnorm_data_free"])
    # a sweep keeps a --param_reduction (or --macs_reduction) cut, no other rule
    with pytest.raises(ValueError, match="a --budgets sweep saves a cut of its own rule"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--budgets", "0.5",
                              "--rank_ratio", "0.5"])
    with pytest.raises(ValueError, match="no BN repair"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--budgets", "0.5",
                              "--param_reduction", "0.5", "--recalibrate_batchnorm", "32"])
    with pytest.raises(ValueError, match="give the budget to upload"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--budgets", "0.5",
                              "--push_to_hub", "--hub_model_id", "you/x"])
    assert not Path("x").exists()


def test_recipes_refuse_what_would_lose_or_mix_a_users_files(trained, tiny_fmnist, tmp_path):
    """Checked before any work: a compression over its own dense model, a compressed model as the input, budgets that
    are not fractions, a training run into a folder that holds another run, a command that would do nothing."""
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="holds a dense checkpoint.*another folder"):
        compress_recipe.main(["--model_name_or_path", str(folder), "--param_reduction", "0.5", "--output_dir", str(folder)])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    compress_recipe.main(["--model_name_or_path", str(folder), "--param_reduction", "0.5", "--output_dir",
                          str(tmp_path / "cut")])
    with pytest.raises(ValueError, match="compressed .* not a dense one"):
        compress_recipe.main(["--model_name_or_path", str(tmp_path / "cut"), "--param_reduction", "0.5",
                              "--output_dir", str(tmp_path / "twice")])
    for budgets in ("0.5,1.5", "0.5,abc", ""):
        with pytest.raises(ValueError, match="--budgets takes comma-separated fractions"):
            compress_recipe.parse_args(["--model_name_or_path", str(folder), "--budgets", budgets, "--output_dir", "x"])

    again = [*TINY_MODEL, "--dataset_name", tiny_fmnist, "--output_dir", str(folder), "--do_train", "--max_steps", "1",
             "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    with pytest.raises(ValueError, match="holds an earlier run .*--overwrite_output_dir"):
        train_recipe.main(again)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="nothing to do"):
        train_recipe.main([a for a in again if a != "--do_train"])
    with pytest.raises(ValueError, match="--load_best_model_at_end with --rank_projection_param_reduction"):
        train_recipe.parse_args([*again, "--rank_projection_param_reduction", "0.5", "--load_best_model_at_end",
                                 "--eval_strategy", "steps", "--save_strategy", "steps"])
    train_recipe.main([*again, "--overwrite_output_dir"])  # asked for: trains there
    assert (folder / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_compress_recipe_says_which_flags_would_do_nothing(trained, caplog, tmp_path):
    # The method is known once the checkpoint's training_args.json is read: the warnings come from the run itself.
    with caplog.at_level("WARNING", logger="compress"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--param_reduction", "0.5", "--output_dir",
                              str(tmp_path / "a"), "--max_eval_samples", str(EVAL_SAMPLES), "--calibration_samples",
                              "16", "--hub_model_id", "you/x"])
    assert "--calibration_samples does nothing without --method whitened" in caplog.text
    assert "--hub_model_id does nothing without --push_to_hub" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="compress"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--param_reduction", "0.5", "--output_dir",
                              str(tmp_path / "b"), "--max_eval_samples", str(EVAL_SAMPLES), "--calibration_samples",
                              "16", "--method", "whitened"])
    assert "does nothing" not in caplog.text


def test_train_recipe_evaluates_and_continues_from_its_own_output_folder(training_run, tiny_fmnist, tmp_path):
    """A folder recipes/train.py wrote is a --model_name_or_path too (timm's config.json): its weights, scored as the
    training run scored them, and a new head when the classes differ."""
    folder, metrics = training_run
    again = train_recipe.main([
        "--model_name_or_path", str(folder), "--dataset_name", tiny_fmnist, "--output_dir", str(tmp_path / "eval"),
        "--do_eval", "--max_eval_samples", str(EVAL_SAMPLES), "--report_to", "none", "--use_cpu", "--seed", str(SEED),
    ])
    assert again["eval_accuracy"] == metrics["eval_accuracy"]
    train_recipe.main([
        "--model_name_or_path", str(folder), "--dataset_name", tiny_fmnist, "--output_dir", str(tmp_path / "more"),
        "--do_train", "--max_steps", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    ])
    assert (tmp_path / "more" / "model.safetensors").is_file()
    head = smooth_hf.checkpoint.build.build_model(str(folder), num_labels=5)
    assert head.num_classes == 5 and head.get_classifier().out_features == 5


def test_compress_recipe_finds_a_relative_dataset_from_anywhere_and_warns_on_other_labels(tiny_fmnist, tmp_path,
                                                                                        monkeypatch, caplog):
    """data_args.json records a local dataset by its absolute path, so compress.py run from another folder scores
    the same images; evaluation data with other class names than training's is said."""
    data = Path(tiny_fmnist)
    monkeypatch.chdir(data.parent)
    out = tmp_path / "rel"
    train_recipe.main([*TINY_MODEL, "--dataset_name", data.name, "--output_dir", str(out), "--do_train",
                       "--max_steps", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
    assert json.loads((out / DATA_RECORD_NAME).read_text())["dataset_name"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    result = compress_recipe.main(["--model_name_or_path", str(out), "--param_reduction", "0.5",
                                   "--output_dir", str(tmp_path / "rel-50")])
    assert result["num_test"] == 32
    record = json.loads((out / DATA_RECORD_NAME).read_text())
    (out / DATA_RECORD_NAME).write_text(json.dumps({**record, "labels": ["x", "y", "z"]}))
    with caplog.at_level("WARNING", logger="compress"):
        compress_recipe.main(["--model_name_or_path", str(out), "--param_reduction", "0.5",
                              "--output_dir", str(tmp_path / "rel-50b")])
    assert "not the ones the model was trained on" in caplog.text


def test_compress_recipe_data_free_batchnorm_card(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "data-free"
    compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist, "--param_reduction",
                          "0.5", "--batchnorm_data_free", "--output_dir", str(out)])
    reloaded = smooth_hf.from_pretrained(out)
    assert reloaded.lowrank_report.batchnorm_recalibrated and reloaded.lowrank_report.batchnorm_data_free
    assert "synthesised from the dense model's own BatchNorm statistics" in (out / "README.md").read_text()


def test_main_job_end_to_end(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "main"
    results = smooth_vs_plain.main([
        "--recipe", "cnn", "--output_dir", str(out), "--dataset_name", tiny_fmnist, "--config_overrides", "channels=[4,8,8]",
        "--max_train_samples", "48", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--budgets", "0.3,0.5", "--save_budget", "0.5",
        "--rank_projection_param_reduction", "0.5",  # a 4-8-8 model cannot lose the recipe's 80%
        "--speed_batch_sizes", "1,4", "--speed_runtimes", "eager",
    ])
    assert list(results) == ["plain", "smooth"]
    printed = capsys.readouterr().out
    assert "| parameters removed | plain | smooth |" in printed and "| 50% |" in printed
    # trained side by side (the default): each model in its own process, its output in its own log
    assert "side by side" in printed
    for name in results:
        log = (out / f"{name}.log").read_text()
        assert f"== training the {name} model" in log and "train_runtime" in log and "| 50% |" in log
    assert (out / "accuracy_vs_params_removed.png").is_file()
    # both models were trained with the recipe, only the rank projection differs
    plain = json.loads((out / "plain" / "training_args.json").read_text())
    smooth = json.loads((out / "smooth" / "training_args.json").read_text())
    assert plain["rank_projection_param_reduction"] is None and smooth["rank_projection_param_reduction"] == 0.5
    assert plain["plan_rank_multiple"] is None and smooth["plan_rank_multiple"] == 1  # resolved for the CPU it ran on
    differ = ("rank_projection_param_reduction", "plan_rank_multiple", "output_dir", "logging_dir")
    assert {k: v for k, v in plain.items() if k not in differ} == {k: v for k, v in smooth.items() if k not in differ}
    # trained for the 50% cut: the cut changes nothing, while plain loses accuracy or not, as it happens
    by_budget = {r["budget"]: r["accuracy"] for r in results["smooth"]}
    assert by_budget[0.5] == by_budget[0.3] == by_budget[0.0]
    assert plain["optim"] == "sgd" and plain["learning_rate"] == 0.1
    reloaded = smooth_hf.from_pretrained(out / "smooth-lowrank-50")
    assert reloaded.lowrank_report.reduction >= 0.5
    # the saved model's card carries the accuracy the sweep measured at that budget
    (row,) = [r for r in results["smooth"] if r["budget"] == 0.5]
    card = ModelCard.load(out / "smooth-lowrank-50" / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(row["accuracy"])
    # its training table says how it was trained: the projection, and no penalty that was off
    assert "| rank_projection_param_reduction | 0.5 |" in card.text and "nuclear_norm_coef" not in card.text
    # ... and cut with the rank multiple its plan used (read from training_args.json by recipes/compress.py)
    assert "| plan_rank_multiple | 1 |" in card.text
    assert "rank_multiple 1: the multiple the model was trained for" in (out / "smooth.log").read_text()
    # both models' cuts at the save budget, timed against their dense selves: a table of speed-ups beside the sizes
    speed = json.loads((out / "results.json").read_text())["speed"]
    assert set(speed) == {"plain", "smooth"}
    for timed in speed.values():
        assert timed["budget"] == 0.5 and timed["params_removed"] >= 0.5 and 0 < timed["macs_removed"] < 1
        assert set(timed["latency"]["cut"]) == {"eager_b1", "eager_b4"} and timed["input_shape"] == [1, 12, 12]
    assert "| model, cut | accuracy | parameters removed | multiply-adds removed | eager b1 | eager b4 |" in printed
    assert "| smooth, 50% fewer parameters |" in (out / "results.md").read_text()


def test_main_job_for_speed_sweeps_and_times_multiply_adds(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "main"
    results = smooth_vs_plain.main([
        "--recipe", "cnn-speed", "--output_dir", str(out), "--dataset_name", tiny_fmnist, "--config_overrides",
        "channels=[4,8,8]", "--max_train_samples", "48", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--budgets", "0.3,0.5", "--save_budget", "0.5",
        "--rank_projection_macs_reduction", "0.5", "--speed_batch_sizes", "2", "--speed_runtimes", "eager",
        "--side_by_side", "false",
    ])
    printed = capsys.readouterr().out
    assert "| multiply-adds removed | plain | smooth |" in printed and (out / "accuracy_vs_macs_removed.png").is_file()
    assert all(r["macs_removed"] >= r["budget"] for rows in results.values() for r in rows)
    by_budget = {r["budget"]: r["accuracy"] for r in results["smooth"]}
    assert by_budget[0.5] == by_budget[0.0]  # trained for that compute budget: the cut changes nothing
    assert smooth_hf.from_pretrained(out / "smooth-lowrank-50").lowrank_config.macs_reduction == 0.5
    assert "| smooth, 50% fewer multiply-adds |" in printed


def test_main_job_recipes_come_from_smooth_hf_recommended():
    job, model, data, training = smooth_vs_plain.parse_args([])  # what `make main` runs
    assert job.recipe == "cnn" and model.model_name_or_path == "resnet14_cifar" and model.model_type is None
    assert model.config_overrides == "channels=[16,32,128]" and data.max_train_samples == 20000
    assert training.per_device_train_batch_size == 64 and training.num_train_epochs == 2  # the recipe, shortened
    assert training.optim == "sgd" and training.learning_rate == CNN_TRAINING["learning_rate"]
    assert training.rank_projection_param_reduction == CNN_TRAINING["rank_projection_param_reduction"]
    assert training.nuclear_norm_coef == 0 and job.budgets == "0.5,0.7,0.8,0.9"
    assert data.augment and data.max_eval_samples is None  # every test image
    assert training.channels_last and job.side_by_side
    job, model, data, training = smooth_vs_plain.parse_args(["--recipe", "cnn-full", "--nuclear_norm_coef", "0.2"])
    assert model.model_name_or_path == "resnet14_cifar" and model.config_overrides is None  # its own widths
    assert training.num_train_epochs == CNN_TRAINING["num_train_epochs"] and data.max_train_samples is None
    assert training.per_device_train_batch_size == CNN_TRAINING["per_device_train_batch_size"]
    assert training.nuclear_norm_coef == 0.2
    job, model, data, training = smooth_vs_plain.parse_args(["--recipe", "cnn-speed"])
    assert training.rank_projection_macs_reduction == CNN_SPEED_TRAINING["rank_projection_macs_reduction"]
    assert training.rank_projection_param_reduction is None and model.config_overrides == "channels=[16,32,128]"
    job, model, data, training = smooth_vs_plain.parse_args(["--recipe", "vit"])
    assert model.model_type == "vit" and model.model_name_or_path is None and not data.augment
    assert {k: getattr(training, k) for k in VIT_TRAINING} == VIT_TRAINING
    assert training.optim.value.startswith("adamw")
    # naming a model replaces the recipe's model (not the ViT's config overrides on a CNN)
    _, model, _, training = smooth_vs_plain.parse_args(["--recipe", "vit", "--model_name_or_path", "resnet14_cifar"])
    assert model.model_type is None and model.config_overrides is None and training.learning_rate == 2e-3


def test_main_job_vit_recipe(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "main-vit"
    results = smooth_vs_plain.main([
        "--recipe", "vit", "--output_dir", str(out), "--dataset_name", tiny_fmnist, "--config_overrides",
        "image_size=12,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--max_train_samples", "48", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--budgets", "0.5", "--save_budget", "0.5", "--side_by_side", "False",
    ])
    assert [r["budget"] for r in results["smooth"]] == [0.0, 0.5]
    assert not (out / "plain.log").exists()  # one after the other, in this process
    smooth = json.loads((out / "smooth" / "training_args.json").read_text())
    assert smooth["nuclear_norm_coef"] == VIT_TRAINING["nuclear_norm_coef"] and smooth["first_order_coef"] > 0
    reloaded = smooth_hf.from_pretrained(out / "smooth-lowrank-50")
    assert type(reloaded).__name__ == "ViTForImageClassification" and reloaded.lowrank_report.reduction >= 0.5
    assert "vit from scratch" in capsys.readouterr().out


def test_train_recipe_trains_a_transformers_vit_from_scratch(tiny_fmnist, tmp_path):
    out = tmp_path / "vit"
    metrics = train_recipe.main([
        "--model_type", "vit", "--config_overrides",
        "image_size=12,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--dataset_name", tiny_fmnist, "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--first_order_coef", "1", "--report_to", "none", "--use_cpu",
        "--save_strategy", "no",
    ])
    model = smooth_hf.checkpoint.dense.load_dense(out)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 3
    test = prepare_image_splits(tiny_fmnist, image_input_config(model))["test"][:]
    with torch.no_grad():
        predictions = model(pixel_values=torch.stack(test["pixel_values"])).logits.argmax(-1)
    assert len(test["labels"]) == 32  # no --max_eval_samples: the whole test split
    assert metrics["eval_accuracy"] == pytest.approx((predictions == torch.tensor(test["labels"])).float().mean().item())


def test_cpu_protocol_benchmark_runs_end_to_end_and_reports_every_column(tiny_fmnist, tmp_path):
    """A smoke run of benchmarks/cpu_protocol.py: the published tables come from this code path."""
    protocol = load_benchmark("cpu_protocol")
    results = tmp_path / "results"
    payload = protocol.main([
        "--dataset_name", tiny_fmnist, "--channels", "8,16,16", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--per_device_train_batch_size", "32", "--variants", "plain,recommended", "--budgets", "0.5",
        "--bn_recalibration_samples", "16", "--bn_data_free_samples", "8", "--bn_data_free_steps", "2",
        "--work_dir", str(tmp_path / "work"), "--results_dir", str(results),
    ])
    assert set(payload["results"]) == {"lowrank_global", "lowrank_uniform", "magnitude", "filter_l1"}
    (row,) = [r for r in payload["results"]["lowrank_global"]["recommended"] if r["budget"] == 0.5]
    assert {"accuracy", "accuracy_bn_recalibrated", "accuracy_bn_data_free"} <= set(row)
    assert 0.5 <= row["removed"] < 0.52  # at least the budget, overshooting by a rank or two of a tiny model
    table = (results / "cpu_protocol.md").read_text()
    assert "recommended + BN data-free" in table and "the CNN recipe of smooth_hf.training.presets" in table
    assert (results / "cpu_protocol_lowrank_global.png").stat().st_size > 1000


def test_transformers_path_smooth_configs_parse_both_syntaxes():
    parse = load_benchmark("transformers_path").smooth_configs
    assert parse("1:10,0.1:1:2") == [
        {"first_order_coef": 1.0, "nuclear_norm_coef": 10.0, "second_order_coef": 0.0},
        {"first_order_coef": 0.1, "nuclear_norm_coef": 1.0, "second_order_coef": 2.0},
    ]
    assert parse("fo=1+nn=5,nn=10+warmup=0.5") == [
        {"first_order_coef": 1.0, "nuclear_norm_coef": 5.0, "second_order_coef": 0.0},
        {"first_order_coef": 0.0, "nuclear_norm_coef": 10.0, "second_order_coef": 0.0, "penalty_warmup_ratio": 0.5},
    ]
    with pytest.raises(Exception, match="unknown key 'nuc'"):
        parse("nuc=3")
    assert parse("") == [] and parse("1:10,") == parse("1:10")  # '' is the help's "no smooth model"


@pytest.mark.parametrize("allocation", ["spectrum", "sensitivity"])
def test_compress_recipe_whitened_calibrates_on_training_images_and_records_them(trained, tiny_fmnist, tmp_path,
                                                                                 allocation):
    out = tmp_path / "whitened"
    result = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                   "--param_reduction", "0.5", "--method", "whitened", "--calibration_samples", "40",
                                   "--rank_allocation", allocation, "--sensitivity_samples", "8",
                                   "--output_dir", str(out)])
    assert 0.5 <= result["reduction"] < 0.53  # over by at most about one rank of one layer of this tiny model
    saved = json.loads((out / "compression_config.json").read_text())
    assert saved["method"] == "whitened" and saved["calibration_samples"] == 40
    assert saved["rank_allocation"] == allocation
    assert saved["calibration_dataset"].startswith(f"{Path(tiny_fmnist).name} (training split")  # no local path
    assert "whitened truncation" in (out / "README.md").read_text()
    assert smooth_hf.from_pretrained(out).lowrank_config.method == "whitened"


def _tiny_text_model(folder: Path) -> str:
    """A tiny BERT and its word-level tokenizer, saved like a Hub checkpoint (stands in for all-MiniLM-L6-v2)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["good", "bad", "film", "great", "awful", "plot", "the", "a", "is", "was", "fun", "dull"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def test_whitening_benchmark_runs_every_part_tiny(tiny_fmnist, tmp_path):
    """A smoke run of benchmarks/whitening.py (all four parts) on a tiny BERT, 40 sentences and a tiny CNN."""
    bench = load_benchmark("whitening")
    cache = tmp_path / "cache"
    (cache / "pang_lee").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [f'"{1 if i % 2 else -1}","{" ".join(rng.choice(["good", "bad", "film", "the", "plot", "fun"], 5))} . \n"'
            for i in range(40)]
    (cache / "pang_lee" / "polarity-en-pang&lee2.csv").write_text("\ufeff" + "\r\n".join(rows) + "\r\n", encoding="utf-8")
    model = smooth_hf.checkpoint.build.build_model("resnet14_cifar", num_labels=3, num_channels=1,
                                       config_overrides="channels=[4,8,8],layers=[1,1,1]")
    smooth_hf.checkpoint.dense.save_dense(model, tmp_path / "cnn" / "plain" / "dense")
    out = tmp_path / "results"
    payload = bench.main([
        "--parts", "embed,polarity,cnn,timing", "--output_dir", str(out), "--cache_dir", str(cache),
        "--run_dir", str(tmp_path / "runs"), "--text_model", _tiny_text_model(tmp_path / "bert"),
        "--calibration_sentences", "8", "--calibration_batch_size", "4", "--embed_sentences", "8",
        "--embed_budgets", "0.05", "--neighbours", "3", "--text_max_steps", "1", "--text_batch_size", "8",
        "--text_smooth", "1:1", "--polarity_budgets", "0.05", "--timing_repeats", "1", "--timing_budget", "0.05",
        "--cnn_models", str(tmp_path / "cnn"), "--cnn_dataset", tiny_fmnist, "--cnn_calibration_images", "16",
        "--cnn_eval_samples", "16", "--cnn_budgets", "0.5",
    ])
    embed = payload["parts"]["embed"]["results"]
    assert [r["budget"] for r in embed["whitened"]] == [0.05] and 0 < embed["whitened"][0]["cosine"] <= 1.0 + 1e-6
    assert 0 <= embed["svd"][0]["neighbour_agreement"] <= 1
    polarity = payload["parts"]["polarity"]["results"]
    assert set(polarity) == {f"{model}, {method}" for model in ("plain", "smooth (fo=1, nn=1)")
                             for method in ("svd", "whitened", "sensitivity")}
    assert embed["sensitivity"][0]["removed"] >= 0.05
    (cnn_row,) = [r for r in payload["parts"]["cnn"]["results"]["plain, sensitivity"] if r["budget"] == 0.5]
    assert {"accuracy", "accuracy_bn_recalibrated"} <= set(cnn_row)
    assert payload["parts"]["timing"]["results"]["whitened"]["median"] > 0
    table = (out / "whitening.md").read_text()
    assert "cosine, sensitivity" in table and "Time to compress" in table and "plain, whitened" in table
    assert (out / "whitening_polarity.png").stat().st_size > 1000 and (out / "whitening_cnn.png").is_file()


def test_the_card_shows_max_steps_when_training_stopped_there(tmp_path):
    """The Trainer stops at max_steps whatever num_train_epochs says: the card must not claim the epochs."""
    (tmp_path / "training_args.json").write_text(json.dumps({"num_train_epochs": 3.0, "max_steps": 4,
                                                             "learning_rate": 0.1}))
    assert compress_recipe._training_setup(str(tmp_path)) == {"max_steps": 4, "learning_rate": 0.1}
    (tmp_path / "training_args.json").write_text(json.dumps({"num_train_epochs": 3.0, "max_steps": -1}))
    assert compress_recipe._training_setup(str(tmp_path)) == {"num_train_epochs": 3.0}



def test_main_job_checks_its_timing_runtimes_before_training(tmp_path):
    with pytest.raises(ValueError, match="--speed_runtimes 'eager,onnx': use a comma-separated subset of eager,eager_cl"):
        smooth_vs_plain.main(["--output_dir", str(tmp_path / "main"), "--speed_runtimes", "eager,onnx"])
    assert not (tmp_path / "main").exists()

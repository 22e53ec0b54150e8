"""Shared script arguments, the data record train.py writes and compress.py reads, and the subset rule."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_fmnist
from datasets import Dataset, load_from_disk
from transformers import HfArgumentParser

from smooth_hf.data.images import dataset_card_fields, prepare_image_splits, select_subset
from smooth_hf.lowrank import LowRankConfig
from smooth_hf.scripts.args import (
    DataArguments,
    LowRankArguments,
    TrainingDataArguments,
    resolve_data_arguments,
    save_data_record,
)


def images(dataset) -> np.ndarray:
    return np.asarray(dataset["image"])


def test_the_same_limit_and_seed_select_the_same_subset(tmp_path):
    test = prepare_image_splits(save_tiny_fmnist(tmp_path / "d"))["test"]
    a, b = select_subset(test, 10, seed=3), select_subset(test, 10, seed=3)
    np.testing.assert_array_equal(images(a), images(b))
    assert not np.array_equal(images(a), images(select_subset(test, 10, seed=4)))
    in_memory = Dataset.from_dict(test[:])  # datasets' own seeded shuffle picks the same images
    np.testing.assert_array_equal(images(a), images(in_memory.shuffle(seed=3).select(range(10))))
    assert select_subset(test, None, seed=3) is test and select_subset(test, 1000, seed=3) is test
    with pytest.raises(ValueError, match="give a number >= 1"):
        select_subset(test, 0, seed=3)


def test_splits_and_subsets_write_nothing_into_the_dataset_folder(tmp_path):
    folder = Path(save_tiny_fmnist(tmp_path / "train_only", sizes={"train": 40}))
    before = sorted(p.name for p in folder.rglob("*"))
    splits = prepare_image_splits(str(folder), eval_split_ratio=0.25, max_train_samples=9, max_eval_samples=4, seed=1)
    assert (len(splits["train"]), len(splits["test"])) == (9, 4)
    assert sorted(p.name for p in folder.rglob("*")) == before
    # The held-out split is datasets' own train_test_split with that seed.
    expected = Dataset.from_dict(load_from_disk(str(folder))["train"][:]).train_test_split(test_size=0.25, seed=1)
    np.testing.assert_array_equal(images(prepare_image_splits(str(folder), eval_split_ratio=0.25, seed=1)["test"]),
                                  images(expected["test"]))


def test_compress_reproduces_the_held_out_split_of_a_dataset_without_a_test_split(tmp_path):
    """train.py split a train-only dataset with its own ratio and seed; compress.py, given nothing, splits it alike."""
    data = save_tiny_fmnist(tmp_path / "train_only", sizes={"train": 40})
    (train_args,) = HfArgumentParser(TrainingDataArguments).parse_args_into_dataclasses(
        ["--dataset_name", data, "--train_val_split", "0.25", "--max_eval_samples", "6"])
    trained_on = prepare_image_splits(**train_args.split_kwargs(), seed=11)
    save_data_record(tmp_path, train_args, 11, trained_on)

    (compress_args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--max_eval_samples", "6"])
    resolved, seed, record = resolve_data_arguments(compress_args, tmp_path, None)
    assert (resolved.dataset_name, resolved.train_val_split, seed) == (data, 0.25, 11)
    assert record["num_test"] == 6 and record["num_train"] == 30
    again = prepare_image_splits(**resolved.split_kwargs(), seed=seed)
    np.testing.assert_array_equal(images(again["test"]), images(trained_on["test"]))
    # The default seed would hold out other images: the record is what makes them match.
    other = prepare_image_splits(**resolved.split_kwargs(), seed=42)
    assert not np.array_equal(images(other["test"]), images(trained_on["test"]))


def test_a_dataset_named_on_the_command_line_does_not_inherit_the_recorded_columns(tmp_path):
    args = TrainingDataArguments(dataset_name="recorded", image_column_name="img", train_val_split=0.3)
    save_data_record(tmp_path, args, 5, prepare_image_splits(save_tiny_fmnist(tmp_path / "d")))
    other, seed, _ = resolve_data_arguments(DataArguments(dataset_name="other"), tmp_path, None)
    assert (other.image_column_name, other.train_val_split, seed) == (None, None, 5)
    same, _, _ = resolve_data_arguments(DataArguments(dataset_name="recorded"), tmp_path, 1)
    assert (same.image_column_name, same.train_val_split) == ("img", 0.3)


def test_low_rank_arguments_are_the_config_fields_with_the_config_help():
    config_help = {f.name: f.metadata["help"] for f in fields(LowRankConfig)}
    for f in fields(LowRankArguments):  # the ones a training plan sets say so after the config's help
        assert f.metadata["help"].startswith(config_help[f.name]), f.name
        assert ("training_args.json" in f.metadata["help"]) == (f.name in LowRankArguments.PLANNED), f.name
    (args,) = HfArgumentParser(LowRankArguments).parse_args_into_dataclasses(
        ["--rank_ratio", "0.5", "--exclude_modules", "head", "fc", "--rank_multiple", "4"])
    assert args.rules_given() == ["rank_ratio"]
    config = args.to_config()
    assert isinstance(config, LowRankConfig) and config.rank_ratio == 0.5 and config.exclude_modules == ["head", "fc"]
    assert args.targets() == {"target_modules": None, "exclude_modules": ["head", "fc"], "skip_first_last": False,
                              "factorise_embeddings": False, "rank_multiple": 4, "method": "svd", "rank_allocation": "spectrum",
                              "sensitivity_samples": 16, "sequential": False}


def test_model_card_names_the_real_dataset(tmp_path):
    assert dataset_card_fields("fashion_mnist") == {"datasets": ["zalando-datasets/fashion_mnist"],
                                                    "dataset_pretty_name": "Fashion-MNIST"}
    assert dataset_card_fields("cifar10")["datasets"] == ["uoft-cs/cifar10"]
    assert dataset_card_fields("someone/pets") == {"datasets": ["someone/pets"], "dataset_pretty_name": None}
    assert dataset_card_fields(save_tiny_fmnist(tmp_path / "my_images")) == {"datasets": [],
                                                                             "dataset_pretty_name": "my_images"}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--random_crop_padding", "0"], "--random_crop_padding does nothing without --augment"),
        (["--rank_projection_every", "3", "--rank_projection_end", "0.5"],
         "--rank_projection_every, --rank_projection_end do(es) nothing without --rank_projection_param_reduction"),
        (["--augment", "--random_crop_padding", "0", "--rank_projection_param_reduction", "0.5",
          "--rank_projection_every", "3"], None),
    ],
)
def test_flags_that_would_do_nothing_are_said(argv, said, caplog, tmp_path):
    from smooth_hf import SmoothTrainingArguments

    parser = HfArgumentParser((TrainingDataArguments, SmoothTrainingArguments))
    with caplog.at_level("WARNING"):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--use_cpu", *argv])
    assert (said in caplog.text) if said else "does nothing" not in caplog.text and "do(es) nothing" not in caplog.text

"""Every kind of bad input, in one table: the error type, a phrase that says what to do, and nothing changed:
no file under the test's folder written, changed or removed, and the model's tensors as they were.

Reload errors (corrupt, dense, pickled, mismatched folders) come from test_hub.ERROR_CASES, so the
two tables cannot drift apart.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TinyConvNet
from datasets import Dataset, DatasetDict
from test_hub import ERROR_CASES as RELOAD_CASES

import smooth_hf
from smooth_hf import LowRankConfig, SmoothTrainer, SmoothTrainingArguments, compress
from smooth_hf.checkpoint.build import check_num_labels
from smooth_hf.data.images import load_image_classification
from smooth_hf.scripts.args import DataArguments, resolve_data_arguments


def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))


def args(tmp, **kw):
    return SmoothTrainingArguments(output_dir=str(tmp / "out"), report_to=[], use_cpu=True, **kw)


def nan_weight(tmp):
    model = resnet()
    with torch.no_grad():
        model.stages[1][0].conv1.weight[0, 0, 0, 0] = math.nan
    return model


def compressed(tmp):
    model = resnet()
    compress(model, LowRankConfig(rank_ratio=0.5))
    return model


def saved_dataset(columns):
    def setup(tmp):
        path = tmp / "data"
        data = {"image": np.zeros((4, 8, 8), np.uint8).tolist(), "label": [0, 1, 0, 1], "other": [1, 2, 3, 4]}
        DatasetDict({"train": Dataset.from_dict({k: data[k] for k in columns})}).save_to_disk(path)
        return path

    return setup


def trainer(tmp):
    return SmoothTrainer(model=TinyConvNet(), args=args(tmp, first_order_coef=1.0))


def with_model(config, **compress_kwargs):
    return lambda model, tmp: compress(model, config, **compress_kwargs)


CASES = [
    # (id, setup(tmp) -> object or None, action(object, tmp), exception, phrase that says what is wrong / what to do)
    ("negative coefficient", None, lambda _, t: args(t, first_order_coef=-1.0), ValueError, "finite number >= 0"),
    ("NaN coefficient", None, lambda _, t: args(t, nuclear_norm_coef=math.nan), ValueError, "finite number >= 0"),
    ("infinite coefficient", None, lambda _, t: args(t, second_order_coef=math.inf), ValueError, "finite number >= 0"),
    ("SVD refresh period 0", None, lambda _, t: args(t, nuclear_norm_every=0), ValueError, "integer >= 1"),
    ("projected cut out of range", None, lambda _, t: args(t, rank_projection_param_reduction=1.0), ValueError,
     "fraction in"),
    ("projected cut out of reach", lambda t: resnet(),
     lambda model, t: SmoothTrainer(model=model, args=args(t, rank_projection_param_reduction=0.95)), ValueError,
     "Lower it, or penalise more layers"),
    ("projection window reversed", None,
     lambda _, t: args(t, rank_projection_param_reduction=0.5, rank_projection_start=0.8, rank_projection_end=0.2),
     ValueError, "0 <= start <= end <= 1"),
    ("no rank rule", None, lambda _, t: LowRankConfig(), ValueError, "exactly one"),
    ("two rank rules", None, lambda _, t: LowRankConfig(param_reduction=0.5, energy=0.9), ValueError, "exactly one"),
    ("param_reduction out of range", None, lambda _, t: LowRankConfig(param_reduction=1.0), ValueError, r"\[0, 1\)"),
    ("rank_ratio out of range", None, lambda _, t: LowRankConfig(rank_ratio=0.0), ValueError, r"\(0, 1\]"),
    ("energy out of range", None, lambda _, t: LowRankConfig(energy=1.5), ValueError, r"\(0, 1\]"),
    ("min_rank < 1", None, lambda _, t: LowRankConfig(rank_ratio=0.5, min_rank=0), ValueError, "min_rank"),
    ("target matches nothing", lambda t: resnet(), with_model(LowRankConfig(rank_ratio=0.5, target_modules=["nope"])),
     ValueError, "'nope' matches no module"),
    ("exclude matches nothing", lambda t: resnet(), with_model(LowRankConfig(rank_ratio=0.5, exclude_modules=["nope"])),
     ValueError, "'nope' matches no module"),
    ("unfactorisable layer named", lambda t: resnet(), with_model(LowRankConfig(rank_ratio=0.5, target_modules=["bn1"])),
     ValueError, r"bn1 \(BatchNorm2d\)"),
    ("NaN weight before SVD", nan_weight, with_model(LowRankConfig(rank_ratio=0.5)), ValueError, "stages.1.0.conv1"),
    ("budget out of reach", lambda t: resnet(), with_model(LowRankConfig(param_reduction=0.99)), ValueError, "at most"),
    ("compute budget out of reach", lambda t: resnet(),
     with_model(LowRankConfig(macs_reduction=0.99), example_inputs=torch.randn(1, 1, 8, 8)), ValueError,
     "Lower macs_reduction to at most"),
    ("macs_reduction out of range", None, lambda _, t: LowRankConfig(macs_reduction=1.0), ValueError, r"\[0, 1\)"),
    ("compute budget without example inputs", lambda t: resnet(), with_model(LowRankConfig(macs_reduction=0.5)),
     ValueError, r"example_inputs=\.\.\."),
    ("keep_slower_dense without example inputs", lambda t: resnet(),
     with_model(LowRankConfig(param_reduction=0.5, keep_slower_dense=True)), ValueError,
     "keep_slower_dense need example inputs"),
    ("layer_timer without keep_slower_dense", lambda t: resnet(),
     with_model(LowRankConfig(param_reduction=0.5), layer_timer=lambda m, x: 1.0), ValueError, "keep_slower_dense=True"),
    ("example inputs of the wrong type", lambda t: resnet(),
     with_model(LowRankConfig(macs_reduction=0.5), example_inputs=np.zeros((1, 1, 8, 8))), TypeError,
     "a tuple of positional arguments or a dict of keyword arguments"),
    ("example inputs the model cannot run", lambda t: resnet(),
     with_model(LowRankConfig(macs_reduction=0.5), example_inputs=torch.randn(1, 3, 8, 8)), RuntimeError,
     "forward pass failed on example_inputs"),
    ("already compressed", compressed, with_model(LowRankConfig(rank_ratio=0.5)), ValueError, "already compressed"),
    ("dataset without image column", saved_dataset(["label", "other"]), lambda path, t: load_image_classification(str(path)),
     ValueError, "no image column"),
    ("dataset without label column", saved_dataset(["image", "other"]), lambda path, t: load_image_classification(str(path)),
     ValueError, "no label column"),
    ("dataset without a train split", lambda t: DatasetDict({"test": Dataset.from_dict({"x": [1]})}).save_to_disk(t / "d"),
     lambda _, t: load_image_classification(str(t / "d")), ValueError, "rename its training split to 'train'"),
    ("label count mismatch", lambda t: resnet(), lambda model, t: check_num_labels(model, 10), ValueError,
     "3 outputs but the dataset has 10"),
    ("save an uncompressed model", lambda t: resnet(), lambda model, t: smooth_hf.save_pretrained(model, t / "ckpt"),
     ValueError, r"smooth_hf\.compress"),
    ("compress a checkpoint that recorded no data", None,
     lambda _, t: resolve_data_arguments(DataArguments(), t / "ckpt", None), ValueError,
     "name the evaluation data with --dataset_name"),
    ("batch without the model's inputs", trainer,
     lambda tr, t: tr.compute_loss(tr.model, {"img": torch.zeros(1, 1, 8, 8), "labels": torch.zeros(1, dtype=torch.long)}),
     ValueError, "'pixel_values' and 'labels'"),
]


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def state(obj) -> dict[str, str] | None:
    """A hash of every tensor of a model (or of a trainer's model): what a failed call must leave as it was."""
    model = getattr(obj, "model", obj)
    if not isinstance(model, torch.nn.Module):
        return None
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("case", "setup", "action", "error", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, case, setup, action, error, phrase):
    obj = setup(tmp_path) if setup else None
    files_before, state_before = tree(tmp_path), state(obj)
    with pytest.raises(error, match=phrase):
        action(obj, tmp_path)
    assert tree(tmp_path) == files_before, "a failed call wrote, changed or removed files"
    assert state(obj) == state_before, "a failed call changed the model"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    model = timm.create_model("resnet14_cifar", in_chans=1, num_classes=10)  # the model RELOAD_CASES edit
    compress(model, LowRankConfig(rank_ratio=0.5))
    return smooth_hf.save_pretrained(model, tmp_path_factory.mktemp("good") / "ckpt")


@pytest.mark.parametrize(("case", "breaker", "error", "phrase"), RELOAD_CASES, ids=[c[0] for c in RELOAD_CASES])
def test_bad_checkpoint_folder(good_checkpoint, tmp_path, case, breaker, error, phrase):
    folder = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, folder)
    breaker(folder)
    with pytest.raises(error, match=phrase):
        smooth_hf.from_pretrained(folder)

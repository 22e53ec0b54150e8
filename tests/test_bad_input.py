"""Every kind of bad input, in one table: the error type, a phrase that says what to do, nothing written.

Reload errors (corrupt, dense, pickled, mismatched folders) come from test_hub.ERROR_CASES, so the
two tables cannot drift apart.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import Dataset, DatasetDict
from test_hub import ERROR_CASES as RELOAD_CASES

import smooth_hf
from smooth_hf import LowRankConfig, SmoothTrainingArguments, compress
from smooth_hf.auto import check_num_labels
from smooth_hf.data import load_image_classification


def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))


def args(tmp, **kw):
    return SmoothTrainingArguments(output_dir=str(tmp / "out"), report_to=[], use_cpu=True, **kw)


def compress_resnet(tmp, config, prepare=None, **compress_kwargs):
    model = resnet()
    if prepare:
        prepare(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        compress(model, config, **compress_kwargs)
    finally:  # on any error the model is untouched
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.allclose(before[k], after[k], equal_nan=True, rtol=0, atol=0) for k in before)


def nan_weight(model):
    with torch.no_grad():
        model.stages[1][0].conv1.weight[0, 0, 0, 0] = math.nan


def compress_twice(tmp):
    model = resnet()
    compress(model, LowRankConfig(rank_ratio=0.5))
    compress(model, LowRankConfig(rank_ratio=0.5))


def saved_dataset(tmp, columns):
    path = tmp / "data"
    data = {"image": np.zeros((4, 8, 8), np.uint8).tolist(), "label": [0, 1, 0, 1], "other": [1, 2, 3, 4]}
    DatasetDict({"train": Dataset.from_dict({k: data[k] for k in columns})}).save_to_disk(path)
    return load_image_classification(str(path))


def save_uncompressed(tmp):
    smooth_hf.save_pretrained(resnet(), tmp / "ckpt")


CASES = [
    # (id, action(tmp_path), exception, phrase that says what is wrong / what to do)
    ("negative coefficient", lambda t: args(t, first_order_coef=-1.0), ValueError, "finite number >= 0"),
    ("NaN coefficient", lambda t: args(t, nuclear_norm_coef=math.nan), ValueError, "finite number >= 0"),
    ("infinite coefficient", lambda t: args(t, second_order_coef=math.inf), ValueError, "finite number >= 0"),
    ("SVD refresh period 0", lambda t: args(t, nuclear_norm_every=0), ValueError, "integer >= 1"),
    ("no rank rule", lambda t: LowRankConfig(), ValueError, "exactly one"),
    ("two rank rules", lambda t: LowRankConfig(param_reduction=0.5, energy=0.9), ValueError, "exactly one"),
    ("param_reduction out of range", lambda t: LowRankConfig(param_reduction=1.0), ValueError, r"\[0, 1\)"),
    ("rank_ratio out of range", lambda t: LowRankConfig(rank_ratio=0.0), ValueError, r"\(0, 1\]"),
    ("energy out of range", lambda t: LowRankConfig(energy=1.5), ValueError, r"\(0, 1\]"),
    ("min_rank < 1", lambda t: LowRankConfig(rank_ratio=0.5, min_rank=0), ValueError, "min_rank"),
    ("target matches nothing", lambda t: compress_resnet(t, LowRankConfig(rank_ratio=0.5, target_modules=["nope"])),
     ValueError, "'nope' matches no module"),
    ("exclude matches nothing", lambda t: compress_resnet(t, LowRankConfig(rank_ratio=0.5, exclude_modules=["nope"])),
     ValueError, "'nope' matches no module"),
    ("unfactorisable layer named", lambda t: compress_resnet(t, LowRankConfig(rank_ratio=0.5, target_modules=["bn1"])),
     ValueError, r"bn1 \(BatchNorm2d\)"),
    ("NaN weight before SVD", lambda t: compress_resnet(t, LowRankConfig(rank_ratio=0.5), nan_weight),
     ValueError, "stages.1.0.conv1"),
    ("budget out of reach", lambda t: compress_resnet(t, LowRankConfig(param_reduction=0.99)), ValueError, "at most"),
    ("compute budget out of reach",
     lambda t: compress_resnet(t, LowRankConfig(macs_reduction=0.99), example_inputs=torch.randn(1, 1, 8, 8)),
     ValueError, "Lower macs_reduction to at most"),
    ("macs_reduction out of range", lambda t: LowRankConfig(macs_reduction=1.0), ValueError, r"\[0, 1\)"),
    ("compute budget without example inputs", lambda t: compress_resnet(t, LowRankConfig(macs_reduction=0.5)),
     ValueError, r"example_inputs=\.\.\."),
    ("keep_slower_dense without example inputs",
     lambda t: compress_resnet(t, LowRankConfig(param_reduction=0.5, keep_slower_dense=True)), ValueError,
     r"keep_slower_dense need example inputs"),
    ("layer_timer without keep_slower_dense",
     lambda t: compress_resnet(t, LowRankConfig(param_reduction=0.5), layer_timer=lambda m, x: 1.0), ValueError,
     "keep_slower_dense=True"),
    ("example inputs of the wrong type",
     lambda t: compress_resnet(t, LowRankConfig(macs_reduction=0.5), example_inputs=np.zeros((1, 1, 8, 8))),
     TypeError, "a tuple of positional arguments or a dict of keyword arguments"),
    ("example inputs the model cannot run",
     lambda t: compress_resnet(t, LowRankConfig(macs_reduction=0.5), example_inputs=torch.randn(1, 3, 8, 8)),
     RuntimeError, "forward pass failed on example_inputs"),
    ("already compressed", compress_twice, ValueError, "already compressed"),
    ("dataset without image column", lambda t: saved_dataset(t, ["label", "other"]), ValueError, "no image column"),
    ("dataset without label column", lambda t: saved_dataset(t, ["image", "other"]), ValueError, "no label column"),
    ("label count mismatch", lambda t: check_num_labels(resnet(), 10), ValueError, "3 outputs but the dataset has 10"),
    ("save an uncompressed model", save_uncompressed, ValueError, r"smooth_hf\.compress"),
]


@pytest.mark.parametrize(("case", "action", "error", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, case, action, error, phrase):
    with pytest.raises(error, match=phrase):
        action(tmp_path)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists(), "a failed call wrote files"


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

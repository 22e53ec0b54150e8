"""One matcher for penalties and compression: names, suffixes, containers, regexes, clear errors."""

from __future__ import annotations

import pytest
import timm
from conftest import tiny_bert
from torch import nn

from smooth_hf.lowrank.targeting import find_layers, layer_kind


def names(layers):
    return [n for n, _ in layers]


@pytest.fixture
def resnet():
    return timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))


def test_default_selects_every_linear_and_conv(resnet):
    selected = names(find_layers(resnet))
    assert selected[0] == "conv1" and selected[-1] == "fc"
    assert len(selected) == 1 + 2 + 3 + 3 + 1  # stem, stage convs (+ 2 downsample), head


def test_skip_first_last(resnet):
    assert names(find_layers(resnet, skip_first_last=True)) == names(find_layers(resnet))[1:-1]


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["conv1"], ["conv1", "stages.0.0.conv1", "stages.1.0.conv1", "stages.2.0.conv1"]),  # suffix
        (["stages.1"], ["stages.1.0.conv1", "stages.1.0.conv2", "stages.1.0.downsample.0"]),  # container
        (r"stages\.2\.0\.conv\d", ["stages.2.0.conv1", "stages.2.0.conv2"]),  # regex, whole name
    ],
)
def test_patterns(resnet, targets, expected):
    assert names(find_layers(resnet, targets)) == expected


def test_exclude(resnet):
    selected = names(find_layers(resnet, exclude_modules=["downsample", "fc"]))
    assert "fc" not in selected and not any("downsample" in n for n in selected)
    assert names(find_layers(resnet, exclude_modules=r"stages\.0\..*")) == [
        n for n in names(find_layers(resnet)) if not n.startswith("stages.0.")
    ]
    # an exclude regex that names layers outside the targets is not an error: it matches layers
    assert names(find_layers(resnet, ["stages.1"], exclude_modules=r"stages\.2\..*")) == names(find_layers(resnet, ["stages.1"]))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        # Each message says what is wrong and what to do instead.
        ({"target_modules": ["nope"]}, "'nope' matches no module: use a module name, or the end of one"),
        ({"exclude_modules": ["nope"]}, "'nope' matches no module: use a module name"),
        ({"target_modules": r"conv"}, r"matches no module name \(it must match the whole name, e\.g\. '\.\*conv\.\*'"),
        ({"target_modules": r"(["}, "is invalid.*Fix the regex, or pass a list of module names"),
        ({"target_modules": ["bn1"]}, r"bn1 \(BatchNorm2d\).*name layers of those types"),
        # a regex matches whole names: one naming only a container would exclude nothing
        ({"exclude_modules": r"stages\.0"}, r"matches no Linear, Conv2d or Conv1D layer .*pass a list of names"),
    ],
)
def test_bad_patterns_are_errors(resnet, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        find_layers(resnet, **kwargs)


def test_hf_conv1d_and_bert_layers():
    from transformers.pytorch_utils import Conv1D

    assert layer_kind(Conv1D(4, 3)) == "conv1d"
    selected = names(find_layers(tiny_bert(), ["query", "value"]))
    assert selected == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_layers_that_change_the_computation_are_not_supported():
    class StdConv(nn.Conv2d):  # like timm's StdConv2d: standardises its weight in forward
        def forward(self, x):
            return super().forward(x)

    assert layer_kind(StdConv(2, 2, 3)) is None
    assert layer_kind(nn.Conv2d(2, 2, 3)) == "conv2d" and layer_kind(nn.Linear(2, 2)) == "linear"

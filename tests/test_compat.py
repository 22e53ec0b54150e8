"""smooth_hf.core.libraries: the one answer to "transformers, timm or plain?" and to "is this HF's Conv1D?"."""

from __future__ import annotations

import pytest
import timm
from conftest import TinyConvNet, tiny_vit
from torch import nn
from transformers.pytorch_utils import Conv1D

from smooth_hf.checkpoint.dense import save_dense
from smooth_hf.core.libraries import base_library, is_hf_conv1d, is_transformers_model_class
from smooth_hf.lowrank.targeting import layer_kind
from smooth_hf.training.penalties import out_in_weight


class SubclassedConv1D(Conv1D):
    """A model's own subclass of HF Conv1D: still stored (in, out), so it must be recognised."""


# A look-alike: named Conv1D (even claiming transformers' module), but a plain Linear stored (out, in).
LookAlike = type("Conv1D", (nn.Linear,), {"__module__": "transformers.pytorch_utils"})


def test_base_library():
    assert base_library(tiny_vit()) == "transformers"
    assert base_library(timm.create_model("resnet14_cifar", in_chans=1, channels=(4, 8, 8), layers=(1, 1, 1))) == "timm"
    assert base_library(TinyConvNet()) is None
    plain = TinyConvNet()
    plain.pretrained_cfg = {}  # a stray attribute without timm's architecture does not make a timm model
    assert base_library(plain) is None


def test_transformers_model_class():
    assert is_transformers_model_class(type(tiny_vit()))
    assert not is_transformers_model_class(TinyConvNet) and not is_transformers_model_class("ViTModel")


def test_hf_conv1d_is_recognised_by_type_not_by_name():
    sub = SubclassedConv1D(nf=5, nx=3)  # weight stored (in=3, out=5)
    assert is_hf_conv1d(Conv1D(4, 3)) and is_hf_conv1d(sub)
    assert layer_kind(sub) == "conv1d" and tuple(out_in_weight(sub).shape) == (5, 3)

    look_alike = LookAlike(3, 5)
    assert not is_hf_conv1d(look_alike)
    assert layer_kind(look_alike) == "linear" and out_in_weight(look_alike) is look_alike.weight


def test_save_dense_refuses_a_plain_module_before_writing(tmp_path):
    with pytest.raises(TypeError, match="neither a timm nor a transformers model"):
        save_dense(TinyConvNet(), tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""Quantization on top of a compressed transformers model, through the calls a user makes: ``from_pretrained`` of
the compressed folder with a ``TorchAoConfig``, ``save_pretrained``, ``from_pretrained`` again
(:mod:`smooth_hf.integrations.stacking`); and the errors for what does not stack."""

from __future__ import annotations

import json
import operator
import sys

import pytest
import torch
from conftest import compressed_model, logits, tiny_bert
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from torchao.utils import TorchAOBaseTensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    GPTQConfig,
    TorchAoConfig,
)

import smooth_hf
from smooth_hf.core.optional import require
from smooth_hf.integrations.transformers import SmoothHfConfig
from smooth_hf.lowrank import LowRankLayer
from smooth_hf.lowrank.timing import onnxruntime_latency


def int8() -> TorchAoConfig:
    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, _ = compressed_model("gpt2")
    return smooth_hf.save_pretrained(model, tmp_path_factory.mktemp("gpt2") / "compressed")


@pytest.fixture(scope="module")
def quantized(folder):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=int8())


def factor_weights(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(module, part).weight for name, module in model.named_modules()
            if isinstance(module, LowRankLayer) for part in ("down", "up")}


def test_torchao_quantizes_the_factors_on_load_and_keeps_the_ranks(quantized):
    model, inputs = compressed_model("gpt2")
    weights = factor_weights(quantized)
    assert len(weights) == 2 * len(model.lowrank_config.ranks)
    assert all(isinstance(w, TorchAOBaseTensor) for w in weights.values())
    assert quantized.lowrank_config.ranks == model.lowrank_config.ranks
    assert {n: m.rank for n, m in quantized.named_modules() if isinstance(m, LowRankLayer)} == model.lowrank_config.ranks
    expected = logits(model, inputs)
    error = float((logits(quantized, inputs) - expected).norm() / expected.norm())
    assert 0 < error < 2e-2  # int8 rounding: changed, and close


def test_the_saved_quantized_model_reloads_quantized(quantized, folder, tmp_path):
    _, inputs = compressed_model("gpt2")
    quantized.save_pretrained(tmp_path / "int8")
    section = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "smooth_hf" and section["ranks"] == quantized.lowrank_config.ranks
    assert section["weight_quantization"]["quant_method"] == "torchao"
    assert section["weight_quantization"]["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size
    expected = logits(quantized, inputs)
    reloaded = smooth_hf.from_pretrained(tmp_path / "int8")
    smooth_hf.save_pretrained(reloaded, tmp_path / "again")  # smooth_hf's save records both too
    for again in (AutoModelForCausalLM.from_pretrained(tmp_path / "int8"), reloaded,
                  AutoModelForCausalLM.from_pretrained(tmp_path / "again")):
        assert all(isinstance(w, TorchAOBaseTensor) for w in factor_weights(again).values())
        torch.testing.assert_close(logits(again, inputs), expected, rtol=0, atol=0)


def test_loading_it_again_with_the_same_method_keeps_the_saved_quantization(quantized, tmp_path):
    _, inputs = compressed_model("gpt2")
    quantized.save_pretrained(tmp_path / "int8")
    with pytest.warns(UserWarning, match="already quantized"):
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", quantization_config=int8())
    torch.testing.assert_close(logits(again, inputs), logits(quantized, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already quantized with 'torchao'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "int8", quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def test_a_rank_one_factor_stays_in_float(tmp_path):
    """torchao's int8 fails on a weight with one input column (a rank-1 factor's `up`): that factor stays float."""
    model = smooth_hf.compress(tiny_bert(num_labels=2).eval(), smooth_hf.LowRankConfig(rank_ratio=0.5))
    assert model.lowrank_config.ranks["classifier"] == 1
    inputs = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))}
    folder = smooth_hf.save_pretrained(model, tmp_path / "bert")
    quantized = AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=int8())
    weights = factor_weights(quantized)
    assert type(weights.pop("classifier.up")) is torch.nn.Parameter
    assert all(isinstance(w, TorchAOBaseTensor) for w in weights.values())
    quantized.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "int8")
    torch.testing.assert_close(logits(reloaded, inputs), logits(quantized, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("config", [BitsAndBytesConfig(load_in_8bit=True), GPTQConfig(bits=4)], ids=["bnb", "gptq"])
def test_other_methods_are_refused_naming_what_works(folder, config):
    with pytest.raises(ValueError, match=r"cannot be combined with a smooth_hf compressed checkpoint.*TorchAoConfig"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)


def test_weights_quantized_by_hand_are_not_saved_half_recorded(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    quantize_(model, Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match=r"quantized after the model was loaded.*quantization_config=TorchAoConfig"):
        model.save_pretrained(tmp_path / "by-hand")
    assert not (tmp_path / "by-hand" / "model.safetensors").exists()


def test_dense_checkpoints_quantize_as_transformers_does(tmp_path):
    """The merge of two quantization configs is transformers' own for any checkpoint smooth_hf did not compress."""
    tiny_bert().save_pretrained(tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense", quantization_config=int8())
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense.weight, TorchAOBaseTensor)
    model.save_pretrained(tmp_path / "int8")
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "int8", quantization_config=int8())


def test_a_missing_optional_dependency_names_its_extra(quantized, tmp_path, monkeypatch):
    quantized.save_pretrained(tmp_path / "int8")
    section = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r"needs torchao.*pip install 'smooth_hf\[deploy\]'"):
        SmoothHfConfig.from_dict(section)  # what reading the saved folder's config.json does
    with pytest.raises(ImportError, match=r"onnxruntime_latency needs onnxruntime.*smooth_hf\[deploy\]"):
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        onnxruntime_latency(torch.nn.Linear(2, 2), torch.randn(1, 2))
    assert require("json", "reading").dumps([1]) == "[1]"


def test_int8_pt2e_on_a_compressed_timm_cnn(tmp_path):
    """torchao's quantize_ has no int8 convolution; a compressed CNN goes through torchao's PT2E flow for x86 CPUs,
    as docs/integrations.md shows (there followed by torch.compile, which runs the int8 kernels)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    compressed, inputs = compressed_model("timm-resnet14_cifar")
    model = smooth_hf.from_pretrained(smooth_hf.save_pretrained(compressed, tmp_path / "cnn"))
    calibration = torch.randn(4, 8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    graph = torch.export.export(model, (calibration[0],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    for images in calibration:
        prepared(images)
    int8_model = convert_pt2e(prepared)
    constants = [operator.attrgetter(node.target)(int8_model) for node in int8_model.graph.nodes if node.op == "get_attr"]
    factor_convs = sum(1 for m in model.modules() if isinstance(m, LowRankLayer)) * 2
    assert sum(1 for t in constants if isinstance(t, torch.Tensor) and t.dtype == torch.int8) >= factor_convs
    expected = logits(model, inputs)
    with torch.no_grad():
        error = float((int8_model(inputs["x"]) - expected).norm() / expected.norm())
    assert 0 < error < 0.1

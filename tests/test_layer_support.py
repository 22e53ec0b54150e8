"""Which layers compress, and clear reasons for those that cannot: Linear subclasses (Falcon), fused expert
tensors (Mixtral), lazy layers, timm models with non-JSON constructor arguments, the data-free repair's size."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import timm
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FalconConfig, FalconForCausalLM, MixtralConfig, MixtralForCausalLM

import smooth_hf
from smooth_hf import LowRankConfig, compress, count_parameters
from smooth_hf.lowrank import LowRankLinear
from smooth_hf.lowrank.batchnorm import DataFreeRecalibration, default_num_samples
from smooth_hf.lowrank.diagnosis import unfactorisable_weights
from smooth_hf.lowrank.report import STATUS_DENSE_HOOKED
from smooth_hf.lowrank.targeting import layer_kind

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


class HandWrittenLinear(nn.Linear):
    """Same maths as nn.Linear, its own forward (what Falcon's FalconLinear does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class ScaledLinear(nn.Linear):
    """Not a plain linear map of its weight: factorising W would change what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * 1.0001, self.bias)


class GatedLinear(nn.Linear):
    """Holds an extra parameter its forward uses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.ones(self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gate


def test_linear_subclasses_are_factorised_only_when_they_compute_a_plain_linear_map():
    plain, scaled, gated = HandWrittenLinear(16, 12), ScaledLinear(16, 12), GatedLinear(16, 12)
    assert layer_kind(plain) == "linear"
    assert layer_kind(HandWrittenLinear(8, 8, bias=False)) == "linear"
    assert layer_kind(scaled) is None and layer_kind(gated) is None
    before = plain.weight.detach().clone()
    layer_kind(plain)
    assert torch.equal(plain.weight, before) and plain.in_features == 16  # the probe works on a copy

    model = nn.Sequential(HandWrittenLinear(16, 16), nn.ReLU(), ScaledLinear(16, 16), nn.ReLU(), HandWrittenLinear(16, 4))
    x = torch.randn(3, 16)
    compress(model, LowRankConfig(rank_ratio=0.25))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], ScaledLinear)
    assert [(cls, n) for cls, _, n in unfactorisable_weights(model)] == [("ScaledLinear", 256)]
    assert model(x).shape == (3, 4)


class InstanceScaledLinear(nn.Linear):
    """Scales by an attribute of the instance: plain at scale 1, not at any other."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.scale, self.bias)


@pytest.mark.parametrize("scales", [(1.0, 3.0), (3.0, 1.0)])
def test_each_instance_of_a_linear_subclass_is_judged_by_its_own_attributes(scales):
    """The probe's answer for one instance is not reused for another whose attributes differ, in either order."""
    model = nn.Sequential(*(InstanceScaledLinear(16, 16, scale=s) for s in scales))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))  # rank 2: a faithful cut changes nothing
    x, dense = torch.randn(3, 16), copy.deepcopy(model)
    compress(model, LowRankConfig(energy=1.0))
    assert [isinstance(layer, LowRankLinear) for layer in model] == [s == 1.0 for s in scales]
    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)


def test_a_weight_recomputed_by_a_hook_is_not_cut_from_its_stale_copy():
    """The old torch.nn.utils.weight_norm keeps ``weight`` as a plain attribute that its forward pre-hook
    recomputes: after load_state_dict it is stale until the next forward, so the layer stays dense. The
    parametrization-based weight_norm computes the weight when it is read, and is cut as usual."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based API is deprecated, and still in use
        hooked = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 16))
    compress(hooked, LowRankConfig(rank_ratio=0.25))
    assert hooked.lowrank_report.layers[0].status == STATUS_DENSE_HOOKED and isinstance(hooked[2], LowRankLinear)
    low_rank = nn.Linear(16, 16)
    with torch.no_grad():
        low_rank.weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))  # rank 2: a faithful cut changes nothing
    parametrized = torch.nn.utils.parametrizations.weight_norm(low_rank)
    assert layer_kind(parametrized) == "linear"
    model = nn.Sequential(parametrized, nn.ReLU(), nn.Linear(16, 4))
    x, dense = torch.randn(3, 16), copy.deepcopy(model)
    compress(model, LowRankConfig(energy=1.0))
    assert isinstance(model[0], LowRankLinear)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)


def test_a_layer_whose_hooks_read_its_sub_modules_stays_dense():
    """torch.ao's prepare gives a Linear an observer sub-module that its forward hook calls: a factorised layer has
    none, so the layer stays dense (and the model runs as before)."""
    import torch.ao.quantization as quantization

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model[0].qconfig = quantization.default_qconfig
    quantization.prepare(model, inplace=True)
    x = torch.randn(3, 16)
    compress(model, LowRankConfig(rank_ratio=0.25))
    assert model.lowrank_report.layers[0].status == STATUS_DENSE_HOOKED and isinstance(model[2], LowRankLinear)
    assert model(x).shape == (3, 16)


def test_falcon_compresses_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    model.eval()
    assert type(model.transformer.h[0].mlp.dense_h_to_4h).__name__ == "FalconLinear"
    compress(model, LowRankConfig(param_reduction=0.3))
    assert model.lowrank_report.reduction == pytest.approx(0.3, abs=0.01)
    assert any(".mlp.dense_h_to_4h" in name for name in model.lowrank_config.ranks)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "falcon")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "falcon")(IDS).logits, expected)


def test_fused_expert_tensors_are_named_as_the_reason_a_budget_is_out_of_reach():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config)
    with pytest.raises(ValueError, match=r"MixtralExperts: [\d,]+ parameters \(3-D fused tensors") as info:
        compress(model, LowRankConfig(param_reduction=0.7))
    # Every Linear is already targeted: widening target_modules would not help, so it is not advised.
    assert "widen target_modules" not in str(info.value)


def test_a_model_where_nothing_can_be_factorised_warns_with_the_reason(caplog):
    model = nn.Sequential(nn.Embedding(50, 16), ScaledLinear(16, 16))
    with caplog.at_level(logging.WARNING, logger="smooth_hf.lowrank.compress"):
        compress(model, LowRankConfig(rank_ratio=0.5))
    assert "no layer was factorised" in caplog.text
    assert "ScaledLinear: 256 parameters (nn.Linear subclass whose forward is not a plain" in caplog.text
    assert "Embedding: 800 parameters (embedding tables" in caplog.text


def test_lazy_layers_say_to_run_a_forward_pass_first():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    for call in (lambda: count_parameters(model), lambda: compress(model, LowRankConfig(rank_ratio=0.5))):
        with pytest.raises(ValueError, match=r"uninitialised lazy parameters \(0\.weight.*Run one forward pass"):
            call()
    model(torch.randn(2, 5))  # materialised: now both work
    assert count_parameters(model) == 5 * 8 + 8 + 8 * 4 + 4
    compress(model, LowRankConfig(rank_ratio=0.5))


def test_timm_model_with_a_class_argument_saves_with_model_args(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", act_layer=nn.SiLU, num_classes=3).eval()
    compress(model, LowRankConfig(rank_ratio=0.5, target_modules=["layer1"]))  # the smallest convs: fast
    assert model.lowrank_config.ranks
    with pytest.raises(ValueError, match=r"'act_layer' is not serializable.*model_args=\{'act_layer': 'silu'\}"):
        smooth_hf.save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a").exists(), "a failed save must write nothing"

    folder = smooth_hf.save_pretrained(model, tmp_path / "b", model_args={"act_layer": "silu"})
    assert json.loads((folder / "config.json").read_text())["model_args"]["act_layer"] == "silu"
    loaded = smooth_hf.from_pretrained(folder)
    assert isinstance(loaded.act1, nn.SiLU)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_model_args_is_refused_for_transformers_models(tmp_path):
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    compress(model, LowRankConfig(rank_ratio=0.5))
    with pytest.raises(TypeError, match="model_args is for timm models"):
        smooth_hf.save_pretrained(model, tmp_path / "g", model_args={"n_layer": 2})


@pytest.mark.parametrize(("shape", "expected"), [((1, 28, 28), 256), ((3, 32, 32), 256), ((3, 64, 64), 64),
                                                 ((3, 224, 224), 16), ((3, 8, 8), 256)])
def test_data_free_repair_batch_is_sized_to_the_input(shape, expected):
    assert default_num_samples(shape) == expected
    assert DataFreeRecalibration().num_samples is None  # sized when the input shape is known


def test_the_probe_cache_keeps_no_module_alive():
    """An instance attribute that is not a plain value (a bound method, as accelerate's dispatch adds, or a tensor)
    is probed alone and never enters the class-level cache, which would keep the replaced layer alive."""
    import gc
    import weakref

    from smooth_hf.lowrank import targeting

    layer = HandWrittenLinear(16, 16)
    layer.helper = layer.extra_repr  # a bound method: holds the module
    assert layer_kind(layer) == "linear"
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    assert alive() is None and not any(
        any(not targeting._plain_value(v) for _, v in key[2]) for key in targeting._LINEAR_MAP_CLASSES
    )

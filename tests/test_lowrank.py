"""Low-rank layers, compress(), apply_ranks(), LowRankConfig and BatchNorm recalibration on tiny models."""

from __future__ import annotations

import copy
import importlib
import json
import math

import pytest
import timm
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import smooth_hf.models.resnet_cifar  # noqa: F401  (registers resnet14_cifar with timm)
from smooth_hf.core.files import COMPRESSION_CONFIG_NAME
from smooth_hf.lowrank import (
    CompressionReport,
    LayerReport,
    LowRankConfig,
    LowRankConv2d,
    LowRankLayer,
    LowRankLinear,
    apply_ranks,
    compress,
    count_parameters,
)
from smooth_hf.lowrank.batchnorm import (
    DataFreeRecalibration,
    batchnorm_layers,
    recalibrate_batchnorm,
    synthesize_batchnorm_inputs,
)
from smooth_hf.lowrank.report import STATUS_DENSE_UNRECORDED
from smooth_hf.lowrank.structure import replace_module

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def resnet14() -> nn.Module:
    return timm.create_model("resnet14_cifar", in_chans=1).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return BertForSequenceClassification(config).eval()


def low_rank_matrix(out: int, inp: int, rank: int) -> torch.Tensor:
    return torch.randn(out, rank) @ torch.randn(rank, inp)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_reproduces_dense(bias):
    dense = nn.Linear(12, 20, bias=bias)
    low = LowRankLinear.from_dense(dense, rank=12)
    x = torch.randn(5, 3, 12)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    assert (low.in_features, low.out_features, low.rank) == (12, 20, 12)
    assert (low.up.bias is not None) == bias and low.down.bias is None
    assert "rank=12" in repr(low)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1, "bias": True},
        {"kernel_size": 3, "stride": 1, "padding": 2, "dilation": 2, "bias": False},
        {"kernel_size": (3, 1), "stride": (2, 1), "padding": (1, 0), "bias": True},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect", "bias": False},
        {"kernel_size": 1, "stride": 2, "bias": True},
    ],
)
def test_conv2d_full_rank_reproduces_dense(kwargs):
    dense = nn.Conv2d(4, 6, **kwargs)
    full_rank = min(6, 4 * dense.kernel_size[0] * dense.kernel_size[1])
    low = LowRankConv2d.from_dense(dense, rank=full_rank)
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    assert low.stride == dense.stride and low.padding == dense.padding and low.dilation == dense.dilation
    assert low.down.padding_mode == dense.padding_mode and (low.up.bias is not None) == kwargs["bias"]


def test_hf_conv1d_becomes_an_equivalent_linear():
    dense = Conv1D(nf=12, nx=7)  # weight stored (in=7, out=12)
    nn.init.normal_(dense.bias)
    low = LowRankLinear.from_dense(dense, rank=7)
    assert (low.in_features, low.out_features) == (7, 12)
    x = torch.randn(4, 3, 7)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_truncation_is_the_best_rank_r_approximation(rank):
    dense = nn.Linear(16, 10, dtype=torch.float64)
    low = LowRankLinear.from_dense(dense, rank)
    assert low.up.weight.dtype == low.down.weight.dtype == torch.float64
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    approx = low.dense_weight().detach()
    torch.testing.assert_close(approx, best, atol=1e-12, rtol=1e-10)
    # Eckart-Young: the squared Frobenius error is the tail of the squared singular values.
    error = torch.linalg.matrix_norm(dense.weight.detach() - approx) ** 2
    torch.testing.assert_close(error, (s[rank:] ** 2).sum())
    # Balanced split: both factors carry sqrt(S).
    torch.testing.assert_close(low.up.weight.norm(dim=0), s[:rank].sqrt())
    torch.testing.assert_close(low.down.weight.norm(dim=1), s[:rank].sqrt())


def test_conv_truncation_is_the_best_approximation_of_the_reshaped_weight():
    dense = nn.Conv2d(3, 8, 3, bias=False, dtype=torch.float64)
    low = LowRankConv2d.from_dense(dense, 4)
    matrix = dense.weight.detach().reshape(8, -1)
    s = torch.linalg.svdvals(matrix)
    error = torch.linalg.matrix_norm(matrix - low.dense_weight().detach().reshape(8, -1)) ** 2
    torch.testing.assert_close(error, (s[4:] ** 2).sum())


def test_from_dense_rejects_bad_input():
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        LowRankLinear.from_dense(nn.Linear(4, 9), 5)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear.from_dense(nn.Linear(4, 9), 0)
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 1)
    with pytest.raises(TypeError):
        LowRankLinear.from_dense(nn.Conv2d(4, 4, 3), 1)
    with pytest.raises(TypeError, match="factorise"):
        LowRankConv2d.from_dense(nn.Linear(4, 4), 1)


@pytest.mark.parametrize(
    ("dense", "kind", "shape"),
    [
        (nn.Linear(12, 20), LowRankLinear, (20, 12, 1, 1)),
        (Conv1D(nf=12, nx=7), LowRankLinear, (12, 7, 1, 1)),
        (nn.Conv2d(4, 6, (3, 1), stride=2, padding=(1, 0), bias=False), LowRankConv2d, (6, 4, 3, 1)),
    ],
)
def test_one_constructor_for_compress_and_reload(dense, kind, shape):
    """``low_rank_layer_like`` gives the geometry ``factorise`` (compress) fills and ``apply_ranks`` loads into."""
    from smooth_hf.lowrank import factorise, low_rank_layer_like

    dense = dense.to(torch.float64)
    empty = low_rank_layer_like(dense, 3)
    filled = factorise(dense, 3)
    assert type(empty) is type(filled) is kind and isinstance(filled, LowRankLayer)
    assert empty.dense_shape == filled.dense_shape == shape and empty.rank == 3
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in filled.state_dict().items()
    }
    assert filled.up.weight.dtype == torch.float64  # the dense layer's dtype, by default
    meta = low_rank_layer_like(dense, 3, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())
    # The state dict of a factorised layer loads into the empty one and gives the same function.
    empty.load_state_dict(filled.state_dict(), strict=True)
    x = torch.randn(2, *((4, 5, 5) if kind is LowRankConv2d else (shape[1],)), dtype=torch.float64)
    assert torch.equal(empty(x), filled(x))


def test_constructor_refuses_what_cannot_be_factorised():
    from smooth_hf.lowrank import low_rank_layer_like

    with pytest.raises(TypeError, match=r"cannot factorise a BatchNorm2d.*exclude_modules"):
        low_rank_layer_like(nn.BatchNorm2d(4), 1)
    with pytest.raises(TypeError, match="cannot factorise a LowRankLinear"):  # never cut twice
        low_rank_layer_like(LowRankLinear(8, 8, 2), 1)
    with pytest.raises(ValueError, match="grouped.*exclude_modules"):
        low_rank_layer_like(nn.Conv2d(4, 4, 3, groups=2), 1)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        low_rank_layer_like(nn.Linear(4, 9), 5)


def test_low_rank_layers_and_their_factors_are_never_targets():
    from smooth_hf.lowrank.targeting import find_layers

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    compress(model, LowRankConfig(rank_ratio=0.25, target_modules=["0"]))
    assert isinstance(model[0], LowRankLayer)
    assert [name for name, _ in find_layers(model)] == ["2"]  # not "0", "0.down" or "0.up"


# ---------------------------------------------------------------- compress: budgets and rules


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9])
def test_param_reduction_hits_the_target_on_resnet14(p):
    model = resnet14()
    before = count_parameters(model)
    assert compress(model, LowRankConfig(param_reduction=p)) is model
    report = model.lowrank_report
    after = count_parameters(model)
    assert (report.params_before, report.params_after) == (before, after)
    assert after <= (1 - p) * before  # the contract: removes at least p of the parameters...
    assert after / before > 1 - p - 0.01  # ... and not much more
    assert report.reduction == pytest.approx(1 - after / before)
    ranks = model.lowrank_config.ranks
    assert ranks and ranks == {r.name: r.rank for r in report.layers if r.status == "factorised"}
    for name, rank in ranks.items():
        assert model.get_submodule(name).rank == rank
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_budget_goes_to_the_low_energy_layer_first():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_matrix(64, 64, 4))  # exactly rank 4: cutting to 4 loses nothing
    x = torch.randn(8, 64)
    hidden = model[0](x)
    compress(model, LowRankConfig(param_reduction=0.3))  # needs one layer cut to rank <= 12
    report = {r.name: r for r in model.lowrank_report.layers}
    assert report["2"].status == "dense: factorising would not remove parameters"
    assert report["0"].status == "factorised" and 4 <= report["0"].rank <= 12
    assert report["0"].energy_kept == pytest.approx(1.0)
    torch.testing.assert_close(model[0](x), hidden, atol=1e-4, rtol=1e-4)
    assert model.lowrank_report.reduction >= 0.3


def test_unreachable_reduction_raises_with_the_maximum_and_leaves_model_untouched():
    model = resnet14()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"at most [\d,]+ \(\d+\.\d% of the model\).*Lower param_reduction to at most"):
        compress(model, LowRankConfig(param_reduction=0.99))
    assert state_equal(model.state_dict(), state)
    assert not hasattr(model, "lowrank_report")
    # Excluding most layers lowers the reachable maximum.
    with pytest.raises(ValueError, match="widen target_modules"):
        compress(model, LowRankConfig(param_reduction=0.5, target_modules=r"stages\.0\..*"))


def test_energy_rule_keeps_the_smallest_rank_reaching_the_fraction():
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    s = 2.0 ** -torch.arange(32.0)  # energies 4^-i: 1 - 4^-r of the total (nearly) after r components
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(s) @ v.T)
    compress(model, LowRankConfig(energy=0.99))
    row = model.lowrank_report.layers[0]
    assert row.rank == 4  # 1 - 4^-3 = 0.984 < 0.99 <= 1 - 4^-4 = 0.996
    assert row.energy_kept == pytest.approx(1 - 4.0**-4, abs=1e-6)


def test_rank_ratio_rule_and_pays_check_on_resnet14():
    model = resnet14()
    compress(model, LowRankConfig(rank_ratio=0.25))
    for row in model.lowrank_report.layers:
        out, inp, kh, kw = row.shape
        expected = -(-row.full_rank // 4)  # ceil(0.25 * full)
        if expected * (inp * kh * kw + out) < out * inp * kh * kw:
            assert (row.rank, row.status) == (expected, "factorised")
            assert row.params_after < row.params_before
        else:
            assert (row.rank, row.status) == (None, "dense: factorising would not remove parameters")
    assert model.lowrank_config.ranks["stages.2.1.conv2"] == 32


def test_rank_multiple_rounds_up():
    model = resnet14()
    compress(model, LowRankConfig(rank_ratio=0.1, rank_multiple=8))
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["stages.2.1.conv2"].rank == 16  # ceil(12.8) = 13 -> 16
    assert rows["stages.1.0.conv1"].rank == 8  # ceil(6.4) = 7 -> 8
    assert rows["conv1"].rank is None  # 1 -> 8, capped at 9 = full: 8 * 41 >= 288 does not pay
    assert all(r.rank % 8 == 0 for r in rows.values() if r.rank is not None)


def test_layer_that_does_not_pay_stays_dense():
    model = nn.Sequential(nn.Linear(4, 100), nn.Linear(100, 100))
    with torch.no_grad():
        model[1].weight.copy_(low_rank_matrix(100, 100, 2))
    compress(model, LowRankConfig(energy=0.999))
    rows = {r.name: r for r in model.lowrank_report.layers}
    # Layer 0 needs all 4 of its singular values and 4 * (4 + 100) >= 4 * 100: factorising would add parameters.
    assert (rows["0"].rank, rows["0"].status) == (None, "dense: factorising would not remove parameters")
    assert rows["0"].params_after == rows["0"].params_before == 500
    assert type(model[0]) is nn.Linear and isinstance(model[1], LowRankLinear)
    assert model.lowrank_config.ranks == {"1": 2}


def test_excluded_layers_are_reported_dense():
    model = resnet14()
    compress(model, LowRankConfig(rank_ratio=0.25, target_modules=r"stages\.2\..*", exclude_modules=["downsample.0"]))
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["fc"].status == rows["stages.2.0.downsample.0"].status == "dense: excluded"
    assert set(model.lowrank_config.ranks) == {f"stages.2.{b}.conv{c}" for b in (0, 1) for c in (1, 2)}


# ---------------------------------------------------------------- compress: layers that stay dense, errors


def test_depthwise_conv_stays_dense_and_model_runs():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 6, 6)
    compress(model, LowRankConfig(rank_ratio=0.25))
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["0"].status == "dense: grouped conv" and type(model[0]) is nn.Conv2d
    assert rows["1"].status == "factorised" and isinstance(model[1], LowRankConv2d)
    assert model(x).shape == (2, 16, 6, 6)


def test_multihead_attention_out_proj_stays_dense():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    model = Block().eval()
    compress(model, LowRankConfig(rank_ratio=0.25))
    assert type(model.attn.out_proj) is not LowRankLinear and isinstance(model.fc, LowRankLinear)
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_gpt2_tied_lm_head_stays_dense_and_conv1d_layers_are_factorised():
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 10))
    compress(model, LowRankConfig(rank_ratio=0.25))
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["lm_head"].status == "dense: tied weight"
    assert model.lm_head.weight is model.transformer.wte.weight
    conv1d_rows = [r for r in rows.values() if r.kind == "conv1d"]
    assert len(conv1d_rows) == 8 and all(r.status == "factorised" for r in conv1d_rows)
    assert isinstance(model.transformer.h[0].attn.c_attn, LowRankLinear)
    assert model(ids).logits.shape == (2, 10, 100)
    # Tied weights are counted once.
    assert model.lowrank_report.params_after == sum(p.numel() for p in set(model.parameters()))


def test_shared_bias_or_shared_module_stays_dense():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.Linear(32, 32), nn.Linear(32, 32), shared)
    model[2].bias = model[1].bias
    compress(model, LowRankConfig(rank_ratio=0.25))
    statuses = {r.name: r.status for r in model.lowrank_report.layers}
    assert statuses == {"0": "dense: tied weight", "1": "dense: tied weight", "2": "dense: tied weight"}
    assert model[0] is model[3] and model[1].bias is model[2].bias


def test_gpt2_full_rank_factorisation_reproduces_logits():
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            replace_module(model, name, LowRankLinear.from_dense(module, min(module.weight.shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_already_compressed_model_is_refused():
    model = nn.Sequential(nn.Linear(32, 32))
    compress(model, LowRankConfig(rank_ratio=0.25))
    with pytest.raises(ValueError, match="already compressed"):
        compress(model, LowRankConfig(rank_ratio=0.25))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_weight_raises_and_leaves_model_untouched(bad):
    model = resnet14()
    with torch.no_grad():
        model.stages[2][1].conv2.weight[0, 0, 0, 0] = bad
    state = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"'stages\.2\.1\.conv2' has NaN or Inf"):
        compress(model, LowRankConfig(param_reduction=0.5))
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k].nan_to_num(), state[k].nan_to_num()) for k in state)
    assert dict(model.named_modules()) == modules
    assert not hasattr(model, "lowrank_config") and not hasattr(model, "lowrank_report")


def _untouched(model: nn.Module, modules: dict, state: dict) -> bool:
    return dict(model.named_modules()) == modules and state_equal(model.state_dict(), state) and not any(
        hasattr(model, a) for a in ("lowrank_config", "lowrank_report")
    )


def test_a_swap_that_fails_half_way_is_undone(monkeypatch):
    compress_module = importlib.import_module("smooth_hf.lowrank.compress")  # the function shadows the module name

    model = resnet14()
    modules, state = dict(model.named_modules()), copy.deepcopy(model.state_dict())
    real, calls = compress_module.replace_module, []

    def fail_on_third(model, name, new):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while moving a layer to its device")
        real(model, name, new)

    monkeypatch.setattr(compress_module, "replace_module", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        compress(model, LowRankConfig(param_reduction=0.5))
    assert len(calls) == 3 and _untouched(model, modules, state)


def test_parameter_count_check_is_a_real_error_and_undoes_the_swap(monkeypatch):
    """Not an assert (``python -O`` would skip it): a surgery that misses its plan raises and is undone."""
    compress_module = importlib.import_module("smooth_hf.lowrank.compress")  # the function shadows the module name

    model = resnet14()
    modules, state = dict(model.named_modules()), copy.deepcopy(model.state_dict())
    real_count = compress_module.count_parameters
    counts = iter([real_count(model), 1])  # the planned count, then a wrong count after the swap
    monkeypatch.setattr(compress_module, "count_parameters", lambda m: next(counts))
    with pytest.raises(RuntimeError, match="were planned.*restored.*exclude_modules"):
        compress(model, LowRankConfig(param_reduction=0.5))
    assert _untouched(model, modules, state)


# ---------------------------------------------------------------- reload and determinism


def test_apply_ranks_then_strict_load_reproduces_resnet14():
    model = resnet14()
    compress(model, LowRankConfig(param_reduction=0.7))
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    fresh = apply_ranks(resnet14(), model.lowrank_config.ranks)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), expected)
    # On the meta device too (big-model loading): structure first, then the tensors.
    with torch.device("meta"):
        meta = resnet14()
    apply_ranks(meta, model.lowrank_config.ranks)
    assert meta.stages[2][1].conv2.up.weight.is_meta
    meta.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert torch.equal(meta(x), expected)


def test_apply_ranks_then_strict_load_reproduces_bert():
    model = tiny_bert()
    compress(model, LowRankConfig(rank_ratio=0.25))
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ids = torch.randint(0, 100, (2, 7))
    expected = model(ids).logits
    fresh = apply_ranks(tiny_bert(), model.lowrank_config.ranks)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(ids).logits, expected)


def test_apply_ranks_validates_everything_before_replacing():
    ranks = {"stages.2.1.conv2": 8}
    for bad, message in [
        ({"nope.conv": 2}, "no module named 'nope.conv'"),
        ({"bn1": 2}, "BatchNorm2d, not a dense"),
        ({"fc": 11}, r"must be an integer in \[1, 10\]"),
        ({"fc": 0}, r"\[1, 10\]"),
    ]:
        model = resnet14()
        with pytest.raises(ValueError, match=message):
            apply_ranks(model, {**ranks, **bad})
        assert type(model.stages[2][1].conv2) is nn.Conv2d


def test_compression_is_deterministic():
    a = resnet14()
    b = copy.deepcopy(a)
    compress(a, LowRankConfig(param_reduction=0.7))
    compress(b, LowRankConfig(param_reduction=0.7))
    assert a.lowrank_config.ranks == b.lowrank_config.ranks
    assert state_equal(a.state_dict(), b.state_dict())


def test_report_serialises():
    model = resnet14()
    compress(model, LowRankConfig(param_reduction=0.5))
    report = model.lowrank_report
    assert isinstance(report, CompressionReport)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["reduction"] == pytest.approx(report.reduction) and len(data["layers"]) == 16
    table = report.to_markdown()
    assert table.count("\n| `") == 16 and "| `stages.2.1.conv2` | conv2d | 128x128x3x3 |" in table
    assert "fewer" in str(report)
    assert report.layer_table() in table  # one renderer: the model card uses the same table


def test_report_from_dict_inverts_to_dict():
    model = resnet14()
    compress(model, LowRankConfig(param_reduction=0.5), recalibrate_batchnorm=[torch.randn(4, 1, 16, 16)])
    report = model.lowrank_report
    again = CompressionReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.batchnorm_recalibrated and isinstance(again.layers[0].shape, tuple)
    assert again.to_dict() == report.to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(params_befor=1), "unknown keys params_befor"),
        (lambda d: d.pop("params_after"), "missing keys params_after"),
        (lambda d: d["layers"][0].update(rank_kept=3), r"layer row 'conv1'.*unknown keys rank_kept"),
        (lambda d: d.update(layers={"conv1": 1}), "must be a list"),
    ],
)
def test_report_from_dict_refuses_what_it_cannot_read(edit, message):
    data = CompressionReport(10, 5, [LayerReport("conv1", "conv2d", (4, 1, 3, 3), 4, 2, 36, 26, 0.9, "factorised")]).to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        CompressionReport.from_dict(data)


def test_report_rebuilt_from_a_compressed_model():
    """Without its report (e.g. reloaded by transformers' from_pretrained), a model's report is rebuilt with every
    layer, the dense ones too: a card must not say "13 of 13 layers factorised" of a model with 14."""
    model = resnet14()
    compress(model, LowRankConfig(param_reduction=0.4, skip_first_last=True))
    kept = model.lowrank_report
    rebuilt = CompressionReport.from_model(model)
    assert (rebuilt.params_before, rebuilt.params_after) == (kept.params_before, kept.params_after)
    assert [r.name for r in rebuilt.layers] == [r.name for r in kept.layers]
    assert 0 < len(rebuilt.factorised) == len(kept.factorised) < len(rebuilt.layers)
    for row, same in zip(rebuilt.layers, kept.layers, strict=True):
        assert (row.kind, row.shape, row.full_rank, row.rank) == (same.kind, same.shape, same.full_rank, same.rank)
        assert (row.params_before, row.params_after) == (same.params_before, same.params_after)
        if row.rank is None:
            assert row.status == STATUS_DENSE_UNRECORDED and row.energy_kept == 1.0
        else:
            assert math.isnan(row.energy_kept)  # a property of the dense weights, which are gone
    assert "| n/a |" in rebuilt.layer_table()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one rank rule, got 0"),
        ({"param_reduction": 0.5, "energy": 0.9}, "exactly one rank rule, got 2"),
        ({"param_reduction": 1.0}, r"param_reduction must be a number in \[0, 1\)"),
        ({"param_reduction": -0.1}, "param_reduction must be"),
        ({"rank_ratio": 0.0}, r"rank_ratio must be a number in \(0, 1\]"),
        ({"rank_ratio": 1.5}, "rank_ratio must be"),
        ({"energy": float("nan")}, "energy must be"),
        ({"energy": "0.9"}, "energy must be"),
        ({"energy": 0.9, "min_rank": 0}, "min_rank must be an integer >= 1"),
        ({"energy": 0.9, "rank_multiple": 0}, "rank_multiple must be"),
        ({"energy": 0.9, "rank_multiple": 2.0}, "rank_multiple must be"),
        ({"energy": 0.9, "ranks": {"fc": 2.5}}, "invalid entries"),
        ({"energy": 0.9, "ranks": {"fc": 0}}, "invalid entries"),
        ({"energy": 0.9, "target_modules": [1]}, "target_modules must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**kwargs)


def test_config_fields_have_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(LowRankConfig))


def test_config_json_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    compress(model, LowRankConfig(rank_ratio=0.25, target_modules=("0", "1"), rank_multiple=2))
    config = model.lowrank_config
    config.save_pretrained(tmp_path)
    text = (tmp_path / COMPRESSION_CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["smooth_hf_version"] and data["ranks"] == {"0": 8, "1": 8}
    assert LowRankConfig.from_pretrained(tmp_path) == config
    assert config.to_json_string() == text
    with pytest.raises(ValueError, match="Unknown LowRankConfig keys: rank_ration.*Fix or remove them"):
        LowRankConfig.from_dict({"rank_ration": 0.5})
    with pytest.raises(FileNotFoundError):
        LowRankConfig.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------- BatchNorm recalibration


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("train_mode", [False, True])
def test_recalibration_changes_statistics_not_weights_and_restores_mode(train_mode):
    model = resnet14().train(train_mode)
    model.stages[0][0].bn1.eval()  # a mixed-mode model must come back exactly as it was
    reference = copy.deepcopy(model)
    batches = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    compress(model, LowRankConfig(param_reduction=0.5), recalibrate_batchnorm=batches)
    compress(reference, LowRankConfig(param_reduction=0.5))
    assert model.lowrank_report.batchnorm_recalibrated and not reference.lowrank_report.batchnorm_recalibrated
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)
    buffers, ref_buffers = _bn_buffers(model), _bn_buffers(reference)
    assert all(not torch.equal(buffers[k], ref_buffers[k]) for k in buffers if "running_mean" in k)
    assert {n: m.training for n, m in model.named_modules()} == {n: m.training for n, m in reference.named_modules()}
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_recalibration_is_the_exact_batch_average():
    model = resnet14()
    x1, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    recalibrate_batchnorm(model, [{"pixel_values": x1, "labels": torch.zeros(4)}, (x2, None)], max_batches=1)
    with torch.no_grad():
        features = model.conv1(x1)
    torch.testing.assert_close(model.bn1.running_mean, features.mean((0, 2, 3)))
    torch.testing.assert_close(model.bn1.running_var, features.var((0, 2, 3), unbiased=True))
    assert int(model.bn1.num_batches_tracked) == 1 and not model.training


def test_recalibration_with_no_batches_restores_statistics():
    model = resnet14()
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)
    before = _bn_buffers(model)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(model, [])
    assert state_equal(_bn_buffers(model), before)


# ---------------------------------------------------------------- data-free BatchNorm recalibration


def _calibrated_resnet(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small ResNet whose BatchNorm statistics describe "real" data that is far from N(0, 1) noise."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet14_cifar", in_chans=1, num_classes=4, channels=(8, 16, 16), layers=(1, 1, 1))
    real = 2.0 + 3.0 * torch.rand(256, 1, 12, 12) * torch.linspace(0, 1, 12)  # positive, with a horizontal ramp
    recalibrate_batchnorm(model.eval(), real.split(64))
    return model, real


def _statistics_distance(model: nn.Module, x: torch.Tensor) -> float:
    """Sum over BatchNorm layers of |batch mean - running mean| + |batch std - running std| (eval mode)."""
    total = []

    def hook(module, args):
        inp = args[0]
        mean, var = inp.mean((0, 2, 3)), inp.var((0, 2, 3), unbiased=False)
        total.append(float((mean - module.running_mean).norm() + (var.sqrt() - module.running_var.sqrt()).norm()))

    handles = [m.register_forward_pre_hook(hook) for m in batchnorm_layers(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(total)


def test_synthesised_inputs_match_the_batchnorm_statistics_and_leave_the_model_alone():
    model, _ = _calibrated_resnet()
    model.stages[0].train()  # a mixed-mode model must come back exactly as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    model.fc.weight.requires_grad_(False)
    noise = torch.randn(64, 1, 12, 12)
    x = synthesize_batchnorm_inputs(model, (1, 12, 12), num_samples=64, steps=150, seed=3)
    assert x.shape == (64, 1, 12, 12) and not x.requires_grad
    model.eval()
    start, end = _statistics_distance(model, noise), _statistics_distance(model, x)
    assert end < 0.2 * start, (start, end)  # the optimisation really matched the statistics
    assert state_equal(model.state_dict(), state)
    model.stages[0].train()
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad


def test_synthesis_is_seeded():
    model, _ = _calibrated_resnet()
    a, b = (synthesize_batchnorm_inputs(model, (1, 8, 8), num_samples=8, steps=3, seed=5) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, synthesize_batchnorm_inputs(model, (1, 8, 8), num_samples=8, steps=3, seed=6))


def test_data_free_recalibration_moves_statistics_towards_the_real_data():
    model, real = _calibrated_resnet()
    stale, data_free, on_data = (copy.deepcopy(model) for _ in range(3))
    config = LowRankConfig(param_reduction=0.7)
    compress(stale, config)
    compress(data_free, config, recalibrate_batchnorm=DataFreeRecalibration(input_shape=(1, 12, 12), num_samples=64))
    compress(on_data, config, recalibrate_batchnorm=real.split(64))
    report = data_free.lowrank_report
    assert report.batchnorm_recalibrated and report.batchnorm_data_free
    assert "data-free" in str(report) and "data-free" in report.to_markdown()
    assert not on_data.lowrank_report.batchnorm_data_free and "training batches" in str(on_data.lowrank_report)
    weights = {k: v for k, v in stale.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, data_free.state_dict()[k]) for k, v in weights.items())  # no weight changed

    def gap(m):  # distance of the running statistics to those re-estimated on the real data
        ref = _bn_buffers(on_data)
        return sum(float((v - ref[k]).norm()) for k, v in _bn_buffers(m).items() if "running" in k)

    assert gap(data_free) < 0.7 * gap(stale), (gap(data_free), gap(stale))


def test_data_free_shift_is_anchored_on_the_real_statistics():
    """No edit, no change; a known edit (first conv doubled) scales the first BatchNorm's variance by exactly 4."""
    model, _ = _calibrated_resnet()
    real = _bn_buffers(model)
    repair = DataFreeRecalibration(input_shape=(1, 12, 12), num_samples=32, steps=20).prepare(model)
    repair(model)
    for key, value in _bn_buffers(model).items():
        torch.testing.assert_close(value, real[key], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    repair(model)
    torch.testing.assert_close(model.bn1.running_var, 4 * real["bn1.running_var"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(model.bn1.running_mean, real["bn1.running_mean"])


def test_data_free_string_uses_the_default_settings_and_the_models_input_shape(monkeypatch):
    from smooth_hf.lowrank import batchnorm

    calls = []

    def fake_synthesis(model, input_shape=None, **settings):  # the real one is tested above; this checks the wiring
        calls.append((batchnorm.default_input_shape(model) if input_shape is None else input_shape, settings))
        return torch.randn(8, *calls[-1][0])

    monkeypatch.setattr(batchnorm, "synthesize_batchnorm_inputs", fake_synthesis)
    model, _ = _calibrated_resnet()
    compress(model, LowRankConfig(param_reduction=0.5), recalibrate_batchnorm="data_free")
    defaults = DataFreeRecalibration()
    assert calls == [((1, 32, 32), {"num_samples": defaults.num_samples, "steps": defaults.steps, "lr": defaults.lr,
                                    "seed": defaults.seed})]
    assert model.lowrank_report.batchnorm_data_free


def test_data_free_recalibration_needs_an_input_shape_and_rejects_other_strings():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="input_shape"):
        compress(model, LowRankConfig(rank_ratio=0.25, target_modules=["3"]), recalibrate_batchnorm="data_free")
    with pytest.raises(ValueError, match="'data_free'"):
        compress(model, LowRankConfig(rank_ratio=0.25, target_modules=["3"]), recalibrate_batchnorm="yes")
    assert state_equal(model.state_dict(), state)  # untouched: both errors come before the swap
    settings = DataFreeRecalibration(input_shape=(1, 8, 8), num_samples=8, steps=2)
    compress(model, LowRankConfig(rank_ratio=0.25, target_modules=["3"]), recalibrate_batchnorm=settings)
    assert model.lowrank_report.batchnorm_data_free
    # The only cut is downstream of the only BatchNorm: its input did not change, so neither may its statistics.
    torch.testing.assert_close(model[1].running_mean, state["1.running_mean"])
    torch.testing.assert_close(model[1].running_var, state["1.running_var"])
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize_batchnorm_inputs(nn.Linear(2, 2), (2,))


def test_vit_compresses_with_default_targets_and_still_runs():
    """ViTModel.forward reads patch_embeddings.projection.weight.dtype: the low-rank layer must answer."""
    from transformers import ViTConfig, ViTForImageClassification

    from smooth_hf.lowrank import LowRankConfig, compress

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                num_labels=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(pixel_values=x).logits
    compress(model, LowRankConfig(rank_ratio=1.0, min_rank=1))
    torch.testing.assert_close(model(pixel_values=x).logits, expected, atol=1e-4, rtol=1e-4)
    compress_model = ViTForImageClassification(model.config).eval()
    compress(compress_model, LowRankConfig(rank_ratio=0.25))
    assert isinstance(compress_model.vit.embeddings.patch_embeddings.projection, LowRankLayer)
    assert compress_model(pixel_values=x).logits.shape == (2, 3)
    w = compress_model.vit.embeddings.patch_embeddings.projection.weight
    assert w.shape == (16, 1, 4, 4)


def test_hooks_on_a_replaced_layer_move_with_it_and_their_handles_still_work():
    """A forward hook or pre-hook acts on the layer's inputs and outputs, which the factorised layer shares: the
    model must compute what it did, and removing a hook by its handle must still work."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))  # rank 2: an exact cut
    handle = model[0].register_forward_hook(lambda module, args, out: out * 0.5)
    model[0].register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    x = torch.randn(3, 16)
    with torch.no_grad():
        dense = model(x)
        compress(model, LowRankConfig(energy=1.0))
        assert isinstance(model[0], LowRankLinear)
        torch.testing.assert_close(model(x), dense, rtol=1e-4, atol=1e-4)
        handle.remove()
        assert not model[0]._forward_hooks and len(model[0]._forward_pre_hooks) == 1

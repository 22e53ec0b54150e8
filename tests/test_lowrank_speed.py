"""Compression for speed: one decomposition per layer, multiply-add budgets, layers kept dense where
factorising is slower (decided with an injected timer: no test asserts on a measured time), and the
rank granularity that suits the device."""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import replace

import pytest
import timm
import torch
from torch import nn

import smooth_hf.models.resnet_cifar  # noqa: F401  (registers resnet14_cifar with timm)
from smooth_hf import count_macs
from smooth_hf.checkpoint.card import render_model_card
from smooth_hf.lowrank import CompressionReport, LowRankConfig, LowRankLayer, compress
from smooth_hf.lowrank.cost import LayerCall, trace_layers
from smooth_hf.lowrank.decomposition import decompose, factors_from
from smooth_hf.lowrank.report import STATUS_DENSE_NOT_RUN, STATUS_DENSE_SLOWER, STATUS_FACTORISED
from smooth_hf.lowrank.timing import (
    default_rank_multiple,
    drop_slower_layers,
    median_latency,
    onnxruntime_latency,
    random_input,
)

pytestmark = pytest.mark.usefixtures("one_thread")

compress_module = importlib.import_module("smooth_hf.lowrank.compress")  # the function shadows the module name
decomposition_module = importlib.import_module("smooth_hf.lowrank.decomposition")
planning_module = importlib.import_module("smooth_hf.lowrank.planning")


def resnet14() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet14_cifar", in_chans=1).eval()


IMAGES = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def best_rank_r(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


# ---------------------------------------------------------------- one decomposition per layer


@pytest.mark.parametrize("shape", [(10, 27), (27, 10), (12, 12)])
@pytest.mark.parametrize("keep_basis", [True, False])
def test_factors_are_the_best_rank_r_approximation_in_both_orientations(shape, keep_basis):
    matrix = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    decomposition = decompose(matrix, keep_basis=keep_basis)
    s = torch.linalg.svdvals(matrix)
    for rank in (1, 4, min(shape)):
        up, down = factors_from(matrix, decomposition, rank)
        assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
        torch.testing.assert_close(up @ down, best_rank_r(matrix, rank), atol=1e-10, rtol=1e-10)
        # Balanced: both factors carry sqrt(s).
        torch.testing.assert_close(up.norm(dim=0), s[:rank].sqrt())
        torch.testing.assert_close(down.norm(dim=1), s[:rank].sqrt())


def test_spectrum_energies_are_exact_on_an_ill_conditioned_matrix():
    """Squaring loses singular values below sqrt(eps) s_max, but never their energies, which the allocation uses."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(360, 40, dtype=torch.float64, generator=g))
    s = 10 ** -torch.linspace(0, 12, 40, dtype=torch.float64)
    matrix = (u * s) @ v.t()
    found = decompose(matrix).singular_values
    assert torch.all(found[:-1] >= found[1:])  # descending
    assert (found**2 - s**2).abs().max() < 1e-14
    assert ((found - s).abs() / s)[s > 1e-6].max() < 1e-3
    # The truncation error is the tail wherever the tail is above the resolution.
    for rank in (1, 10, 20):
        up, down = factors_from(matrix, decompose(matrix), rank)
        error = torch.linalg.matrix_norm(matrix - up @ down)
        assert error == pytest.approx(float((s[rank:] ** 2).sum().sqrt()), rel=1e-6)


def test_rank_above_the_true_rank_gives_zero_factors_not_nan():
    matrix = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 9, dtype=torch.float64)
    up, down = factors_from(matrix, decompose(matrix), 5)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    torch.testing.assert_close(up @ down, matrix, atol=1e-12, rtol=0)
    zero = torch.zeros(4, 7)
    up, down = factors_from(zero, decompose(zero), 2)
    assert not up.any() and not down.any()


def _count_eigh(monkeypatch) -> list[int]:
    calls, real = [], torch.linalg.eigh

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def no_svd(*args, **kwargs):
        raise AssertionError("compress ran an SVD: one eigen-decomposition per layer is all it needs")

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", no_svd)
    return calls


def test_compress_decomposes_each_layer_once(monkeypatch):
    model = resnet14()
    calls = _count_eigh(monkeypatch)
    compress(model, LowRankConfig(param_reduction=0.5))
    report = model.lowrank_report
    candidates = [r for r in report.layers if not r.status.startswith("dense: excluded")]
    assert len(report.factorised) >= 2 and len(calls) == len(candidates)


def test_without_the_basis_cache_the_factors_are_recomputed_and_identical(monkeypatch):
    cached = compress(resnet14(), LowRankConfig(param_reduction=0.5))
    monkeypatch.setattr(decomposition_module, "BASIS_CACHE_BYTES", 0)
    calls = _count_eigh(monkeypatch)
    recomputed = compress(resnet14(), LowRankConfig(param_reduction=0.5))
    assert len(calls) == len(recomputed.lowrank_report.layers) + len(recomputed.lowrank_report.factorised)
    a, b = cached.state_dict(), recomputed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- multiply-adds


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        x = self.depthwise(self.conv(x))  # (B, 8, 8, 8)
        return self.head(x.flatten(2).transpose(1, 2))  # a linear layer over 64 positions per image


def test_count_macs_by_hand():
    model = ConvThenLinear()
    x = torch.randn(2, 3, 16, 16)
    positions = 2 * 8 * 8
    expected = {"conv": 8 * 3 * 9 * positions, "depthwise": 8 * 1 * 9 * positions, "head": 4 * 8 * positions, "unused": 0}
    calls = trace_layers(model, x)
    assert {name: call.macs for name, call in calls.items()} == expected
    assert calls["conv"].input_shape == (2, 3, 16, 16) and calls["head"].input_shape == (2, 64, 8)
    assert calls["unused"].input_shape is None
    assert count_macs(model, x) == sum(expected.values())
    # Keyword and positional inputs reach the model the same way.
    assert count_macs(model, (x,)) == count_macs(model, [x]) == sum(expected.values())


def test_tracing_leaves_the_model_as_it_was():
    model = resnet14().train()
    state = copy.deepcopy(model.state_dict())
    count_macs(model, IMAGES)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics unchanged
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("reduction", [0.3, 0.6])
def test_compute_budget_is_met_and_recorded(reduction):
    model = resnet14()
    dense_macs = count_macs(model, IMAGES)
    compress(model, LowRankConfig(macs_reduction=reduction), example_inputs=IMAGES)
    report = model.lowrank_report
    assert report.macs_before == dense_macs and report.macs_inputs == "(2, 1, 16, 16)"
    assert report.macs_after == count_macs(model, IMAGES)  # the arithmetic of the plan is what runs
    assert reduction <= report.macs_reduction < reduction + 0.05
    assert "Multiply-adds" in report.to_markdown() and "fewer multiply-adds" in str(report)
    assert CompressionReport.from_dict(report.to_dict()) == report
    assert model.lowrank_config.macs_reduction == reduction and model.lowrank_config.ranks
    assert "global compute budget" in str(render_model_card(model))


def test_any_rule_records_multiply_adds_when_example_inputs_are_given():
    model = compress(resnet14(), LowRankConfig(rank_ratio=0.5), example_inputs=IMAGES)
    assert model.lowrank_report.macs_after == count_macs(model, IMAGES) < model.lowrank_report.macs_before
    assert compress(resnet14(), LowRankConfig(rank_ratio=0.5)).lowrank_report.macs_reduction is None


class TwoResolutions(nn.Module):
    """Two convs with the same weights, the second at a quarter of the resolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.high = nn.Conv2d(16, 16, 3, padding=1)
        self.low = nn.Conv2d(16, 16, 3, padding=1)
        with torch.no_grad():
            self.low.weight.copy_(self.high.weight)

    def forward(self, x):
        return self.low(nn.functional.avg_pool2d(self.high(x), 4))


def test_compute_budget_cuts_high_resolution_layers_first():
    x = torch.randn(1, 16, 16, 16)
    by_params = compress(TwoResolutions(), LowRankConfig(param_reduction=0.3)).lowrank_config.ranks
    assert abs(by_params["high"] - by_params["low"]) <= 1  # same spectrum, same parameters per rank
    by_macs = compress(TwoResolutions(), LowRankConfig(macs_reduction=0.3), example_inputs=x).lowrank_report
    rows = {r.name: r for r in by_macs.layers}
    assert rows["high"].status == STATUS_FACTORISED and rows["high"].rank < by_params["high"]
    assert rows["low"].rank is None or rows["low"].rank > rows["high"].rank


def test_layer_not_run_on_the_inputs_stays_dense_under_a_compute_budget():
    model = compress(ConvThenLinear(), LowRankConfig(macs_reduction=0.2), example_inputs=torch.randn(2, 3, 16, 16))
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["unused"].status == STATUS_DENSE_NOT_RUN and rows["conv"].status == STATUS_FACTORISED


# ---------------------------------------------------------------- keep slower layers dense


class FakeDevice:
    """A device where a factorised layer costs twice as much per weight as a dense one (two kernels, thin
    intermediate): deterministic "timings" in which factorising pays only well below the break-even rank."""

    def __init__(self):
        self.inputs: dict[int, tuple[int, ...]] = {}  # id(module) -> input shape it was timed on

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        self.inputs[id(module)] = tuple(x.shape)
        weights = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
        return 2.0 * weights if isinstance(module, LowRankLayer) else float(weights)

    @staticmethod
    def faster(row) -> bool:
        out, inp, kh, kw = row.shape
        return 2 * row.rank * (inp * kh * kw + out) < out * inp * kh * kw


def test_keep_slower_dense_with_whitened_cuts_builds_a_layer_at_several_ranks():
    """Re-allocating after a layer is kept dense changes the other layers' ranks, so a layer's whitened factors are
    built at more than one rank; each must come from the same decomposition."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    calibration = [torch.randn(16, 64) for _ in range(2)]
    slower: list[nn.Module] = []  # the first factorised layer timed

    def first_factorised_is_slower(module: nn.Module, x: torch.Tensor) -> float:
        if not isinstance(module, LowRankLayer):
            return 1.0
        if not slower:
            slower.append(module)
        return 2.0 if module is slower[0] else 0.5

    config = LowRankConfig(param_reduction=0.3, keep_slower_dense=True, method="whitened")
    plain = compress(copy.deepcopy(model), replace(config, keep_slower_dense=False), calibration_data=calibration)
    compress(model, config, example_inputs=torch.randn(8, 64), layer_timer=first_factorised_is_slower,
             calibration_data=calibration)
    report = model.lowrank_report
    assert len(report.kept_dense_for_speed) == 1 and report.reduction >= 0.3
    kept = {r.name: r.rank for r in report.factorised}
    assert kept != {r.name: r.rank for r in plain.lowrank_report.factorised if r.name in kept}  # re-built, other ranks


def test_keep_slower_dense_keeps_them_dense_and_still_meets_the_budget():
    plain = compress(resnet14(), LowRankConfig(param_reduction=0.5)).lowrank_report
    assert not all(FakeDevice.faster(r) for r in plain.factorised)  # some factorised layers are slower there

    device, model = FakeDevice(), resnet14()
    input_shapes = {name: call.input_shape for name, call in trace_layers(model, IMAGES).items()}
    modules = {name: model.get_submodule(name) for name in input_shapes}
    compress(model, LowRankConfig(param_reduction=0.5, keep_slower_dense=True), example_inputs=IMAGES, layer_timer=device)
    report = model.lowrank_report
    assert report.reduction >= 0.5  # re-balanced over the other layers
    assert report.factorised and all(FakeDevice.faster(r) for r in report.factorised)
    slower = report.kept_dense_for_speed
    assert slower and all(r.status == STATUS_DENSE_SLOWER for r in slower)
    assert "Kept dense because factorising was not faster" in report.to_markdown() and "kept dense for speed" in str(report)
    # Every layer was timed on the input shape it gets in the model, dense and factorised.
    for row in report.factorised:
        assert device.inputs[id(modules[row.name])] == input_shapes[row.name]
        assert device.inputs[id(model.get_submodule(row.name))] == input_shapes[row.name]


def test_keep_slower_dense_with_a_per_layer_rule():
    report = compress(
        resnet14(), LowRankConfig(rank_ratio=0.5, keep_slower_dense=True), example_inputs=IMAGES, layer_timer=FakeDevice()
    ).lowrank_report
    assert report.kept_dense_for_speed and all(FakeDevice.faster(r) for r in report.factorised)


def test_budget_out_of_reach_without_the_slower_layers_names_them_and_leaves_the_model_alone():
    model = resnet14()
    state = copy.deepcopy(model.state_dict())

    def factorised_is_always_slower(module, x):
        return 2.0 if isinstance(module, LowRankLayer) else 1.0

    config = LowRankConfig(param_reduction=0.5, keep_slower_dense=True)
    with pytest.raises(ValueError, match=r"at most.*after keeping \d+ layer\(s\) dense.*stages\.2\.1\.conv2.*keep_slower_dense=False"):
        compress(model, config, example_inputs=IMAGES, layer_timer=factorised_is_always_slower)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "lowrank_report") and not any(isinstance(m, LowRankLayer) for m in model.modules())


def test_drop_slower_layers_reallocates_until_no_layer_is_slower():
    """Three layers; keeping one dense pushes the others' ranks down, which can make them faster or slower."""
    layers = {name: nn.Linear(4, 4) for name in "abc"}
    calls = {name: LayerCall(positions=3, macs=48, input_shape=(3, 4), input_dtype=torch.float32) for name in layers}
    allocations = {
        frozenset(): {"a": 3, "b": 3, "c": 3},
        frozenset("a"): {"a": None, "b": 2, "c": 2},
        frozenset("ab"): {"a": None, "b": None, "c": 1},
    }
    slow_at = {("a", 3), ("b", 2)}  # a is slow at rank 3; b only at rank 2; c never
    asked = []

    def timer(module, x):
        assert x.shape == (3, 4)
        name, rank = module.name_and_rank
        asked.append((name, rank))
        return 1.0 if rank is None else (2.0 if (name, rank) in slow_at else 0.5)

    def build(name, rank):
        low = nn.Identity()
        low.name_and_rank = (name, rank)
        return low

    for name, layer in layers.items():
        layer.name_and_rank = (name, None)
    ranks, slower = drop_slower_layers(allocations.__getitem__, layers, build, calls, timer)
    assert ranks == {"a": None, "b": None, "c": 1}
    assert slower == {"a": (1.0, 2.0), "b": (1.0, 2.0)}
    assert len(asked) == len(set(asked))  # each (layer, rank) timed once


def test_median_latency_times_a_real_layer_and_random_inputs_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    x = random_input((4, 8), torch.float32, "cpu")
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(x, random_input((4, 8), torch.float32, "cpu"))
    seconds = median_latency(nn.Linear(8, 8), x, max_seconds=0.05)
    assert math.isfinite(seconds) and seconds > 0


def test_onnxruntime_latency_times_layers_as_onnx_runtime_runs_them():
    seconds = onnxruntime_latency(nn.Linear(8, 8), torch.randn(4, 8), max_seconds=0.05)
    assert math.isfinite(seconds) and seconds > 0
    model = compress(ConvThenLinear(), LowRankConfig(rank_ratio=0.5, keep_slower_dense=True),
                     example_inputs=torch.randn(2, 3, 16, 16), layer_timer=onnxruntime_latency)
    rows = {r.name: r for r in model.lowrank_report.layers}
    assert rows["conv"].status in (STATUS_FACTORISED, STATUS_DENSE_SLOWER)  # timed, whichever way it went


# ---------------------------------------------------------------- rank granularity


def test_rank_multiple_defaults_to_what_suits_the_device(monkeypatch):
    assert default_rank_multiple("cpu") == 1 and default_rank_multiple(torch.device("cuda", 0)) == 8
    assert LowRankConfig(rank_ratio=0.3).rank_multiple is None
    on_cpu = compress(resnet14(), LowRankConfig(rank_ratio=0.3))
    assert on_cpu.lowrank_config.rank_multiple == 1  # recorded: the saved config says what was used
    assert any(rank % 8 for rank in on_cpu.lowrank_config.ranks.values())
    monkeypatch.setattr(planning_module, "model_device", lambda model: torch.device("cuda"))
    on_gpu = compress(resnet14(), LowRankConfig(rank_ratio=0.3))
    assert on_gpu.lowrank_config.rank_multiple == 8
    assert all(r.rank % 8 == 0 or r.rank == r.full_rank for r in on_gpu.lowrank_report.factorised)
    explicit = compress(resnet14(), LowRankConfig(rank_ratio=0.3, rank_multiple=1))
    assert explicit.lowrank_config.ranks == on_cpu.lowrank_config.ranks

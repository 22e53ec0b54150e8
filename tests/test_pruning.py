"""Pruning baselines (benchmarks/_pruning.py) on tiny models: exact counts, order, whole rows, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import load_benchmark
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from smooth_hf.lowrank import count_parameters

_pruning = load_benchmark("_pruning")
filter_prune, magnitude_prune, sparsity = _pruning.filter_prune, _pruning.magnitude_prune, _pruning.sparsity


class Net(nn.Module):
    """Conv (no bias) -> Linear (bias) -> Linear head, with a BatchNorm whose parameters are never pruned."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)  # 72 weights, filters of 18
        self.bn = nn.BatchNorm2d(4)  # 8 parameters
        self.fc = nn.Linear(4, 6)  # 24 + 6
        self.head = nn.Linear(6, 3)  # 18 + 3

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def net(values: str = "distinct") -> Net:
    model = Net()
    with torch.no_grad():
        model.bn.bias.fill_(0.1)  # so that every zero in the model is one pruning made
    if values == "distinct":  # every |w| different, in a shuffled order, so "smallest first" is unambiguous
        with torch.no_grad():
            weights = [model.conv.weight, model.fc.weight, model.head.weight]
            n = sum(w.numel() for w in weights)
            magnitudes = (torch.randperm(n, generator=torch.Generator().manual_seed(0)).double() + 1) / n
            signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
            start = 0
            for w in weights:
                w.copy_((magnitudes[start : start + w.numel()] * signs[start : start + w.numel()]).view_as(w))
                start += w.numel()
    return model


def zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


TOTAL = 72 + 8 + 30 + 21  # 131


def test_net_counts():
    assert count_parameters(net()) == TOTAL


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.7, 0.85])
def test_magnitude_exact_count_of_zeros(fraction):
    model = net()
    report = magnitude_prune(model, fraction)
    needed = math.ceil(fraction * TOTAL - 1e-9)
    assert report["params_total"] == TOTAL
    assert report["params_removed"] == needed == zeros(model)
    assert report["reduction"] == pytest.approx(needed / TOTAL)
    assert report["zero_fraction"] == pytest.approx(sparsity(model))
    assert sum(r["removed"] for r in report["layers"]) == needed
    assert model.fc.bias.ne(0).all() and model.bn.weight.ne(0).all()  # only weights of targeted layers


def test_magnitude_smallest_weights_go_first():
    model = net()
    before = torch.cat([m.weight.detach().abs().flatten() for m in (model.conv, model.fc, model.head)])
    magnitude_prune(model, 0.4)
    after = torch.cat([m.weight.detach().flatten() for m in (model.conv, model.fc, model.head)])
    pruned = after == 0
    assert pruned.sum() == math.ceil(0.4 * TOTAL)
    assert before[pruned].max() < before[~pruned].min()  # a global threshold across layers


def test_magnitude_ties_exact_and_deterministic():
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert magnitude_prune(a, 0.3)["params_removed"] == zeros(a) == math.ceil(0.3 * TOTAL)
    magnitude_prune(b, 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    n = math.ceil(0.3 * TOTAL)  # 40 < 72 conv weights; ties go in layer order, then position
    assert a.conv.weight.flatten()[:n].eq(0).all() and a.conv.weight.flatten()[n:].ne(0).all()
    assert a.fc.weight.ne(0).all() and a.head.weight.ne(0).all()


def test_magnitude_respects_targets_and_skip_first_last():
    model = net()
    report = magnitude_prune(model, 0.1, target_modules=["fc"])
    assert [r["name"] for r in report["layers"]] == ["fc"]
    assert model.conv.weight.ne(0).all() and model.head.weight.ne(0).all()
    assert int(model.fc.weight.eq(0).sum()) == math.ceil(0.1 * TOTAL)
    model = net()
    assert [r["name"] for r in magnitude_prune(model, 0.1, skip_first_last=True)["layers"]] == ["fc"]


def test_magnitude_hf_conv1d_prunes_the_stored_weight():
    layer = Conv1D(5, 3)  # stored (in=3, out=5)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 16, dtype=torch.float32).view(3, 5))
    model = nn.Sequential(layer)
    report = magnitude_prune(model, 0.5)
    needed = math.ceil(0.5 * 20)
    assert report["params_removed"] == needed == int(layer.weight.eq(0).sum())
    assert report["layers"][0]["shape"] == [5, 3]  # (out, in) layout
    assert layer.weight.flatten()[:needed].eq(0).all() and layer.weight.flatten()[needed:].ne(0).all()


def test_tied_weights_are_left_alone():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    wte = model.transformer.wte.weight.detach().clone()
    total, zeros_before = count_parameters(model), zeros(model)  # GPT-2 starts with zero biases
    report = magnitude_prune(model, 0.2)
    assert "lm_head" not in [r["name"] for r in report["layers"]]
    assert torch.equal(model.transformer.wte.weight, wte)
    assert report["params_removed"] == math.ceil(0.2 * total) == zeros(model) - zeros_before


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7])
def test_filter_prune_zeroes_whole_rows_and_reaches_budget(scope, fraction):
    model = net()
    report = filter_prune(model, fraction, scope=scope)
    needed = math.ceil(fraction * TOTAL - 1e-9)
    assert report["params_removed"] >= needed
    assert report["params_removed"] == zeros(model)
    for name, size, bias in (("conv", 18, 0), ("fc", 4, 1), ("head", 6, 1)):
        layer = getattr(model, name)
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        dead = rows.eq(0).all(1)
        assert (rows.eq(0).any(1) == dead).all()  # a row is either untouched or entirely zero
        if bias:
            assert torch.equal(layer.bias.eq(0), dead)  # the bias of a removed filter goes too
        assert not dead.all()  # min_filters=1
        row = next(r for r in report["layers"] if r["name"] == name)
        assert row["filters_removed"] == int(dead.sum()) and row["removed"] == int(dead.sum()) * (size + bias)


def test_filter_prune_global_is_minimal_and_ranks_by_normalised_l1():
    model = net()
    norms = {}
    for name in ("conv", "fc", "head"):
        w = getattr(model, name).weight.detach()
        norms[name] = w.reshape(w.shape[0], -1).abs().mean(1)
    report = filter_prune(model, 0.2, scope="global")
    removed_scores, kept_scores = [], []
    for name in norms:
        dead = getattr(model, name).weight.detach().reshape(norms[name].numel(), -1).eq(0).all(1)
        removed_scores += norms[name][dead].tolist()
        # The one filter min_filters keeps per layer is out of the ranking.
        kept_scores += [s for s, d in zip(norms[name].tolist(), dead.tolist(), strict=True) if not d and s != norms[name].max()]
    assert max(removed_scores) < min(kept_scores)
    # Minimal: without the last filter taken the budget would not be reached.
    sizes = {"conv": 18, "fc": 5, "head": 7}
    last = max((norms[n][getattr(model, n).weight.detach().reshape(norms[n].numel(), -1).eq(0).all(1)].max(), n)
               for n in norms if any(r["name"] == n and r["filters_removed"] for r in report["layers"]))
    assert report["params_removed"] - sizes[last[1]] < math.ceil(0.2 * TOTAL)


def test_filter_prune_layer_scope_is_uniform_and_smallest_l1_first():
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.arange(1, layer.weight.shape[0] + 1).float().flip(0)[:, None].expand_as(layer.weight))
    report = filter_prune(model, 0.25, scope="layer")  # 144 params, >= 36 to remove: a quarter of each layer's rows
    assert [r["filters_removed"] for r in report["layers"]] == [2, 2]
    assert report["params_removed"] == 2 * 10 + 2 * 8
    for layer in model:
        dead = layer.weight.eq(0).all(1)
        assert dead.tolist() == [False] * 6 + [True] * 2  # the rows with the smallest norms (the last ones)


def test_filter_prune_hf_conv1d_zeroes_output_columns():
    layer = Conv1D(4, 3)  # stored (in=3, out=4): a filter is a column of the stored weight
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 5.0, 2.0, 9.0]]).expand(3, 4))
        layer.bias.fill_(1.0)
    report = filter_prune(nn.Sequential(layer), 0.2)  # 16 params, >= 4: one filter of 3 + its bias
    assert report["params_removed"] == 4
    assert layer.weight[:, 0].eq(0).all() and layer.weight[:, 1:].ne(0).all() and layer.bias[0] == 0


@pytest.mark.parametrize("prune", [magnitude_prune, filter_prune])
def test_unreachable_budget_raises_and_leaves_model_untouched(prune):
    model = net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="at most"):
        prune(model, 0.95)  # 8 BN + 9 biases cannot be removed
    with pytest.raises(ValueError, match="at most"):
        prune(model, 0.5, target_modules=["head"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
@pytest.mark.parametrize("prune", [magnitude_prune, filter_prune])
def test_bad_fraction_raises(prune, fraction):
    with pytest.raises(ValueError, match="fraction"):
        prune(net(), fraction)


def test_filter_prune_bad_arguments_and_nan():
    with pytest.raises(ValueError, match="scope"):
        filter_prune(net(), 0.3, scope="per_layer")
    with pytest.raises(ValueError, match="min_filters"):
        filter_prune(net(), 0.3, min_filters=-1)
    model = net()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    for prune in (magnitude_prune, filter_prune):
        with pytest.raises(ValueError, match="NaN"):
            prune(model, 0.3)
    with pytest.raises(ValueError, match="matches no module"):
        magnitude_prune(net(), 0.3, target_modules=["nope"])


def test_pruning_changes_outputs_only_through_zeros():
    model = net("random").eval()
    x = torch.randn(2, 2, 5, 5)
    dense = model(x)
    assert torch.equal(model(x), dense)
    magnitude_prune(model, 0.0)
    assert torch.equal(model(x), dense)  # fraction 0 is a no-op

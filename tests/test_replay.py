"""Prefix replay: the sensitivity measurement skips the blocks a truncated layer cannot affect, and measures the same."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_bert, tiny_resnet14
from torch import nn

from smooth_hf.core.batches import feed_batch
from smooth_hf.lowrank.replay import PrefixReplay, no_cache
from smooth_hf.lowrank.sensitivity import _primary_output, measure_sensitivity, output_deviation

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def _scaled(layers: dict[str, nn.Module]):
    """A stand-in for truncation: the layer's weight scaled by rank / 10 (any change will do here)."""

    def truncated(name: str, rank: int) -> nn.Module:
        module = copy.deepcopy(layers[name])
        module.weight.data.mul_(rank / 10)
        return module

    return truncated


def _brute_force(model, layers, truncated, ranks, batches):
    """The curves with every forward pass run in full: swap, run, compare."""
    model.eval()
    with torch.no_grad():
        references = [_primary_output(feed_batch(model, b, torch.device("cpu")))[0] for b in batches]
        curves = {}
        for name, module in layers.items():
            curves[name] = []
            for rank in ranks[name]:
                model.set_submodule(name, truncated(name, rank))
                moved = total = 0.0
                for batch, reference in zip(batches, references, strict=True):
                    output, key = _primary_output(feed_batch(model, batch, torch.device("cpu")))
                    d, e = output_deviation(reference, output, batch, key)
                    moved, total = moved + d, total + e
                curves[name].append((rank, moved / total))
            model.set_submodule(name, module)
    return curves


def _bert_case():
    model = tiny_bert().eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    batches = [{"input_ids": torch.randint(0, 50, (3, 7), generator=g), "attention_mask": mask, "labels": torch.zeros(3)}
               for _ in range(2)]
    return model, batches


def _resnet_case():
    model = tiny_resnet14()
    return model, [torch.randn(2, 1, 12, 12), torch.randn(3, 1, 12, 12)]


def _timm_resnet_case():  # timm's blocks apply ReLU(inplace=True) to recorded outputs: the records must survive it
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", in_chans=1, num_classes=3).eval()
    return model, [torch.randn(2, 1, 32, 32), torch.randn(1, 1, 32, 32)]


@pytest.mark.parametrize("case", [_bert_case, _resnet_case, _timm_resnet_case], ids=["bert", "resnet14_cifar", "timm"])
def test_replayed_measurement_equals_running_everything(case):
    model, batches = case()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ranks = {n: [2, 5] for n in layers}
    truncated = _scaled(layers)
    before = copy.deepcopy(model.state_dict())
    measured = measure_sensitivity(model, layers, truncated, ranks, batches)
    expected = _brute_force(model, layers, truncated, ranks, batches)
    assert measured.keys() == expected.keys()
    for name in layers:
        for (r, got), (_, want) in zip(measured[name], expected[name], strict=True):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (name, r)
    assert any(loss > 0 for curve in measured.values() for _, loss in curve)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())  # every replay uninstalled


def test_blocks_before_the_changed_layer_do_not_run():
    model, batches = _bert_case()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    replay = PrefixReplay(model, layers)
    with torch.no_grad():
        replay.record(batches, lambda b: feed_batch(model, b, torch.device("cpu")))
    late = replay.for_layer("bert.encoder.layer.1.intermediate.dense")
    assert {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1.attention"} <= set(late)
    assert "bert.encoder.layer.1" not in late  # its ancestor: it contains the changed layer
    assert not any(n.startswith("bert.encoder.layer.1.output") for n in late)  # runs after the changed layer
    assert replay.for_layer("bert.embeddings.word_embeddings") == ()  # never a target here: no record of its start
    assert "bert.encoder.layer.0" not in replay.for_layer("bert.encoder.layer.0.attention.self.query")

    calls = {"first": 0, "last": 0}
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    model.bert.encoder.layer[1].output.dense.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))
    with replay.installed(late), torch.no_grad():
        for index, batch in enumerate(batches):
            replay.batch = index
            feed_batch(model, batch, torch.device("cpu"))
    assert calls == {"first": 0, "last": len(batches)}


class _Shared(nn.Module):
    """A block called twice (weight sharing) and one that returns a dict: neither may be replayed."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.named = _DictBlock()
        self.head = nn.Sequential(nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.named(self.block(self.block(x)))["y"])


class _DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return {"y": self.lin(x)}


def test_blocks_called_twice_or_returning_other_forms_run_in_full():
    model = _Shared().eval()
    batches = [torch.randn(5, 4)]
    layers = {"head.0": model.head[0]}
    replay = PrefixReplay(model, layers)
    with torch.no_grad():
        replay.record(batches, model)
    assert replay.for_layer("head.0") == ()
    truncated = _scaled(layers)
    measured = measure_sensitivity(model, layers, truncated, {"head.0": [3]}, batches)
    expected = _brute_force(model, layers, truncated, {"head.0": [3]}, batches)
    assert measured["head.0"][0][1] == pytest.approx(expected["head.0"][0][1], rel=1e-9) and expected["head.0"][0][1] > 0


def test_a_replay_that_does_not_reproduce_the_dense_output_is_dropped():
    model, batches = _resnet_case()
    target = {"stages.2.0.conv1": model.stages[2][0].conv1}
    replay = PrefixReplay(model, target)
    with torch.no_grad():
        replay.record(batches, model)
    names = replay.for_layer("stages.2.0.conv1")
    assert {"stages.0", "stages.1", "stages.2.0.downsample"} <= set(names)  # the shortcut runs first in this block
    assert replay.verified(names, lambda: 0.0) == names
    fresh = PrefixReplay(model, target)
    with torch.no_grad():
        fresh.record(batches, model)
    assert fresh.verified(names, lambda: 1e-3) == ()


def test_the_key_value_cache_is_off_while_measuring_and_restored():
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(use_cache=True)
    with pytest.raises(RuntimeError), no_cache(model):
        assert model.config.use_cache is False
        raise RuntimeError
    assert model.config.use_cache is True

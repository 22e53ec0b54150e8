"""rank_allocation="sensitivity": per-layer loss curves measured on the model's output, allocated globally."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import logits, tiny_bert, tiny_resnet14
from torch import nn

import smooth_hf
from smooth_hf.core.files import COMPRESSION_CONFIG_NAME
from smooth_hf.lowrank import LowRankConfig, calibrate, compress
from smooth_hf.lowrank.allocation import allocate_ranks
from smooth_hf.lowrank.sensitivity import marginal_losses, measure_sensitivity, output_deviation, probe_ranks
from smooth_hf.lowrank.whitening import collect_input_grams

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

SENSITIVE = {"method": "whitened", "rank_allocation": "sensitivity"}


# ---------------------------------------------------------------------------------------------- the math


def test_marginal_losses_follow_the_convex_hull_of_the_measured_curve():
    measured = [(1, 1.0), (4, 0.4), (6, 0.5), (8, 0.1)]  # (6, 0.5) is noise: above the curve, it must be ignored
    e = marginal_losses(measured, full_rank=10)
    assert e.shape == (10,) and (e >= 0).all()
    assert (np.diff(e[1:]) <= 1e-12).all()  # convex: every component is worth less than the one before it
    np.testing.assert_allclose(e[1:].sum(), 1.0)  # from rank 1 down from the full rank, the whole loss at rank 1
    np.testing.assert_allclose(e[1:4].sum(), 1.0 - 0.4)  # rank 4 -> 1 costs exactly the measured difference
    np.testing.assert_allclose(e[8:].sum(), 0.1)  # the last two components: rank 8's measured loss
    assert e[0] == e[1:].max()


def test_marginal_losses_below_the_first_measurement_continue_its_slope():
    e = marginal_losses([(3, 0.6), (6, 0.3)], full_rank=9)
    np.testing.assert_allclose(e[1:3], [0.1, 0.1])  # not free to drop: the first segment's slope goes on


def test_marginal_losses_follow_the_spectrum_between_measurements():
    """A layer trained to rank 4 (a zero whitened tail): dropping what lies beyond rank 4 costs nothing, although
    the nearest measurement above it is at rank 6; each segment's measured loss goes to its components by s^2."""
    e = marginal_losses([(1, 0.9), (3, 0.3), (6, 0.0)], full_rank=8, spectrum=[4.0, 3.0, 2.0, 1.0, 0, 0, 0, 0])
    np.testing.assert_allclose(e[1:], [0.6 * 9 / 13, 0.6 * 4 / 13, 0.3, 0, 0, 0, 0])
    linear = marginal_losses([(1, 0.9), (3, 0.3), (6, 0.0)], full_rank=8)
    assert linear[4] > 0  # without the spectrum, rank 5 and 6 would look costly to drop


def test_probe_ranks_stay_where_factorising_pays():
    ranks = probe_ranks(full_rank=64, cost_per_rank=64 + 64, dense_params=64 * 64)
    assert ranks[0] == 1 and all(r * 128 < 64 * 64 for r in ranks) and ranks == sorted(set(ranks))
    assert len(ranks) >= 5
    assert probe_ranks(full_rank=2, cost_per_rank=10, dense_params=10) == []  # no rank removes parameters


def test_absolute_scores_give_the_budget_to_the_less_costly_losses():
    s = np.linspace(2.0, 0.1, 16)
    cost, dense = [32, 32], [256, 256]
    assert allocate_ranks([s, 10 * s], cost, dense, 200) == allocate_ranks([s, s], cost, dense, 200)  # relative
    small, large = allocate_ranks([s, 10 * s], cost, dense, 200, relative=False)
    assert (small, large) == (1, None)  # all of the cut from the layer whose losses are ten times smaller


def test_output_deviation_ignores_padding_positions():
    reference = torch.randn(2, 5, 3)
    output = reference + 0.1
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    moved, energy = output_deviation(reference, output, batch)
    scrambled = output.clone()
    scrambled[0, 3:] = 100.0  # padding positions: nothing reads them
    assert output_deviation(reference, scrambled, batch) == (moved, energy)
    np.testing.assert_allclose(moved, 8 * 3 * 0.01)
    np.testing.assert_allclose(energy, float((reference[batch["attention_mask"].bool()] ** 2).sum()))
    # A classifier's (batch, labels) logits have no token axis, even with as many labels as tokens.
    logits, moved_logits = torch.zeros(2, 5), torch.zeros(2, 5)
    moved_logits[0, 3:] = 10.0
    assert output_deviation(logits, moved_logits, batch) == (200.0, 0.0)
    assert output_deviation(logits, moved_logits, batch, key="logits") == (200.0, 0.0)
    # A question-answering model's start_logits are per token: their padding positions are left out.
    assert output_deviation(logits, moved_logits, batch, key="start_logits") == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------- on models


class Weighted(nn.Module):
    """Two layers with the same weights and the same input statistics; the output reads ``a`` ten times more
    strongly than ``b``, and ``unused`` (like BERT's pooler for mean-pooled embeddings) not at all."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.load_state_dict(self.a.state_dict())
        self.unused.load_state_dict(self.a.state_dict())
        self.seen = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = self.unused(x[:, 16:])  # computed, never returned
        return 10 * self.a(x[:, :16]) + self.b(x[:, 16:])


def _inputs(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def test_the_budget_goes_where_the_output_is_sensitive():
    model, x = Weighted(), _inputs()
    spectrum = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3, method="whitened"),
                        calibration_data=[x]).lowrank_config.ranks
    assert max(spectrum.values()) - min(spectrum.values()) <= 1  # near-identical spectra: no preference
    measured = compress(model, LowRankConfig(param_reduction=0.3, sensitivity_samples=64, **SENSITIVE),
                        calibration_data=[x])
    ranks = measured.lowrank_config.ranks
    assert ranks["unused"] == 1  # no output reads it: cut first, to the minimum
    assert ranks.get("a", 16) > ranks["b"]  # the output reads a ten times more strongly (16: a kept dense)
    assert measured.lowrank_config.rank_allocation == "sensitivity"


def test_measuring_leaves_the_model_as_it_was():
    model, x = Weighted(), _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_children())

    def broken(name, rank):
        if rank > 1:
            raise RuntimeError("boom")
        return nn.Linear(16, 16)

    with pytest.raises(RuntimeError, match="boom"):
        measure_sensitivity(model, {"a": model.a}, broken, {"a": [1, 4]}, [x])
    assert dict(model.named_children()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layers_hooks_act_on_its_truncated_stand_ins_too():
    """The dense reference runs with the layer's own hooks, so every truncated measurement must too: at full rank
    the model's output does not move."""
    from smooth_hf.lowrank.layers import factorise

    model, x = Weighted(), _inputs()
    model.a.register_forward_hook(lambda module, args, out: 3 * out + 1)
    curves = measure_sensitivity(model, {"a": model.a}, lambda name, rank: factorise(model.a, rank), {"a": [16]}, [x])
    ((rank, loss),) = curves["a"]
    assert rank == 16 and loss < 1e-10
    assert len(model.a._forward_hooks) == 1  # the layer keeps its hook


def test_curves_are_measured_once_and_serve_every_budget(monkeypatch):
    import smooth_hf.lowrank.whitening as whitening

    calls = []
    real = whitening.measure_sensitivity
    monkeypatch.setattr(whitening, "measure_sensitivity", lambda m, layers, *a: calls.append(set(layers)) or real(m, layers, *a))
    model, x = Weighted(), _inputs()
    config = LowRankConfig(param_reduction=0.2, **SENSITIVE)
    grams = calibrate(model, config, [x[:10], x[10:]])
    assert sum(len(b) for b in grams.kept_batches) == 16 and len(grams.kept_batches) == 2  # the first 16 samples
    first = compress(copy.deepcopy(model), config, calibration_data=grams)
    second = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.4, **SENSITIVE), calibration_data=grams)
    assert calls == [{"a", "b", "unused"}, set()]  # the second budget measured nothing
    assert first.lowrank_report.reduction < second.lowrank_report.reduction
    again = compress(copy.deepcopy(model), config, calibration_data=[x[:10], x[10:]])
    assert again.lowrank_config.ranks == first.lowrank_config.ranks


def test_kept_samples_are_cut_from_dict_batches_and_other_values_kept():
    model = Weighted()
    batch = {"x": _inputs(8), "note": "same"}
    grams = collect_input_grams(model, {"a": model.a}, [{"pixel_values": batch["x"], "note": "same"}], keep_samples=5)
    (kept,) = grams.kept_batches
    assert kept["pixel_values"].shape == (5, 32) and kept["note"] == "same"


def test_transformers_encoder_with_padding():
    model = tiny_bert().eval()
    ids = torch.randint(5, model.config.vocab_size, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:3, 7:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(6, dtype=torch.long)}]
    compress(model, LowRankConfig(param_reduction=0.2, sensitivity_samples=6, **SENSITIVE), calibration_data=batches)
    assert model.lowrank_report.reduction >= 0.2 and model.lowrank_config.ranks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"param_reduction": 0.3, "rank_allocation": "sensitivity"}, "needs method='whitened'"),
        ({"rank_ratio": 0.3, "method": "whitened", "rank_allocation": "sensitivity"}, "global budget"),
        ({"param_reduction": 0.3, "rank_allocation": "hessian"}, "rank_allocation must be one of"),
        ({"param_reduction": 0.3, "sensitivity_samples": 0}, "sensitivity_samples must be"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kwargs)


def test_statistics_collected_without_kept_samples_are_refused_and_the_model_kept():
    model, x = Weighted(), _inputs()
    grams = calibrate(model, LowRankConfig(param_reduction=0.3, method="whitened"), [x])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rank_allocation='sensitivity'"):
        compress(model, LowRankConfig(param_reduction=0.3, **SENSITIVE), calibration_data=grams)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "lowrank_config")


def test_saves_reloads_and_says_so_in_the_card(tmp_path):
    model = tiny_resnet14(channels=(8, 16, 32))
    x = {"pixel_values": torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    compress(model, LowRankConfig(param_reduction=0.5, **SENSITIVE), calibration_data=[x])
    smooth_hf.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / COMPRESSION_CONFIG_NAME).read_text())
    assert saved["rank_allocation"] == "sensitivity" and saved["sensitivity_samples"] == 16
    assert "allocated by measured sensitivity" in (tmp_path / "m" / "README.md").read_text()
    reloaded = smooth_hf.from_pretrained(tmp_path / "m")
    inputs = {"x": x["pixel_values"]}
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)
    assert LowRankConfig.from_dict({"rank_ratio": 0.5}).rank_allocation == "spectrum"  # older files still load

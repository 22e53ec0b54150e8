"""Rank projection: training towards a cut, so that the cut afterwards changes nothing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import three_conv_net

from smooth_hf import LowRankConfig, RankProjection, SmoothnessPenalty, SmoothTrainer, SmoothTrainingArguments, compress
from smooth_hf.training.projection import project_to_rank_, scheduled_reduction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_is_zero_then_cubic_then_the_target():
    at = [scheduled_reduction(step, 100, 0.8, 0.1, 0.6) for step in range(101)]
    assert at[:10] == [0.0] * 10 and at[60:] == [0.8] * 41
    assert all(a <= b for a, b in zip(at, at[1:], strict=False))  # never gives ranks back
    assert scheduled_reduction(35, 100, 0.8, 0.1, 0.6) == pytest.approx(0.8 * (1 - 0.5**3))
    assert scheduled_reduction(5, 10, 0.5, 0.0, 0.0) == 0.5  # start = end: the whole cut at once


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 3, 3, 3)])
def test_project_to_rank_is_the_best_approximation_in_place(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    matrix = weight.reshape(shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    before = weight.data_ptr()
    project_to_rank_(weight, 2)
    assert weight.data_ptr() == before and weight.shape == shape
    torch.testing.assert_close(weight.reshape(shape[0], -1).double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(weight.reshape(shape[0], -1)) == 2


def test_projection_makes_the_planned_cut_lossless():
    model = three_conv_net()
    projection = RankProjection.for_model(model, 0.3, every=5, start=0.0, end=0.5)
    assert projection(3, 10) is None  # not due: nothing happens
    x = torch.randn(4, 1, 10, 10)
    ranks = projection(10, 10)  # the last step: the whole cut
    assert ranks is not None and all(r is not None for r in ranks)
    for (_, module), rank in zip(projection.layers, ranks, strict=True):
        assert torch.linalg.matrix_rank(module.weight.detach().reshape(module.weight.shape[0], -1)) == rank
    with torch.no_grad():
        dense = model(x)
        cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3))
        torch.testing.assert_close(cut(x), dense, atol=1e-5, rtol=1e-4)
    assert cut.lowrank_report.reduction >= 0.3
    # The same cut of the same model before projection loses something: the projection did the work.
    with torch.no_grad():
        raw = three_conv_net()
        assert (compress(copy.deepcopy(raw), LowRankConfig(param_reduction=0.3))(x) - raw(x)).abs().max() > 1e-3


def test_projection_plans_with_the_rank_multiple_of_the_later_cut(caplog):
    """A cut that rounds ranks to a multiple (compress's default on CUDA is 8) keeps exactly what training kept only
    when the projection planned with that multiple; a model trained so is also cut exactly without the rounding.
    The lossy case is the only one compress warns about, naming both ways out."""
    x = torch.randn(4, 1, 10, 10)

    def cut_error(train_multiple: int, cut_multiple: int, reduction: float = 0.3) -> tuple[list, float, str]:
        model = three_conv_net()
        ranks = RankProjection.for_model(model, 0.3, every=5, start=0.0, end=0.5, rank_multiple=train_multiple)(10, 10)
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="smooth_hf.lowrank.compress"):
            cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=reduction, rank_multiple=cut_multiple))
            return ranks, (cut(x) - model(x)).abs().max().item(), caplog.text

    ranks, error, warned = cut_error(4, 4)
    assert all(r % 4 == 0 for r in ranks) and error < 1e-5 and not warned  # rounded, and exact: nothing to say
    assert cut_error(4, 1)[1] < 1e-5
    assert cut_error(1, 1)[1] < 1e-5
    planned_without, error, warned = cut_error(1, 4)
    assert any(r % 4 for r in planned_without) and error > 1e-3  # what the option prevents
    assert "exactly low rank" in warned and "rank_multiple=1" in warned and "plan_rank_multiple=4" in warned
    # Beyond the plan every cut loses something, so the rounding is not to blame and there is no warning.
    assert cut_error(1, 4, reduction=0.45)[1] > 1e-3 and not cut_error(1, 4, reduction=0.45)[2]


def test_projection_decomposes_each_layer_once(monkeypatch):
    import smooth_hf.lowrank.decomposition as decomposition
    import smooth_hf.training.projection as projection_module

    calls = []
    real, real_factors = decomposition.decompose, decomposition.factors_from
    monkeypatch.setattr(decomposition, "decompose", lambda m, **k: calls.append(m.shape) or real(m, **k))
    monkeypatch.setattr(projection_module, "factors_from", lambda m, d, *a, **k: real_factors(m, d, *a, **k)
                        if d is not None and d.basis is not None else pytest.fail("a second decomposition"))
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: pytest.fail("a second decomposition"))
    model = three_conv_net()
    projection = RankProjection.for_model(model, 0.3, every=5, start=0.0, end=0.5)
    ranks = projection(10, 10)
    assert len(calls) == len(projection.layers) and all(r is not None for r in ranks)


def test_bad_projection_settings_are_clear_errors():
    with pytest.raises(ValueError, match="at most .* can be removed"):
        RankProjection.for_model(three_conv_net(), 0.95)
    with pytest.raises(ValueError, match="start <= end"):
        RankProjection.for_model(three_conv_net(), 0.3, start=0.7, end=0.2)
    with pytest.raises(ValueError, match="fraction in"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=1.5)
    with pytest.raises(ValueError, match="rank_projection_start and --rank_projection_end"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=0.5, rank_projection_end=1.5)
    with pytest.raises(ValueError, match="--plan_rank_multiple must be an integer >= 1"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=0.5, plan_rank_multiple=0)
    with pytest.raises(ValueError, match="multiples of 16.*smaller rank multiple"):  # 16 = the layers' full rank
        RankProjection.for_model(three_conv_net(), 0.3, rank_multiple=16)


def test_invalidate_makes_the_penalty_recompute_its_directions():
    model = three_conv_net()
    penalty = SmoothnessPenalty.for_model(model, nuclear_norm_coef=1.0, nuclear_norm_every=100)
    penalty(0)
    with torch.no_grad():  # weights changed outside the optimizer, as a projection does
        for _, module in penalty.layers:
            module.weight.copy_(torch.randn_like(module.weight))
    exact = SmoothnessPenalty.for_model(model, nuclear_norm_coef=1.0, nuclear_norm_every=1)(0)[1]["nuclear_norm"]
    stale = penalty(1)[1]["nuclear_norm"]  # the old directions: the surrogate is below the nuclear norm
    penalty.invalidate()
    fresh = penalty(2)[1]["nuclear_norm"]
    assert stale < exact - 0.05 and fresh == pytest.approx(exact, rel=1e-5)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 10, 10, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long() + (self.x[:, 0, 0, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("nuclear_norm_coef", [0.0, 0.5])
def test_trainer_with_projection_trains_a_model_that_the_cut_does_not_change(tmp_path, nuclear_norm_coef):
    model = three_conv_net()
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=2, learning_rate=0.05, optim="sgd",
        rank_projection_param_reduction=0.3, rank_projection_every=3, nuclear_norm_coef=nuclear_norm_coef,
        penalty_normalization="relative", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=_Images())
    trainer.train()
    assert trainer.state.global_step == 12
    model.eval()
    x = _Images().x[:8]
    with torch.no_grad():
        torch.testing.assert_close(compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3))(x), model(x),
                                   atol=1e-5, rtol=1e-4)


def test_trainer_plans_with_the_devices_rank_multiple_or_the_one_given(tmp_path):
    from smooth_hf.lowrank.timing import default_rank_multiple

    def trainer(**kwargs) -> SmoothTrainer:
        args = SmoothTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=1, learning_rate=0.05,
            optim="sgd", rank_projection_param_reduction=0.3, rank_projection_every=3, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, **kwargs,
        )
        return SmoothTrainer(model=three_conv_net(), args=args, train_dataset=_Images())

    resolved = trainer()  # what compress() uses on the training device, recorded in the arguments
    assert resolved.args.plan_rank_multiple == default_rank_multiple("cpu") == resolved.rank_projection.rank_multiple
    given = trainer(plan_rank_multiple=4)
    given.train()
    model = given.model.eval()
    with torch.no_grad():
        cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3, rank_multiple=4))
        torch.testing.assert_close(cut(_Images().x[:8]), model(_Images().x[:8]), atol=1e-5, rtol=1e-4)
    assert all(rank % 4 == 0 for rank in cut.lowrank_config.ranks.values())


def test_on_a_gpu_the_trainer_plans_in_the_multiples_compress_uses_there(tmp_path, monkeypatch):
    import smooth_hf.training.trainer

    monkeypatch.setattr(smooth_hf.training.trainer, "default_rank_multiple", lambda device: 8)  # what it returns for CUDA
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path), rank_projection_param_reduction=0.3, nuclear_norm_coef=1.0,
        nuclear_norm_param_reduction=0.3, report_to=[], use_cpu=True,
    )
    trainer = SmoothTrainer(model=three_conv_net(), args=args, train_dataset=_Images())
    assert args.plan_rank_multiple == trainer.rank_projection.rank_multiple == trainer.smoothness.rank_multiple == 8
    assert all(rank % 8 == 0 for rank in trainer.smoothness._kept_ranks())


def test_plain_trainer_has_no_projection(tmp_path):
    args = SmoothTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = SmoothTrainer(model=three_conv_net(), args=args, train_dataset=_Images())
    assert trainer.rank_projection is None and not args.steers_to_low_rank

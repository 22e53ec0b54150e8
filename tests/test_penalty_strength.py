"""How strongly the nuclear norm acts, and on what: the ``relative`` weighting and the tail-only nuclear norm."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import three_conv_net
from torch import nn

from smooth_hf import LowRankConfig, SmoothnessPenalty, SmoothTrainer, SmoothTrainingArguments, compress
from smooth_hf.training.penalties import spectral_direction


def _two_layers(seed: int = 0, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (4, 3, 3, 3)])
def test_spectral_direction_skip_is_the_gradient_of_the_tail(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    matrix = weight.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    direction = spectral_direction(weight, skip=2).reshape(matrix.shape)
    assert float((matrix * direction).sum()) == pytest.approx(float(s[2:].sum()), rel=1e-9)
    assert (u[:, :2].t() @ direction @ vh[:2].t()).abs().max() < 1e-9  # the kept directions feel nothing
    torch.testing.assert_close(direction, u[:, 2:] @ vh[2:])
    assert spectral_direction(weight, skip=min(matrix.shape)).abs().max() == 0


def _grads(model: nn.Module, normalization: str) -> list[torch.Tensor]:
    penalty = SmoothnessPenalty.for_model(model, skip_first_last=False, nuclear_norm_coef=1.0, first_order_coef=1.0,
                                          normalization=normalization, nuclear_norm_every=1)
    model.zero_grad()
    total, _ = penalty(0)
    total.backward()
    return [m.weight.grad.clone() for _, m in penalty.layers]


def test_scale_free_step_shrinks_with_scale_but_relative_step_does_not():
    """Scaling the weights by 3 divides a scale-free gradient by 3 (a step moves them 9x less relative to their
    size); the relative weighting's gradient grows by 3, so a step moves them by the same fraction."""
    small, large = _two_layers(scale=1.0), _two_layers(scale=3.0)
    for g1, g3 in zip(_grads(small, "scale_free"), _grads(large, "scale_free"), strict=True):
        torch.testing.assert_close(g3, g1 / 3, rtol=1e-4, atol=1e-7)
    for g1, g3 in zip(_grads(small, "relative"), _grads(large, "relative"), strict=True):
        torch.testing.assert_close(g3, g1 * 3, rtol=1e-4, atol=1e-6)


def test_relative_and_scale_free_have_the_same_value_at_unit_norm_and_direction_everywhere():
    model = _two_layers()
    with torch.no_grad():
        for m in model:
            m.weight.div_(m.weight.norm())
    penalty = dict(nuclear_norm_coef=1.0, first_order_coef=1.0, nuclear_norm_every=1)
    free = SmoothnessPenalty.for_model(model, normalization="scale_free", **penalty)(0)[1]
    rel = SmoothnessPenalty.for_model(model, normalization="relative", **penalty)(0)[1]
    assert free == pytest.approx(rel, rel=1e-5)
    for a, b in zip(_grads(_two_layers(), "scale_free"), _grads(_two_layers(), "relative"), strict=True):
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_tail_ranks_are_the_ranks_compress_would_keep():
    model = three_conv_net()
    penalty = SmoothnessPenalty.for_model(model, nuclear_norm_coef=1.0, nuclear_norm_param_reduction=0.3)
    planned = dict(zip(penalty.layer_names, penalty._kept_ranks(), strict=True))
    cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3, skip_first_last=True))
    assert {k: v for k, v in planned.items() if v is not None} == cut.lowrank_config.ranks
    assert set(planned) == {"2", "4"}  # the stem and the head are not penalised, as by default
    # ... also when the cut rounds its ranks to a multiple
    penalty = SmoothnessPenalty.for_model(model, nuclear_norm_coef=1.0, nuclear_norm_param_reduction=0.3,
                                          rank_multiple=4)
    planned = dict(zip(penalty.layer_names, penalty._kept_ranks(), strict=True))
    cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3, skip_first_last=True, rank_multiple=4))
    assert {k: v for k, v in planned.items() if v is not None} == cut.lowrank_config.ranks
    assert all(v % 4 == 0 for v in cut.lowrank_config.ranks.values())


def test_tail_penalty_leaves_the_kept_directions_alone():
    model = three_conv_net()
    # "sum" weighting: the gradient is exactly the tail direction (no normalising factor to differentiate)
    penalty = SmoothnessPenalty.for_model(model, nuclear_norm_coef=1.0, nuclear_norm_param_reduction=0.3,
                                          nuclear_norm_every=1, normalization="sum")
    ranks = dict(zip(penalty.layer_names, penalty._kept_ranks(), strict=True))
    total, terms = penalty(0)
    total.backward()
    full = SmoothnessPenalty.for_model(three_conv_net(), nuclear_norm_coef=1.0, nuclear_norm_every=1, normalization="sum")(0)[1]
    assert 0 < terms["nuclear_norm"] < full["nuclear_norm"]  # the tail is part of the whole
    for name, module in penalty.layers:
        matrix = module.weight.detach().reshape(module.weight.shape[0], -1)
        grad = module.weight.grad.reshape(matrix.shape)
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = ranks[name]
        assert k is not None and k < min(matrix.shape)
        kept = u[:, :k].t() @ grad @ vh[:k].t()
        assert kept.abs().max() < 1e-5 * grad.abs().max()
        torch.testing.assert_close(grad, u[:, k:] @ vh[k:], atol=1e-5, rtol=1e-4)


def test_tail_budget_out_of_reach_is_a_clear_error():
    with pytest.raises(ValueError, match="at most .* can be removed .* penalise more layers"):
        SmoothnessPenalty.for_model(three_conv_net(), nuclear_norm_coef=1.0, nuclear_norm_param_reduction=0.95)
    with pytest.raises(ValueError, match="fraction in"):
        SmoothTrainingArguments(output_dir="unused", nuclear_norm_coef=1.0, nuclear_norm_param_reduction=1.5)


class _Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_tail_penalty_empties_the_planned_tail(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    hidden = model[2]

    def tail_share(k: int) -> float:
        s = torch.linalg.svdvals(hidden.weight.detach())
        return float(s[k:].pow(2).sum() / s.pow(2).sum())

    args = SmoothTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=4, learning_rate=0.1, optim="sgd",
        nuclear_norm_coef=5.0, nuclear_norm_param_reduction=0.2, penalty_normalization="relative",
        nuclear_norm_every=2, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        max_grad_norm=0.0,  # no clipping: the penalty's step is not capped by the task's gradient norm
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=_Regression())
    k = dict(zip(trainer.smoothness.layer_names, trainer.smoothness._kept_ranks(), strict=True))["2"]
    assert k is not None and 1 < k < 16
    before = tail_share(k)
    trainer.train()
    assert tail_share(k) < 0.25 * before
    logged = [e["smooth/nuclear_norm"] for e in trainer.state.log_history if "smooth/nuclear_norm" in e]
    assert logged and logged[-1] < logged[0]

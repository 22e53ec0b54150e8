"""How strongly the nuclear norm acts: the ``relative`` weighting and the proximal mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smooth_hf import SmoothnessPenalty, SmoothTrainer, SmoothTrainingArguments
from smooth_hf.penalties import shrink_singular_values


def _two_layers(seed: int = 0, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (4, 3, 3, 3)])
def test_shrink_singular_values_is_the_nuclear_prox(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    matrix = weight.reshape(shape[0], -1)
    s = torch.linalg.svdvals(matrix)
    threshold = float(s[1] + s[2]) / 2  # keeps exactly the two largest
    shrunk, before = shrink_singular_values(weight, threshold)
    assert shrunk.shape == weight.shape
    torch.testing.assert_close(before, s)
    after = torch.linalg.svdvals(shrunk.reshape(shape[0], -1))
    torch.testing.assert_close(after[:2], s[:2] - threshold)
    assert after[2:].abs().max() < 1e-10  # exact zeros, not small values
    # argmin_X ||X - W||^2 / 2 + t ||X||_*: the prox objective is lower than at W or at a slightly moved point
    def objective(x):
        return 0.5 * (x - weight).pow(2).sum() + threshold * torch.linalg.svdvals(x.reshape(shape[0], -1)).sum()
    assert objective(shrunk) < objective(weight)
    assert objective(shrunk) < objective(shrunk + 1e-3 * torch.randn_like(weight))


def test_shrink_keep_norm_only_reshapes_the_spectrum():
    torch.manual_seed(1)
    weight = torch.randn(6, 10)
    shrunk, _ = shrink_singular_values(weight, 0.5, keep_norm=True)
    assert math.isclose(float(shrunk.norm()), float(weight.norm()), rel_tol=1e-5)
    assert shrink_singular_values(weight, 0.0)[0].sub(weight).abs().max() < 1e-5


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


def test_proximal_step_gives_exact_zeros_and_keeps_norms():
    model = _two_layers()
    penalty = SmoothnessPenalty.for_model(model, skip_first_last=False, nuclear_norm_coef=1.0,
                                          nuclear_norm_mode="proximal")
    matrices = [m.weight.detach().reshape(m.weight.shape[0], -1).clone() for _, m in penalty.layers]
    total, terms = penalty(0)
    assert "nuclear_norm" not in terms and float(total) == 0.0  # the proximal mode adds nothing to the loss
    step = 4.0
    logged = penalty.proximal_step(step_size=step)
    assert 0 < logged["nuclear_norm"] <= 1.0
    for (_, m), before in zip(penalty.layers, matrices, strict=True):
        s0 = torch.linalg.svdvals(before)
        # scale_free: each singular value moves by step * coef / (||M||_F sqrt(min dim) * layers)
        threshold = step / (float(before.norm()) * math.sqrt(min(before.shape)) * len(matrices))
        s = torch.linalg.svdvals(m.weight.detach().reshape(before.shape))
        zeroed = int((s0 <= threshold).sum())
        assert 1 <= zeroed < len(s0)  # the test's step cuts some, not all
        assert s[len(s0) - zeroed :].abs().max() < 1e-5 * s[0]  # exact zeros, not small values
        kept = (s0[: len(s0) - zeroed] - threshold)
        torch.testing.assert_close(s[: len(kept)], kept * before.norm() / kept.norm(), rtol=1e-4, atol=1e-6)


class _Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_proximal_mode_cuts_rank_during_training(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    hidden = model[2]
    before = torch.linalg.matrix_rank(hidden.weight.detach()).item()
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=2, learning_rate=0.1, optim="sgd",
        nuclear_norm_coef=20.0, nuclear_norm_mode="proximal", nuclear_norm_every=2, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=_Regression())
    trainer.train()
    s = torch.linalg.svdvals(hidden.weight.detach())
    assert before == 16
    assert (s < 1e-5 * s[0]).sum() >= 4, s  # several exact zeros: truncating there changes nothing
    logged = [e["smooth/nuclear_norm"] for e in trainer.state.log_history if "smooth/nuclear_norm" in e]
    assert logged and logged[-1] < logged[0]

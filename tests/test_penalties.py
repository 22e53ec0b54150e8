"""The penalties against closed forms and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from smooth_hf.training.penalties import (
    first_order,
    nuclear_norm,
    nuclear_norm_surrogate,
    out_in_weight,
    second_order,
    spectral_direction,
)
from smooth_hf.training.smoothness import SmoothnessPenalty


def numpy_reference(w: np.ndarray) -> dict[str, float]:
    """Straight from the definitions, with explicit loops over the channel index."""
    first = sum(((w[i + 1] - w[i]) ** 2).sum() for i in range(w.shape[0] - 1))
    first += sum(((w[:, j + 1] - w[:, j]) ** 2).sum() for j in range(w.shape[1] - 1))
    second = sum(((w[i + 1] - 2 * w[i] + w[i - 1]) ** 2).sum() for i in range(1, w.shape[0] - 1))
    second += sum(((w[:, j + 1] - 2 * w[:, j] + w[:, j - 1]) ** 2).sum() for j in range(1, w.shape[1] - 1))
    nuclear = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False).sum()
    return {"first": first, "second": second, "nuclear": nuclear}


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3), (6, 2, 1, 5), (3, 3)])
def test_matches_numpy_reference(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = numpy_reference(w.numpy())
    assert first_order(w).item() == pytest.approx(ref["first"], rel=1e-10)
    assert second_order(w).item() == pytest.approx(ref["second"], rel=1e-10)
    assert nuclear_norm(w).item() == pytest.approx(ref["nuclear"], rel=1e-10)


def test_diagonal_matrix_nuclear_norm_is_sum_of_absolute_diagonal():
    d = torch.tensor([3.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert nuclear_norm(torch.diag(d)).item() == pytest.approx(5.5)


def test_linear_ramp_closed_forms():
    out, inp, a, b = 6, 4, 0.3, -0.7
    i, j = torch.meshgrid(torch.arange(out, dtype=torch.float64), torch.arange(inp, dtype=torch.float64), indexing="ij")
    w = a * i + b * j
    # Every first difference along axis 0 is a, along axis 1 is b; every second difference is 0.
    assert first_order(w).item() == pytest.approx(a**2 * (out - 1) * inp + b**2 * out * (inp - 1))
    assert second_order(w).item() == pytest.approx(0.0, abs=1e-20)


def test_constant_tensor():
    w = torch.full((4, 3, 3, 3), 2.5, dtype=torch.float64)
    assert first_order(w).item() == 0.0
    assert second_order(w).item() == 0.0
    # c * ones(out, in*k*k) has rank one, singular value |c| * sqrt(out * in * k * k).
    assert nuclear_norm(w).item() == pytest.approx(2.5 * np.sqrt(4 * 27))


def test_spatial_axes_are_not_differenced():
    w = torch.zeros(2, 2, 3, 3)
    w[..., 0, 0] = 1.0  # varies only along the kernel axes
    assert first_order(w).item() == 0.0
    assert second_order(w).item() == 0.0


def test_short_axes_contribute_zero():
    w = torch.randn(1, 2)
    assert second_order(w).item() == 0.0  # no axis is long enough for a second difference
    assert first_order(w).item() == pytest.approx(((w[0, 1] - w[0, 0]) ** 2).item())


def test_rejects_vectors():
    with pytest.raises(ValueError, match="at least 2 dims"):
        first_order(torch.randn(5))


def test_hf_conv1d_is_transposed_to_out_in():
    layer = Conv1D(nf=5, nx=3)  # weight stored (in=3, out=5)
    assert tuple(out_in_weight(layer).shape) == (5, 3)
    linear = nn.Linear(3, 5)
    assert out_in_weight(linear) is linear.weight


def test_penalties_are_differentiable():
    w = torch.randn(5, 4, requires_grad=True)
    (first_order(w) + second_order(w) + nuclear_norm(w)).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_surrogate_equals_nuclear_norm_and_its_gradient_at_refresh():
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    direction = spectral_direction(w)
    value = nuclear_norm_surrogate(w, direction)
    assert value.item() == pytest.approx(nuclear_norm(w).item(), rel=1e-10)
    (grad_exact,) = torch.autograd.grad(nuclear_norm(w), w)
    (grad_surrogate,) = torch.autograd.grad(nuclear_norm_surrogate(w, direction), w)
    torch.testing.assert_close(grad_surrogate, grad_exact)


def test_surrogate_is_a_lower_bound_after_the_weight_moves():
    w0 = torch.randn(6, 4, dtype=torch.float64)
    direction = spectral_direction(w0)
    w1 = w0 + 0.3 * torch.randn(6, 4, dtype=torch.float64)
    assert nuclear_norm_surrogate(w1, direction).item() <= nuclear_norm(w1).item() + 1e-12


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (8, 3, 3, 3), (5, 5)])
def test_spectral_direction_equals_svd_u_vt(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, _, vh = torch.linalg.svd(w.reshape(shape[0], -1), full_matrices=False)
    torch.testing.assert_close(spectral_direction(w), (u @ vh).reshape(shape))


def test_spectral_direction_of_a_rank_deficient_weight_is_a_subgradient():
    a, b = torch.randn(8, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    w = a @ b  # rank 2
    direction = spectral_direction(w)
    assert nuclear_norm_surrogate(w, direction).item() == pytest.approx(nuclear_norm(w).item(), rel=1e-8)
    assert torch.linalg.matrix_norm(direction, ord=2).item() <= 1 + 1e-8  # in the unit ball of the dual norm


# ---------------------------------------------------------------- SmoothnessPenalty weighting (public API)


def _layers(scale: float = 1.0) -> list[tuple[str, nn.Module]]:
    """A Linear, a Conv2d and an HF Conv1D, float64, with weights multiplied by ``scale``."""
    torch.manual_seed(0)
    layers = [("linear", nn.Linear(5, 4)), ("conv", nn.Conv2d(3, 6, 3)), ("conv1d", Conv1D(nf=5, nx=3))]
    with torch.no_grad():
        for _, module in layers:
            module.double().weight.mul_(scale)
    return layers


COEFS = {"nuclear_norm_coef": 2.0, "first_order_coef": 0.5, "second_order_coef": 0.25}


def test_sum_normalization_is_the_plain_sum_over_layers():
    layers = _layers()
    total, terms = SmoothnessPenalty(layers, normalization="sum", nuclear_norm_every=1, **COEFS)(0)
    weights = [out_in_weight(m).detach() for _, m in layers]
    expected = {
        "nuclear_norm": sum(nuclear_norm(w).item() for w in weights),
        "first_order": sum(first_order(w).item() for w in weights),
        "second_order": sum(second_order(w).item() for w in weights),
    }
    assert terms == pytest.approx(expected, rel=1e-9)
    weighted = sum(COEFS[f"{k}_coef"] * v for k, v in expected.items())
    assert total.item() == pytest.approx(weighted, rel=1e-9)


def test_scale_free_value_does_not_depend_on_the_scale_of_the_weights():
    base = SmoothnessPenalty(_layers(), normalization="scale_free", nuclear_norm_every=1, **COEFS)(0)
    tripled = SmoothnessPenalty(_layers(3.0), normalization="scale_free", nuclear_norm_every=1, **COEFS)(0)
    assert tripled[1] == pytest.approx(base[1], rel=1e-9)
    assert tripled[0].item() == pytest.approx(base[0].item(), rel=1e-9)
    # The plain sums do scale (x3 for the nuclear norm, x9 for the squared differences): the invariance is the weighting's.
    plain = SmoothnessPenalty(_layers(), normalization="sum", nuclear_norm_every=1, **COEFS)(0)[1]
    plain_tripled = SmoothnessPenalty(_layers(3.0), normalization="sum", nuclear_norm_every=1, **COEFS)(0)[1]
    assert plain_tripled["nuclear_norm"] == pytest.approx(3 * plain["nuclear_norm"], rel=1e-9)
    assert plain_tripled["first_order"] == pytest.approx(9 * plain["first_order"], rel=1e-9)


def test_scale_free_value_does_not_depend_on_the_number_of_layers():
    layers = _layers()
    settings = {"normalization": "scale_free", "nuclear_norm_every": 1, **COEFS}
    once = SmoothnessPenalty(layers, **settings)(0)
    twice = SmoothnessPenalty(layers + [(f"{n}.copy", m) for n, m in layers], **settings)(0)
    assert twice[1] == pytest.approx(once[1], rel=1e-9)

"""Rank selection on made-up spectra: the pure math, no models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smooth_hf.lowrank.allocation import (
    allocate_ranks,
    energy_kept,
    finalize_rank,
    max_removable,
    rank_for_energy,
    rank_for_ratio,
)


def _removed(ranks, costs, dense):
    return sum(d - (d if r is None else r * c) for r, c, d in zip(ranks, costs, dense, strict=True))


@pytest.mark.parametrize(
    ("kept", "full", "cost", "dense", "min_rank", "multiple", "expected"),
    [
        (5, 64, 128, 4096, 1, 1, 5),  # plain
        (0, 64, 128, 4096, 3, 1, 3),  # min_rank floor
        (5, 64, 128, 4096, 1, 8, 8),  # rounded up to a multiple
        (17, 64, 128, 4096, 1, 8, 24),
        (31, 64, 128, 4096, 1, 1, 31),  # 31 * 128 = 3968 < 4096 pays
        (32, 64, 128, 4096, 1, 1, None),  # 32 * 128 = 4096 does not
        (60, 64, 128, 4096, 1, 16, None),  # rounded to 64, the full rank: never pays
        (3, 9, 41, 288, 1, 8, None),  # 8 * 41 = 328 >= 288
        (70, 70, 75, 350, 1, 1, None),  # full rank 5 < 70 requested: capped at 5, then dense
    ],
)
def test_finalize_rank(kept, full, cost, dense, min_rank, multiple, expected):
    assert finalize_rank(kept, full, cost, dense, min_rank, multiple) == expected


def test_rank_multiple_is_capped_at_full_rank():
    # full rank 10 (out=10, in=1000): rounding 3 up to 16 would exceed it -> 10, and 10 * 1010 < 10000 is False.
    assert finalize_rank(3, 10, 1010, 10_000, 1, 16) is None
    assert finalize_rank(3, 10, 1010, 100_000, 1, 16) == 10  # same cap, in a layer where it pays


@pytest.mark.parametrize(("full", "ratio", "expected"), [(10, 0.3, 3), (64, 0.5, 32), (9, 0.25, 3), (7, 1.0, 7)])
def test_rank_for_ratio_is_ceil_without_float_noise(full, ratio, expected):
    assert rank_for_ratio(full, ratio) == expected


def test_rank_for_energy_and_energy_kept():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 0.99) == 3
    assert rank_for_energy(s, 1.0) == 3  # the zero singular value is never needed
    assert energy_kept(s, 2) == pytest.approx(13 / 14)
    assert energy_kept(s, None) == 1.0
    assert rank_for_energy(torch.tensor([0.0, 0.0]), 0.5) == 1  # an all-zero layer
    assert energy_kept([0.0, 0.0], 1) == 1.0


def test_low_energy_layer_is_cut_first():
    # Same shapes and costs; layer 0 has a fast-decaying spectrum, layer 1 a flat one.
    fast = 2.0 ** -np.arange(32)
    flat = np.ones(32)
    costs, dense = [64, 64], [1024, 1024]
    ranks = allocate_ranks([fast, flat], costs, dense, target_removed=500)
    assert ranks[1] is None
    assert ranks[0] is not None and ranks[0] <= 8
    assert _removed(ranks, costs, dense) >= 500


def test_cost_per_rank_enters_the_score():
    # Same relative spectra, but a rank of layer 1 costs 4x as many parameters: it frees more per unit of
    # energy lost, so it is cut first.
    s = np.linspace(1.0, 0.5, 16)
    ranks = allocate_ranks([s, s], costs=[32, 128], dense_params=[256, 4096], target_removed=1000)
    assert ranks[0] is None and ranks[1] is not None


def _threshold_plans(spectra, costs, dense, multiple):
    """Naive reference: one plan per threshold tau, keeping in every layer the components scoring above tau."""
    scores = [s**2 / np.sum(s**2) / c for s, c in zip(spectra, costs, strict=True)]
    taus = [-np.inf, *sorted(np.concatenate(scores))]
    for tau in taus:
        kept = [int(np.sum(sc > tau)) for sc in scores]
        yield [
            finalize_rank(k, len(s), c, d, 1, multiple) for k, s, c, d in zip(kept, spectra, costs, dense, strict=True)
        ]


def test_allocation_equals_naive_threshold_scan_and_overshoot_is_one_step():
    rng = np.random.default_rng(0)
    shapes = [(16, 48), (32, 32), (8, 72), (40, 20), (24, 24)]
    spectra = [np.sort(rng.gamma(0.5, size=min(o, i)))[::-1] for o, i in shapes]  # no ties
    costs = [o + i for o, i in shapes]
    dense = [o * i for o, i in shapes]
    for multiple in (1, 4):
        plans = list(_threshold_plans(spectra, costs, dense, multiple))
        most = max_removable([len(s) for s in spectra], costs, dense, 1, multiple)
        for frac in (0.0, 0.1, 0.35, 0.6, 0.9, 1.0):
            target = frac * most
            ranks = allocate_ranks(spectra, costs, dense, target, rank_multiple=multiple)
            removed = _removed(ranks, costs, dense)
            expected = min(
                (p for p in plans if _removed(p, costs, dense) >= target), key=lambda p: _removed(p, costs, dense)
            )
            assert ranks == expected
            assert target <= removed <= target + multiple * max(costs)


def test_each_layer_keeps_a_prefix_and_more_budget_never_adds_rank():
    rng = np.random.default_rng(1)
    spectra = [np.sort(rng.random(20))[::-1] for _ in range(4)]
    costs, dense = [60] * 4, [800] * 4
    previous = [20] * 4
    for target in range(0, 3000, 150):
        ranks = allocate_ranks(spectra, costs, dense, target)
        as_int = [20 if r is None else r for r in ranks]
        assert all(a <= b for a, b in zip(as_int, previous, strict=True))
        previous = as_int


def test_zero_layer_is_cut_before_anything_else():
    ranks = allocate_ranks([np.zeros(16), np.ones(16)], [32, 32], [256, 256], target_removed=200)
    assert ranks == [1, None]


def test_zero_target_keeps_everything_dense():
    assert allocate_ranks([np.ones(8), np.ones(4)], [16, 12], [64, 32], 0) == [None, None]


def test_unreachable_target_raises_with_the_maximum():
    # min_rank=4: each layer keeps at least 4 * 32 = 128 of 256 parameters, so at most 256 can go.
    with pytest.raises(ValueError, match="at most 256 can be removed"):
        allocate_ranks([np.ones(16), np.ones(16)], [32, 32], [256, 256], 300, min_rank=4)
    assert max_removable([16, 16], [32, 32], [256, 256], min_rank=4) == 256


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one entry per layer"):
        allocate_ranks([np.ones(3)], [1, 2], [3], 1)

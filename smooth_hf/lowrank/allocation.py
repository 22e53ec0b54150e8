"""Rank selection as pure functions of singular-value spectra: no modules, no torch state.

Kept apart from :mod:`smooth_hf.lowrank.compress` so the budget logic can be tested on made-up
spectra and reused by tools that only have spectra (plots, what-if tables).

Notation for one layer: ``s`` its singular values (descending), ``k = len(s)`` its full rank,
``cost = in*kh*kw + out`` the parameters one kept rank costs once factorised, and
``dense = out*in*kh*kw`` the parameters of its dense weight. A rank ``r`` is only used when it
pays, ``r * cost < dense``; otherwise the layer stays dense (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "allocate_ranks",
    "energy_kept",
    "finalize_rank",
    "max_removable",
    "rank_for_energy",
    "rank_for_ratio",
]

SpectrumLike = Sequence[float] | np.ndarray  # torch tensors work too: they go through np.asarray


def _spectrum(values) -> np.ndarray:
    s = np.asarray(values.detach().cpu().double() if hasattr(values, "detach") else values, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(
            f"a spectrum must be a non-empty 1-D sequence of singular values, got shape {s.shape}: pass one "
            "layer's singular values, e.g. torch.linalg.svdvals(weight.reshape(out, -1))"
        )
    return s


def finalize_rank(
    kept: int, full_rank: int, cost_per_rank: int, dense_params: int, min_rank: int = 1, rank_multiple: int = 1
) -> int | None:
    """Apply ``min_rank``, round up to ``rank_multiple`` (capped at full rank), then the pays check.

    Returns the rank to factorise with, or ``None`` when a factorised layer would not have fewer
    parameters than the dense one (then keeping it dense loses nothing and saves a matmul).
    """
    rank = max(kept, min_rank)
    rank = min(math.ceil(rank / rank_multiple) * rank_multiple, full_rank)
    return rank if rank * cost_per_rank < dense_params else None


def rank_for_ratio(full_rank: int, ratio: float) -> int:
    """``ceil(ratio * full_rank)``, immune to float noise (``0.3 * 10`` is ``3.0000000000000004``)."""
    return max(1, math.ceil(ratio * full_rank - 1e-9))


def rank_for_energy(spectrum: SpectrumLike, energy: float) -> int:
    """The smallest rank whose sum of squared singular values reaches ``energy`` of the total."""
    s = _spectrum(spectrum)
    cumulative = np.cumsum(s**2)
    total = cumulative[-1]
    if total <= 0:
        return 1
    # The small tolerance keeps energy=1.0 from demanding components that are zero up to round-off.
    return int(np.searchsorted(cumulative / total, energy - 1e-12, side="left")) + 1


def energy_kept(spectrum: SpectrumLike, rank: int | None) -> float:
    """Fraction of ``sum(s**2)`` kept by a rank-``rank`` truncation (``None`` = dense = 1.0).

    By Eckart-Young, ``1 - energy_kept`` is the relative squared Frobenius error of the truncation.
    """
    s = _spectrum(spectrum)
    total = float(np.sum(s**2))
    if rank is None or total <= 0:
        return 1.0
    return float(np.sum(s[:rank] ** 2) / total)


def _params(ranks: list[int | None], costs: Sequence[int], dense_params: Sequence[int]) -> int:
    return sum(d if r is None else r * c for r, c, d in zip(ranks, costs, dense_params, strict=True))


def max_removable(
    full_ranks: Sequence[int],
    costs: Sequence[int],
    dense_params: Sequence[int],
    min_rank: int = 1,
    rank_multiple: int = 1,
) -> int:
    """Parameters removed when every layer is cut as far as ``min_rank`` / ``rank_multiple`` allow."""
    ranks = [
        finalize_rank(0, k, c, d, min_rank, rank_multiple)
        for k, c, d in zip(full_ranks, costs, dense_params, strict=True)
    ]
    return sum(dense_params) - _params(ranks, costs, dense_params)


def allocate_ranks(
    spectra: Sequence[SpectrumLike],
    costs: Sequence[int],
    dense_params: Sequence[int],
    target_removed: float,
    *,
    min_rank: int = 1,
    rank_multiple: int = 1,
    relative: bool = True,
) -> list[int | None]:
    """Ranks that remove at least ``target_removed`` weights while losing the least spectral energy.

    The problem is a knapsack: dropping singular component ``i`` of layer ``l`` frees ``cost_l``
    parameters and costs ``s_i^2 / sum_j s_j^2`` of that layer's (relative, Eckart-Young) error.
    Its Lagrangian relaxation is solved by one threshold ``tau`` on the score
    ``s_i^2 / sum_j s_j^2 / cost_l`` (error per parameter freed): every component scoring below
    ``tau`` is dropped, in every layer at once. Relative energies make layers of different scale
    comparable, and within a layer scores decrease with ``i``, so each layer keeps a prefix of its
    spectrum. Ties are broken by layer order then by index (smallest singular value first), which
    makes the threshold a position in one total order; we binary-search the smallest position whose
    plan (after ``min_rank``, ``rank_multiple`` and the pays check, all monotone in the threshold)
    removes at least the target, so the overshoot is at most one rank step of one layer.

    ``relative=False`` scores ``s_i^2 / cost_l`` instead: for spectra whose squares are already losses on
    one common scale (the measured sensitivities of :mod:`smooth_hf.lowrank.sensitivity`).

    Returns:
        one entry per layer: the rank to keep, or ``None`` to keep the layer dense.

    Raises:
        ValueError: even the most aggressive plan (every layer at ``min_rank``) removes less than
            ``target_removed``; the message gives the largest achievable amount.
    """
    if not len(spectra) == len(costs) == len(dense_params):
        raise ValueError(
            f"spectra, costs and dense_params must have one entry per layer, got {len(spectra)}, {len(costs)} and "
            f"{len(dense_params)}: pass the three lists for the same layers, in the same order"
        )
    arrays = [_spectrum(s) for s in spectra]
    full_ranks = [len(s) for s in arrays]
    most = max_removable(full_ranks, costs, dense_params, min_rank, rank_multiple)
    if most < target_removed:
        raise ValueError(
            f"cannot remove {target_removed:,.0f} parameters from these layers: at most {most:,} can be removed "
            f"with min_rank={min_rank} and rank_multiple={rank_multiple}. Lower the target, or lower min_rank / "
            "rank_multiple."
        )
    if not arrays:
        return []
    scores, layer_of, position = [], [], []
    for index, (s, cost) in enumerate(zip(arrays, costs, strict=True)):
        energy = s**2
        total = energy.sum()
        # An all-zero layer loses nothing whatever we drop: score 0 puts it first in line.
        if not relative:
            scores.append(energy / cost)
        else:
            scores.append(energy / total / cost if total > 0 else np.zeros_like(energy))
        layer_of.append(np.full(len(s), index))
        position.append(np.arange(len(s)))
    score, layer, pos = np.concatenate(scores), np.concatenate(layer_of), np.concatenate(position)
    order = np.lexsort((-pos, layer, score))  # primary key: score; then layer; then largest index first
    layer_in_order = layer[order]

    def plan(n_dropped: int) -> list[int | None]:
        dropped = np.bincount(layer_in_order[:n_dropped], minlength=len(arrays))
        return [
            finalize_rank(int(k - d), k, c, dp, min_rank, rank_multiple)
            for k, d, c, dp in zip(full_ranks, dropped, costs, dense_params, strict=True)
        ]

    dense_total = sum(dense_params)
    low, high = 0, len(order)  # plan(high) reaches the target (checked above); find the smallest such
    while low < high:
        mid = (low + high) // 2
        if dense_total - _params(plan(mid), costs, dense_params) >= target_removed:
            high = mid
        else:
            low = mid + 1
    return plan(low)

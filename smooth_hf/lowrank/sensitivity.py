"""Rank allocation by measured sensitivity: what truncating each layer does to the *model's* output.

A layer's whitened spectrum says how much its own output changes on the calibration data; it does not
say how much that change matters downstream (a value projection feeding the last block's output, a
pooler no output reads, an MLP whose error a LayerNorm amplifies). ASVD's remedy, used here: truncate
one layer at a time, at a few ranks, run the calibration batches, and measure how far the model's
output moves from the dense output. Each layer then has a loss curve ``L(r)`` (between the measured ranks,
shared out along the layer's whitened spectrum: :func:`marginal_losses`), and the global budget
drops, over all layers at once, the components that add the least loss per parameter saved (the same
allocator as the spectra, :func:`smooth_hf.lowrank.allocation.allocate_ranks`, fed the curves'
marginal losses in absolute terms). Losses are assumed additive across layers, as in ASVD.

Cost: ``len(RANK_POINTS)`` forward passes over the kept calibration samples per candidate layer (of
the blocks from that layer on: the earlier ones are replayed), which is why the samples used for it
(``LowRankConfig.sensitivity_samples``) are fewer than those whose Gram matrices whiten the cut.

The pure functions (:func:`probe_ranks`, :func:`marginal_losses`, :func:`output_deviation`) hold
the math; :func:`measure_sensitivity` runs the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.batches import feed_batch, model_device, modes_kept
from .base import move_call_hooks
from .replay import PrefixReplay, no_cache

__all__ = ["RANK_POINTS", "marginal_losses", "measure_sensitivity", "output_deviation", "probe_ranks"]

# Where each layer's loss curve is measured: fractions of the largest rank that still removes parameters
# (0 is rank 1). Denser at low ranks, where the curves bend most and where large budgets land.
RANK_POINTS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.8)


def probe_ranks(full_rank: int, cost_per_rank: int, dense_params: int) -> list[int]:
    """The distinct ranks at which a layer's loss is measured: :data:`RANK_POINTS` of its paying range.

    A rank pays when ``rank * cost_per_rank < dense_params``; larger ranks are never chosen (the layer
    stays dense instead), so measuring them would be wasted forward passes. Empty when no rank pays.
    """
    largest = min(full_rank, math.ceil(dense_params / cost_per_rank) - 1)
    if largest < 1:
        return []
    return sorted({max(1, round(f * largest)) for f in RANK_POINTS})


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def marginal_losses(
    measured: Sequence[tuple[int, float]], full_rank: int, spectrum: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """The loss added by dropping each component, ``e[i] = L(i) - L(i + 1)`` for ``i = 0 .. full_rank - 1``.

    ``L`` is the lower convex hull of the measured ``(rank, loss)`` points and ``(full_rank, 0)`` (the
    untruncated layer). The hull makes ``L`` non-increasing: noise in one measurement cannot make a smaller
    rank look better than a larger one. Between two hull points the loss difference is shared by the
    components in between, in proportion to their squared singular values when ``spectrum`` (the layer's
    whitened spectrum, descending) is given, else equally (linear interpolation). The spectrum keeps what the
    measurements at a few ranks cannot see: a layer trained to rank ``r`` has an exactly zero tail beyond
    ``r``, so dropping those components costs nothing, wherever the measured ranks fall. Below the smallest
    measured rank the first segment's rate goes on. ``e[0]`` (rank 1 to no rank at all, which no plan
    takes) is set to the largest marginal.
    """
    points = sorted({int(r): max(0.0, float(loss)) for r, loss in measured if 1 <= r < full_rank}.items())
    points.append((full_rank, 0.0))
    hull = _lower_hull([(float(r), loss) for r, loss in points])
    weights = np.ones(full_rank) if spectrum is None else np.asarray(spectrum, dtype=np.float64)[:full_rank] ** 2
    # marginal[c - 1] is the loss of dropping component c (1-based): rank c -> c - 1.
    marginals = np.zeros(full_rank)
    rates = []  # loss per unit of weight, per hull segment
    for (r0, l0), (r1, l1) in zip(hull, hull[1:], strict=False):
        lo, hi = int(r0), int(r1)  # components lo + 1 .. hi, i.e. indices lo .. hi - 1
        segment = weights[lo:hi]
        if segment.sum() <= 0:  # no weight (a zero spectrum there): share equally
            segment = np.ones(hi - lo)
        rates.append((l0 - l1) / segment.sum())
        marginals[lo:hi] = rates[-1] * segment
    first = int(hull[0][0])
    if rates and first > 1:  # components 2 .. first, below every measurement: the first segment's rate
        marginals[1:first] = rates[0] * weights[1:first]
    marginals[0] = marginals[1:].max(initial=0.0)
    return np.clip(marginals, 0.0, None)


def _primary_output(output: Any) -> tuple[Tensor, str | None]:
    """The tensor a model's output leads with (logits, ``last_hidden_state``, or the output itself) and its name in
    the output (``None`` for a tensor or a tuple)."""
    if isinstance(output, Tensor):
        return output, None
    key = None
    if isinstance(output, Mapping):  # transformers ModelOutput is a Mapping too
        key, output = next(((k, v) for k, v in output.items() if isinstance(v, Tensor)), (None, None))
    elif isinstance(output, (tuple, list)):
        output = next((v for v in output if isinstance(v, Tensor)), None)
    if not isinstance(output, Tensor):
        raise ValueError(
            "rank_allocation='sensitivity' measures how far the model's output moves, but the model returned no "
            "tensor: use a model whose forward returns logits or hidden states, or rank_allocation='spectrum'"
        )
    return output, key


def output_deviation(reference: Tensor, output: Tensor, batch: Any, key: str | None = None) -> tuple[float, float]:
    """``(sum ||y - y_ref||^2, sum ||y_ref||^2)`` over the batch's real positions, in float64.

    For an output with a token axis (``(batch, tokens, ...)``) of a batch with an ``attention_mask`` of shape
    ``(batch, tokens)``, padding positions are left out: nothing downstream reads them. A 3-D output has one; a
    2-D one named ``key`` in the model's output has one unless it is ``logits`` (a classifier's ``(batch,
    labels)``, even with as many labels as tokens), e.g. a question-answering model's ``start_logits``.
    """
    diff = (output.double() - reference.double()) ** 2
    energy = reference.double() ** 2
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    token_axis = reference.dim() >= 3 or (reference.dim() == 2 and key not in (None, "logits"))
    if isinstance(mask, Tensor) and token_axis and tuple(reference.shape[:2]) == tuple(mask.shape):
        weight = mask.to(device=reference.device, dtype=torch.float64).reshape(*mask.shape, *[1] * (reference.dim() - 2))
        diff, energy = diff * weight, energy * weight
    return float(diff.sum()), float(energy.sum())


def measure_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    truncated: Callable[[str, int], nn.Module],
    ranks: Mapping[str, Sequence[int]],
    batches: Sequence[Any],
) -> dict[str, list[tuple[int, float]]]:
    """For each layer, ``[(rank, loss), ...]``: the model's relative output error with that layer alone truncated.

    ``loss = sum ||y - y_dense||^2 / sum ||y_dense||^2`` over ``batches`` (eval mode, no gradients), ``y`` the
    model's primary output (logits or last hidden state). ``truncated(name, rank)`` builds the module that
    stands in for ``layers[name]`` at that rank; it is swapped in for one measurement and the original put
    back, so the model is unchanged afterwards, error or not. The blocks that run before the truncated layer
    are not re-run: their dense outputs are replayed (:class:`smooth_hf.lowrank.replay.PrefixReplay`).
    """
    device = model_device(model)
    curves: dict[str, list[tuple[int, float]]] = {}
    replay = PrefixReplay(model, layers)
    with modes_kept(model), no_cache(model), torch.no_grad():
        model.eval()
        outputs = replay.record(batches, lambda batch: feed_batch(model, batch, device))
        references = [_primary_output(output)[0] for output in outputs]
        del outputs

        def loss() -> float:
            moved = total = 0.0
            for index, (batch, reference) in enumerate(zip(batches, references, strict=True)):
                replay.batch = index
                output, key = _primary_output(feed_batch(model, batch, device))
                d, e = output_deviation(reference, output, batch, key)
                moved, total = moved + d, total + e
            return moved / total if total > 0 else moved

        for name, module in layers.items():
            curve = []
            with replay.installed(replay.verified(replay.for_layer(name), loss)):
                try:
                    for rank in ranks[name]:
                        stand_in = truncated(name, rank)
                        move_call_hooks(module, stand_in)  # the dense reference ran with the layer's own hooks
                        model.set_submodule(name, stand_in)
                        curve.append((rank, loss()))
                finally:
                    model.set_submodule(name, module)
            curves[name] = curve
    return curves

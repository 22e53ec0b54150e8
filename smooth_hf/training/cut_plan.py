"""The low-rank cut a training run aims at: the rank each penalised layer keeps at a parameter budget.

Two training options steer towards a later ``compress(model, LowRankConfig(param_reduction=p))`` and need to
know, from the current weights, what that cut would keep: the tail-only nuclear norm
(``nuclear_norm_param_reduction``, :class:`smooth_hf.SmoothnessPenalty`) and rank projection
(``rank_projection_param_reduction``, :class:`smooth_hf.RankProjection`). Both plan here, with the same global
allocation ``compress`` uses, over the layers they act on (``(name, module)`` pairs), charging the whole cut
of ``p * model_parameters`` to those layers, and with the ``rank_multiple`` the later cut rounds its ranks to
(``LowRankConfig(rank_multiple=...)``, by default what suits the device:
:func:`smooth_hf.lowrank.timing.default_rank_multiple`): a plan of other ranks would leave that cut other singular
values to remove than the ones training removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ..core.validation import check_count, check_fraction
from ..core.weights import out_in_weight, singular_values, weight_matrix
from ..lowrank.allocation import allocate_ranks, max_removable

__all__ = ["check_plan_budget", "layer_shapes", "plan_ranks"]


def layer_shapes(layers: list[tuple[str, nn.Module]]) -> tuple[list[int], list[int], list[int]]:
    """Full rank, parameters per kept rank once factorised, and dense parameters, of each layer."""
    shapes = [out_in_weight(m).shape for _, m in layers]
    pairs = [(s[0], math.prod(s[1:])) for s in shapes]  # (out, in * kh * kw)
    return [min(o, f) for o, f in pairs], [o + f for o, f in pairs], [o * f for o, f in pairs]


def check_plan_budget(
    layers: list[tuple[str, nn.Module]],
    param_reduction: float,
    model_parameters: int | None,
    name: str,
    rank_multiple: int = 1,
) -> None:
    """``param_reduction`` (the option called ``name``) is a fraction the layers can give up, or a clear error."""
    p = param_reduction
    check_fraction(p, name)
    check_count(rank_multiple, "rank_multiple")
    if not model_parameters:
        raise ValueError(f"{name} needs the model's parameter count (build it with .for_model(model, ...))")
    most = max_removable(*layer_shapes(layers), rank_multiple=rank_multiple)
    if most < p * model_parameters:
        multiple = f" with ranks in multiples of {rank_multiple}" if rank_multiple > 1 else ""
        raise ValueError(
            f"{name}={p} asks the penalised layers to lose {p * model_parameters:,.0f} of the model's "
            f"{model_parameters:,} parameters, but at most {most:,} can be removed from them{multiple}. Lower it, or "
            "penalise more layers (penalty_target_modules / penalty_skip_first_last=False)"
            + (", or plan and cut with a smaller rank multiple (the same for both: plan_rank_multiple / "
               "LowRankConfig.rank_multiple)." if rank_multiple > 1 else ".")
        )


def plan_ranks(
    layers: list[tuple[str, nn.Module]],
    param_reduction: float,
    model_parameters: int,
    spectra: Sequence[Tensor] | None = None,
    rank_multiple: int = 1,
) -> list[int | None]:
    """The ranks the global allocation keeps at the current spectra (None: the layer stays dense).

    ``spectra`` are the layers' singular values when the caller already has them (one per layer, in order);
    ranks are rounded up to ``rank_multiple`` (capped at the full rank) as ``compress`` rounds them.
    """
    _, costs, dense = layer_shapes(layers)
    if spectra is None:
        spectra = [singular_values(weight_matrix(module)) for _, module in layers]
    return allocate_ranks(spectra, costs, dense, param_reduction * model_parameters, rank_multiple=rank_multiple)

"""The low-rank cut a training run aims at: the rank each penalised layer keeps at a budget.

Two training options steer towards a later ``compress`` and need to know, from the current weights, what that cut
would keep: the tail-only nuclear norm (``nuclear_norm_param_reduction``, :class:`smooth_hf.SmoothnessPenalty`) and
rank projection (``rank_projection_param_reduction`` / ``rank_projection_macs_reduction``,
:class:`smooth_hf.RankProjection`). Both plan here, with the same global allocation ``compress`` uses, over the
layers they act on (``(name, module)`` pairs), charging the whole cut to those layers, and with the
``rank_multiple`` the later cut rounds its ranks to (``LowRankConfig(rank_multiple=...)``, by default what suits the
device: :func:`smooth_hf.lowrank.timing.default_rank_multiple`): a plan of other ranks would leave that cut other
singular values to remove than the ones training removed.

A :class:`CutBudget` says what the cut removes: a fraction of the whole model's parameters
(``LowRankConfig(param_reduction=p)``), or of its multiply-adds on the inputs it will serve
(``LowRankConfig(macs_reduction=p)`` with ``compress(..., example_inputs=...)``). Multiply-adds are priced exactly
as ``compress`` prices them (:mod:`smooth_hf.lowrank.cost`): a kept rank of a layer costs ``in*kh*kw + out`` per
output position, so a conv at a high resolution costs more per rank than one at a low resolution. The positions
are measured once, by one forward pass on inputs of one sample's shape (:class:`MacsProfile`); the same shape, kept
in ``training_args.json`` (``plan_input_shape``), makes ``recipes/compress.py`` cut with the same prices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..core.validation import check_count, check_fraction
from ..core.weights import out_in_weight, singular_values, weight_matrix
from ..lowrank.allocation import allocate_ranks, max_removable
from ..lowrank.cost import ExampleInputs, trace_layers

__all__ = [
    "RULES",
    "CutBudget",
    "MacsProfile",
    "check_plan_budget",
    "example_inputs_for",
    "format_shape",
    "layer_shapes",
    "parse_shape",
    "plan_ranks",
    "sample_shape",
]

# The budget rules a training run can plan for, named as the LowRankConfig fields of the later cut.
RULES = ("param_reduction", "macs_reduction")


# ---------------------------------------------------------------------------------------------- input shapes
def parse_shape(text: str | Sequence[int], name: str = "plan_input_shape") -> tuple[int, ...]:
    """``"1,28,28"`` (or a sequence of ints) -> ``(1, 28, 28)``: one sample's shape, or a clear error."""
    try:
        shape = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        shape = ()
    if len(shape) not in (1, 3) or any(v < 1 for v in shape):
        raise ValueError(
            f"{name} is the shape of one input sample without the batch dimension: channels,height,width for an "
            f"image model (e.g. 3,32,32) or the number of tokens for a text model (e.g. 128); got {text!r}"
        )
    return shape


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 28, 28)`` -> ``"1,28,28"``, as ``plan_input_shape`` records it."""
    return ",".join(str(int(v)) for v in shape)


def example_inputs_for(shape: Sequence[int], batch: int = 1) -> ExampleInputs:
    """Inputs of one sample's ``shape`` (``parse_shape``) to price multiply-adds on: an image batch (a tensor, fed
    positionally as timm and transformers vision models take it) or token ids with their attention mask (keyword
    inputs of a transformers text model). Values do not change multiply-adds: zeros."""
    shape = parse_shape(shape)
    if len(shape) == 3:
        return torch.zeros(batch, *shape)
    ids = torch.zeros(batch, shape[0], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sample_shape(sample: Mapping[str, object]) -> tuple[int, ...]:
    """One training example's input shape (``pixel_values`` of an image, ``input_ids`` of a text), for pricing."""
    for key in ("pixel_values", "input_ids"):
        value = sample.get(key) if isinstance(sample, Mapping) else None
        if value is not None:
            return tuple(torch.as_tensor(value).shape)
    keys = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
    raise ValueError(
        f"cannot read the input shape from a training example with {keys}: planning by multiply-adds needs "
        "'pixel_values' or 'input_ids' in the dataset's examples, or the shape given as plan_input_shape "
        "(e.g. --plan_input_shape 3,32,32)"
    )


@dataclass(frozen=True)
class MacsProfile:
    """Where a model spends its multiply-adds on inputs of one sample's shape (``compress``'s own count)."""

    input_shape: tuple[int, ...]
    positions: dict[str, int]  # layer name -> output positions per sample (0: the layer did not run)
    total: int  # multiply-adds of every Linear / Conv2d / HF Conv1D per sample

    @classmethod
    def measure(cls, model: nn.Module, input_shape: Sequence[int]) -> MacsProfile:
        """One forward pass (eval mode, no gradients; the model is left as it was) on ``input_shape`` inputs."""
        shape = parse_shape(input_shape)
        calls = trace_layers(model, example_inputs_for(shape))
        return cls(shape, {name: call.positions for name, call in calls.items()},
                   sum(call.macs for call in calls.values()))


# ---------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class CutBudget:
    """Remove ``reduction`` of ``total``: the whole model's parameters, or (with ``positions``) its multiply-adds."""

    reduction: float
    total: int
    positions: Mapping[str, int] | None = None  # layer name -> output positions; None: a parameter budget

    @classmethod
    def parameters(cls, reduction: float, model_parameters: int) -> CutBudget:
        return cls(reduction, model_parameters)

    @classmethod
    def macs(cls, reduction: float, profile: MacsProfile) -> CutBudget:
        return cls(reduction, profile.total, profile.positions)

    @property
    def rule(self) -> str:
        """The ``LowRankConfig`` field of the matching cut."""
        return RULES[self.positions is not None]

    @property
    def unit(self) -> str:
        return "multiply-adds" if self.positions is not None else "parameters"

    def at(self, reduction: float) -> CutBudget:
        """The same prices, another reduction (the projection's schedule grows it)."""
        return replace(self, reduction=reduction)

    def layer_costs(self, layers: list[tuple[str, nn.Module]]) -> tuple[list[int], list[int], list[int]]:
        """Full rank, cost per kept rank once factorised, and dense cost of each layer, in this budget's unit.

        A layer that did not run on the priced inputs costs nothing either way (``compress`` leaves it dense).
        """
        full, costs, dense = layer_shapes(layers)
        if self.positions is None:
            return full, costs, dense
        scale = [self.positions.get(name, 0) for name, _ in layers]
        return full, [c * n for c, n in zip(costs, scale, strict=True)], [d * n for d, n in zip(dense, scale, strict=True)]


def layer_shapes(layers: list[tuple[str, nn.Module]]) -> tuple[list[int], list[int], list[int]]:
    """Full rank, parameters per kept rank once factorised, and dense parameters, of each layer."""
    shapes = [out_in_weight(m).shape for _, m in layers]
    pairs = [(s[0], math.prod(s[1:])) for s in shapes]  # (out, in * kh * kw)
    return [min(o, f) for o, f in pairs], [o + f for o, f in pairs], [o * f for o, f in pairs]


def _priced(layers: list[tuple[str, nn.Module]], budget: CutBudget) -> tuple[list[int], list[int], list[int], list[int]]:
    """The indices of the layers the budget can cut (those that cost something) and their full ranks, costs, dense."""
    full, costs, dense = budget.layer_costs(layers)
    active = [i for i, d in enumerate(dense) if d > 0]
    return active, [full[i] for i in active], [costs[i] for i in active], [dense[i] for i in active]


def check_plan_budget(
    layers: list[tuple[str, nn.Module]],
    budget: CutBudget,
    name: str,
    rank_multiple: int = 1,
) -> None:
    """``budget`` (the option called ``name``) is a fraction the layers can give up, or a clear error."""
    p = budget.reduction
    check_fraction(p, name)
    check_count(rank_multiple, "rank_multiple")
    if not budget.total:
        raise ValueError(f"{name} needs the model's {budget.unit} (build it with .for_model(model, ...))")
    _, full, costs, dense = _priced(layers, budget)
    most = max_removable(full, costs, dense, rank_multiple=rank_multiple)
    if most < p * budget.total:
        multiple = f" with ranks in multiples of {rank_multiple}" if rank_multiple > 1 else ""
        raise ValueError(
            f"{name}={p} asks the penalised layers to lose {p * budget.total:,.0f} of the model's "
            f"{budget.total:,} {budget.unit}, but at most {most:,} can be removed from them{multiple}. Lower it, or "
            "penalise more layers (penalty_target_modules / penalty_skip_first_last=False)"
            + (", or plan and cut with a smaller rank multiple (the same for both: plan_rank_multiple / "
               "LowRankConfig.rank_multiple)." if rank_multiple > 1 else ".")
        )


def plan_ranks(
    layers: list[tuple[str, nn.Module]],
    budget: CutBudget,
    spectra: Sequence[Tensor] | None = None,
    rank_multiple: int = 1,
) -> list[int | None]:
    """The ranks the global allocation keeps at the current spectra (None: the layer stays dense).

    ``spectra`` are the layers' singular values when the caller already has them (one per layer, in order);
    ranks are rounded up to ``rank_multiple`` (capped at the full rank) as ``compress`` rounds them.
    """
    active, _, costs, dense = _priced(layers, budget)
    if spectra is None:
        spectra = [singular_values(weight_matrix(module)) for _, module in layers]
    kept = allocate_ranks([spectra[i] for i in active], costs, dense, budget.reduction * budget.total,
                          rank_multiple=rank_multiple)
    ranks: list[int | None] = [None] * len(layers)
    for i, rank in zip(active, kept, strict=True):
        ranks[i] = rank
    return ranks

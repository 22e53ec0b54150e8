"""``RankProjection``: train towards a low-rank cut by projecting the weights onto it, gradually.

A penalty only pulls the tail of each spectrum down; what it leaves (and what SGD noise keeps re-adding) is lost
when the model is cut, and in a short run it leaves a lot. Projection removes it exactly: every ``every``
optimizer steps, each penalised layer's weight is replaced by its truncated SVD at the rank that
``compress(model, LowRankConfig(param_reduction=p))`` would keep at the current spectra
(:func:`smooth_hf.training.cut_plan.plan_ranks`), and training carries on from there, so the network learns to do
its job with the weights the cut will keep (Trained Rank Pruning, Xu et al., 2019). The reduction grows from
0 at ``start`` to ``p`` at ``end`` (fractions of the training steps) on the cubic schedule of gradual pruning
(Zhu & Gupta, 2017): large cuts while the weights are still mostly their random initialisation, small ones once
they carry the function. A sudden cut to ``p`` midway through training does not recover (BENCHMARKS.md,
section 2). From ``end`` on, and always at the last step, the cut is the full ``p``: the trained model is
exactly of the planned ranks, and compressing it at ``p`` afterwards changes nothing, with no fine-tuning.

Independent of the Trainer, like :class:`~smooth_hf.SmoothnessPenalty`: a custom loop calls
``projection(step, max_steps)`` after each ``optimizer.step()``; :class:`~smooth_hf.SmoothTrainer` does it
from ``on_step_end`` when ``rank_projection_param_reduction`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.weights import out_in_weight, weight_matrix
from ..lowrank.decomposition import Decomposition, decompose_within, factors_from
from ..lowrank.targeting import PatternSpec, find_layers
from .cut_plan import check_plan_budget, plan_ranks

__all__ = ["RankProjection", "check_schedule", "project_to_rank_", "scheduled_reduction"]


def check_schedule(every: object, start: float, end: float, flag: str = "") -> None:
    """The projection's period (an integer >= 1) and window (``0 <= start <= end <= 1``), or a clear error."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{flag}rank_projection_every must be an integer >= 1, got {every!r}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(
            f"{flag}rank_projection_start and {flag}rank_projection_end are fractions of the training steps with "
            f"0 <= start <= end <= 1, got start={start!r}, end={end!r}"
        )


def scheduled_reduction(step: int, max_steps: int, target: float, start: float, end: float) -> float:
    """The cut at ``step`` of ``max_steps``: 0 before ``start``, ``target`` from ``end`` on, cubic in between.

    ``target * (1 - (1 - t)^3)`` with ``t`` the progress from ``start`` to ``end`` (fractions of ``max_steps``).
    """
    progress = step / max(1, max_steps)
    if progress >= end:
        return target
    if progress < start:
        return 0.0
    t = (progress - start) / (end - start)
    return target * (1.0 - (1.0 - t) ** 3)


@torch.no_grad()
def project_to_rank_(weight: torch.Tensor, rank: int, decomposition: Decomposition | None = None) -> None:
    """Replace ``weight`` (``(out, in, *kernel)``) in place by its best rank-``rank`` approximation.

    ``decomposition`` is ``decompose`` of this weight's ``(out, in*kh*kw)`` matrix when the caller already has it.
    """
    matrix = weight.reshape(weight.shape[0], -1)  # weight_matrix's layout, for a weight already in (out, in, ...)
    if rank >= min(matrix.shape):
        return
    up, down = factors_from(matrix, decomposition, rank, dtype=torch.float64)
    weight.copy_((up @ down).reshape(weight.shape).to(weight.dtype))


@dataclass
class RankProjection:
    """Project ``layers`` (``(name, module)`` pairs) onto the cut that removes ``param_reduction`` of the model."""

    layers: list[tuple[str, nn.Module]]
    param_reduction: float
    model_parameters: int
    every: int = 10
    start: float = 0.1
    end: float = 0.6
    rank_multiple: int = 1  # the planned ranks are rounded up to this, as LowRankConfig(rank_multiple=...) rounds them

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("rank projection has no layer to act on: check the target/exclude patterns")
        check_plan_budget(self.layers, self.param_reduction, self.model_parameters, "rank_projection_param_reduction",
                          self.rank_multiple)
        check_schedule(self.every, self.start, self.end)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        param_reduction: float,
        target_modules: PatternSpec = None,
        exclude_modules: PatternSpec = None,
        skip_first_last: bool = True,
        **options,
    ) -> RankProjection:
        """Project the layers ``find_layers`` picks; ``options``: ``every``, ``start``, ``end``, ``rank_multiple``."""
        from ..lowrank import count_parameters

        layers = find_layers(model, target_modules, exclude_modules, skip_first_last)
        return cls(layers, param_reduction, count_parameters(model), **options)

    def reduction_at(self, step: int, max_steps: int) -> float:
        return scheduled_reduction(step, max_steps, self.param_reduction, self.start, self.end)

    def __call__(self, step: int, max_steps: int) -> list[int | None] | None:
        """Project if ``step`` (the number of optimizer steps done) is due; the ranks kept, or None if not due."""
        due = step % self.every == 0 or step >= max_steps
        reduction = self.reduction_at(step, max_steps)
        if not due or reduction <= 0:
            return None
        # One decomposition per layer: its spectrum plans the cut (as compress plans it), its basis projects.
        decompositions, cached = [], 0
        for _, module in self.layers:  # bases kept within the same memory cap as compress's
            decompositions.append(decompose_within(weight_matrix(module), cached))
            cached += decompositions[-1].basis_bytes
        ranks = plan_ranks(self.layers, reduction, self.model_parameters, [d.singular_values for d in decompositions],
                           self.rank_multiple)
        for (_, module), rank, decomposition in zip(self.layers, ranks, decompositions, strict=True):
            if rank is not None:
                project_to_rank_(out_in_weight(module), rank, decomposition)
        return ranks

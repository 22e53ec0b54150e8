"""``RankProjection``: train towards a low-rank cut by projecting the weights onto it, gradually.

A penalty only pulls the tail of each spectrum down; what it leaves (and what SGD noise keeps re-adding) is lost
when the model is cut, and in a short run it leaves a lot. Projection removes it exactly: every ``every``
optimizer steps, each penalised layer's weight is replaced by its truncated SVD at the rank that
``compress(model, LowRankConfig(param_reduction=p))`` (or ``macs_reduction=p``: a compute budget) would keep at
the current spectra (:func:`smooth_hf.training.cut_plan.plan_ranks`), and training carries on from there, so the network learns to do
its job with the weights the cut will keep (Trained Rank Pruning, Xu et al., 2019). The reduction grows from
0 at ``start`` to ``p`` at ``end`` (fractions of the training steps) on the cubic schedule of gradual pruning
(Zhu & Gupta, 2017): large cuts while the weights are still mostly their random initialisation, small ones once
they carry the function. A sudden cut to ``p`` midway through training does not recover (BENCHMARKS.md,
section 2). From ``end`` on, and always at the last step, the cut is the full ``p``: the trained model is
exactly of the planned ranks, and compressing it at ``p`` afterwards changes nothing, with no fine-tuning.

``method="whitened"`` plans and projects in whitened space, for a cut that will be whitened
(``compress(..., LowRankConfig(method="whitened"))``): given the Gram matrices ``G`` of each layer's inputs on
recent training batches, each weight is replaced by its best rank-``r`` approximation *for those inputs*,
``U_r Σ_r R_r`` of :func:`smooth_hf.lowrank.whitening.whitened_decomposition` (the truncation that loses the least
output, ``||(W - W') X||``), and the ranks are allocated on the whitened spectra ``Σ``, as the whitened cut allocates
them. The trained weights are then exactly of rank ``r``, so the whitened cut with any calibration data keeps them as
they are.

On a model FSDP2 split across processes (``fully_shard``) the plan is made on the whole weights' spectra and each
process projects the rows it holds (:mod:`smooth_hf.training.sharded`); every process must call the projection.

Independent of the Trainer, like :class:`~smooth_hf.SmoothnessPenalty`: a custom loop calls
``projection(step, max_steps)`` after each ``optimizer.step()``; :class:`~smooth_hf.SmoothTrainer` does it
from ``on_step_end`` when ``rank_projection_param_reduction`` or ``rank_projection_macs_reduction`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.weights import out_in_weight, weight_matrix
from ..lowrank.decomposition import Decomposition, decompose_within, factors_from
from ..lowrank.targeting import PatternSpec, find_layers, is_plain_embedding
from ..lowrank.whitening import whitened_decomposition
from .cut_plan import CutBudget, MacsProfile, check_plan_budget, plan_ranks
from .sharded import project_block_, project_whitened_block_, spectra, whitened_spectra
from .shards import any_split, held

__all__ = ["METHODS", "RankProjection", "check_schedule", "project_to_rank_", "project_whitened_",
           "scheduled_reduction"]

METHODS = ("svd", "whitened")  # as LowRankConfig.method: how the later cut, and so the projection, truncates
WHITENING_DAMPING = 0.01  # LowRankConfig.whitening_damping's default: the whitened cut that follows uses it too


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


def _projected_weight(module: nn.Module) -> Tensor:
    """The view of ``module``'s weight that :func:`~smooth_hf.core.weights.weight_matrix` decomposes, in place: an
    embedding table transposed (``(dim, vocab)``), every other weight in ``(out, in, *kernel)`` layout."""
    return module.weight.t() if is_plain_embedding(module) else out_in_weight(module)


@torch.no_grad()
def project_whitened_(module: nn.Module, decomposition: tuple[Tensor, Tensor, Tensor], rank: int) -> None:
    """Replace ``module``'s weight in place by ``U_r diag(Σ_r) R_r``, its best rank-``rank`` approximation for the
    inputs whose Gram matrix gave ``decomposition`` (:func:`~smooth_hf.lowrank.whitening.whitened_decomposition` of
    ``weight_matrix(module)``)."""
    u, s, rows = decomposition
    if rank >= len(s):
        return
    weight = _projected_weight(module)
    approximation = (u[:, :rank] * s[:rank]) @ rows[:rank]
    weight.copy_(approximation.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


@dataclass
class RankProjection:
    """Project ``layers`` (``(name, module)`` pairs) onto the cut that removes ``budget`` of the model.

    ``budget`` is a :class:`~smooth_hf.training.cut_plan.CutBudget`: a fraction of the whole model's parameters, or of
    its multiply-adds on the inputs it will serve (:meth:`for_model` builds either).
    """

    layers: list[tuple[str, nn.Module]]
    budget: CutBudget
    every: int = 10
    start: float = 0.1
    end: float = 0.6
    rank_multiple: int = 1  # the planned ranks are rounded up to this, as LowRankConfig(rank_multiple=...) rounds them
    method: str = "svd"  # "whitened": planned and projected for the layers' inputs (calls need their Gram matrices)
    damping: float = WHITENING_DAMPING  # method="whitened": as LowRankConfig.whitening_damping

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("rank projection has no layer to act on: check the target/exclude patterns")
        if self.method not in METHODS:
            raise ValueError(f"rank projection method must be one of {', '.join(METHODS)}, got {self.method!r}: 'svd' "
                             "for a plain truncated-SVD cut, 'whitened' for a whitened (activation-aware) one")
        check_plan_budget(self.layers, self.budget, f"rank_projection_{self.budget.rule}", self.rank_multiple)
        check_schedule(self.every, self.start, self.end)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        param_reduction: float | None = None,
        target_modules: PatternSpec = None,
        exclude_modules: PatternSpec = None,
        skip_first_last: bool = True,
        *,
        macs_reduction: float | None = None,
        input_shape: tuple[int, ...] | str | None = None,
        embeddings: bool = False,
        **options,
    ) -> RankProjection:
        """Project the layers ``find_layers`` picks, for ``param_reduction`` of the parameters or ``macs_reduction`` of
        the multiply-adds on inputs of one sample's ``input_shape`` (e.g. ``(3, 32, 32)``; measured here by one
        forward pass). ``options``: ``every``, ``start``, ``end``, ``rank_multiple``."""
        from ..lowrank import count_parameters

        if (param_reduction is None) == (macs_reduction is None):
            raise ValueError("give one budget: param_reduction (fewer parameters) or macs_reduction (fewer "
                             "multiply-adds, with input_shape)")
        if macs_reduction is not None and input_shape is None:
            raise ValueError("macs_reduction prices multiply-adds on inputs: give input_shape, one sample's shape "
                             "(e.g. (3, 32, 32) for images, (128,) for 128 tokens)")
        layers = find_layers(model, target_modules, exclude_modules, skip_first_last, embeddings)
        budget = (CutBudget.parameters(param_reduction, count_parameters(model)) if macs_reduction is None
                  else CutBudget.macs(macs_reduction, MacsProfile.measure(model, input_shape)))
        return cls(layers, budget, **options)

    def reduction_at(self, step: int, max_steps: int) -> float:
        return scheduled_reduction(step, max_steps, self.budget.reduction, self.start, self.end)

    def is_due(self, step: int, max_steps: int) -> bool:
        """Whether ``step`` (the number of optimizer steps done) projects: a multiple of ``every``, or the last step,
        once the scheduled cut is above 0."""
        return (step % self.every == 0 or step >= max_steps) and self.reduction_at(step, max_steps) > 0

    def __call__(self, step: int, max_steps: int, grams: Mapping[str, Tensor] | None = None) -> list[int | None] | None:
        """Project if ``step`` (the number of optimizer steps done) is due; the ranks kept, or None if not due.

        ``grams``: ``method="whitened"`` only, each layer's input Gram matrix by name (``InputGrams.grams`` of
        :func:`smooth_hf.lowrank.whitening.collect_input_grams` on recent training batches; of an embedding, its token
        counts).
        """
        if not self.is_due(step, max_steps):
            return None
        budget = self.budget.at(self.reduction_at(step, max_steps))
        if self.method == "whitened":
            return self._project_whitened(budget, grams)
        if any_split(self.layers):
            return self._project_split(budget)
        # One decomposition per layer: its spectrum plans the cut (as compress plans it), its basis projects.
        decompositions, cached = [], 0
        for _, module in self.layers:  # bases kept within the same memory cap as compress's
            decompositions.append(decompose_within(weight_matrix(module), cached))
            cached += decompositions[-1].basis_bytes
        ranks = plan_ranks(self.layers, budget, [d.singular_values for d in decompositions], self.rank_multiple)
        for (_, module), rank, decomposition in zip(self.layers, ranks, decompositions, strict=True):
            if rank is not None:
                project_to_rank_(_projected_weight(module), rank, decomposition)
        return ranks

    def _project_whitened(self, budget: CutBudget, grams: Mapping[str, Tensor] | None) -> list[int | None]:
        missing = [name for name, _ in self.layers if grams is None or name not in grams]
        if missing:
            raise ValueError(
                f"whitened rank projection needs the input Gram matrix of every projected layer; none for "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. Collect them on recent training "
                "batches (smooth_hf.lowrank.whitening.collect_input_grams) over these layers, or project with method "
                "'svd'."
            )
        if any_split(self.layers):
            return self._project_split(budget, grams)
        # One whitened decomposition per layer: its spectrum (the output error profile) plans, its factors project.
        decompositions = [whitened_decomposition(weight_matrix(module), grams[name], self.damping)
                          for name, module in self.layers]
        ranks = plan_ranks(self.layers, budget, [d[1] for d in decompositions], self.rank_multiple)
        for (_, module), rank, decomposition in zip(self.layers, ranks, decompositions, strict=True):
            if rank is not None:
                project_whitened_(module, decomposition, rank)
        return ranks

    def _project_split(self, budget: CutBudget, grams: Mapping[str, Tensor] | None = None) -> list[int | None]:
        """Weights that FSDP2 split across processes: planned on the whole weights' spectra, and each process projects
        its own block (:mod:`smooth_hf.training.sharded`); ``grams`` for ``method="whitened"``."""
        names = [name for name, _ in self.layers]
        helds = [held(module, name) for name, module in self.layers]
        found = spectra(helds) if grams is None else \
            whitened_spectra(helds, [grams[name] for name in names], self.damping, names)
        ranks = plan_ranks(self.layers, budget, [s.values for s in found], self.rank_multiple)
        for spectrum, rank in zip(found, ranks, strict=True):
            if rank is not None:
                (project_block_ if grams is None else project_whitened_block_)(spectrum, rank)
        return ranks

"""Planning a cut: which layers can be factorised, and the rank each keeps; decided before any module changes.

Shared by the two ways :func:`~smooth_hf.lowrank.compress` works -- the whole model at once
(:mod:`~smooth_hf.lowrank.compress`) and one block at a time (:mod:`~smooth_hf.lowrank.streaming`) -- so that both
classify the same layers, choose the same ranks and report the same rows:

1. :func:`classify`: every supported layer gets a report row; the targeted ones that can be cut become
   :class:`Candidate` s (a grouped conv, a tied weight, a layer managed by hooks stay dense, with their status);
2. the caller gives each candidate its spectrum (the weight's, or the whitened one);
3. :func:`decide_ranks`: one rank (or dense) per candidate, by the config's rule, over the whole model;
4. :func:`record`: the rows of the factorised layers, and :func:`finish` the config saved with the model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.batches import model_device
from ..core.weights import check_real_weight, weight_matrix
from .allocation import allocate_ranks, energy_kept, finalize_rank, max_removable, rank_for_energy, rank_for_ratio
from .base import LowRankLayer
from .config import LowRankConfig
from .cost import LayerCall, describe_inputs, macs_per_rank
from .decomposition import Decomposition
from .diagnosis import budget_advice, describe, unfactorisable_weights
from .report import (
    STATUS_DENSE_EXCLUDED,
    STATUS_DENSE_GROUPED,
    STATUS_DENSE_HOOKED,
    STATUS_DENSE_NO_GAIN,
    STATUS_DENSE_NOT_RUN,
    STATUS_DENSE_READ_BY_PARENT,
    STATUS_DENSE_SLOWER,
    STATUS_DENSE_TIED,
    STATUS_FACTORISED,
    LayerReport,
    count_parameters,
)
from .targeting import find_layers, layer_kind
from .timing import LayerTimer, default_rank_multiple, drop_slower_layers, median_latency

__all__ = ["Candidate", "Plan", "classify", "decide_ranks", "finish", "record", "warn_if_nothing_factorised"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A targeted layer that may be factorised, with what the rank rules need."""

    name: str
    module: nn.Module
    kind: str
    shape: tuple[int, int, int, int]
    positions: int | None = None  # output positions on example_inputs (None: no example inputs)
    decomposition: Decomposition | None = None  # of the weight; None when the spectrum is a whitened one
    whitened_spectrum: torch.Tensor | None = None  # method="whitened": singular values of W S
    # rank_allocation="sensitivity": the model-output loss of dropping each component (allocated in absolute terms)
    marginal_losses: np.ndarray | None = None

    @property
    def spectrum(self) -> torch.Tensor:  # float64 singular values, descending
        if self.whitened_spectrum is not None:
            return self.whitened_spectrum
        return self.decomposition.singular_values

    @property
    def full_rank(self) -> int:
        return len(self.spectrum)

    @property
    def cost_per_rank(self) -> int:
        out, inp, kh, kw = self.shape
        return inp * kh * kw + out

    @property
    def dense_params(self) -> int:
        out, inp, kh, kw = self.shape
        return out * inp * kh * kw

    @property
    def largest_paying_rank(self) -> int:
        """The largest rank at which factorising removes parameters: no rule ever keeps more."""
        out, inp, kh, kw = self.shape
        return min(out, inp * kh * kw, math.ceil(self.dense_params / self.cost_per_rank) - 1)


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Parameters reachable under several names: replacing one owner would silently untie them."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def _managed_by_hooks(module: nn.Module) -> bool:
    """Whether the layer's hooks depend on what a factorised layer would not have.

    The old ``torch.nn.utils.weight_norm`` (and ``spectral_norm``, ``prune``) keep ``weight`` as a plain attribute
    that a forward pre-hook recomputes: between a ``load_state_dict`` and the next forward it is stale, and the hook
    needs the dense layer's tensors. Sub-modules (a quantization observer, ``activation_post_process``) are read by
    hooks too. A parametrized weight (``torch.nn.utils.parametrizations``) is computed when read: cut as usual.
    """
    parametrized = parametrize.is_parametrized(module, "weight")
    stale = "weight" not in module._parameters and not parametrized
    return stale or any(name != "parametrizations" for name in module._modules)


def _read_by_parent(model: nn.Module) -> set[str]:
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def classify(
    model: nn.Module, config: LowRankConfig, calls: dict[str, LayerCall] | None = None
) -> tuple[dict[str, LayerReport], list[Candidate]]:
    """A report row for every supported layer (registration order), and the targeted layers that can be cut.

    Candidates have no spectrum yet. ``calls`` (from ``trace_layers`` on example inputs) gives each one its output
    positions. Raises ValueError for a candidate on the meta device or with NaN/Inf weights: nothing is cut then.
    """
    embeddings = config.factorise_embeddings
    targets = dict(find_layers(model, config.target_modules, config.exclude_modules, config.skip_first_last, embeddings))
    tied, read_by_parent = _tied_weight_ids(model), _read_by_parent(model)
    rows: dict[str, LayerReport] = {}
    candidates: list[Candidate] = []
    for name, module in find_layers(model, embeddings=embeddings):
        kind = layer_kind(module, embeddings)
        status = None
        if name not in targets:
            status = STATUS_DENSE_EXCLUDED
        elif kind == "conv2d" and module.groups != 1:
            status = STATUS_DENSE_GROUPED
        elif any(id(p) in tied for p in module.parameters()):  # weight or bias shared
            status = STATUS_DENSE_TIED
        elif name in read_by_parent:
            status = STATUS_DENSE_READ_BY_PARENT
        elif _managed_by_hooks(module):
            status = STATUS_DENSE_HOOKED
        rows[name] = LayerReport.dense(name, module, kind, status or "")
        if status is not None:
            continue
        check_real_weight(name, weight_matrix(module).detach(), "compressed")
        positions = None if calls is None else calls[name].positions
        candidates.append(Candidate(name, module, kind, rows[name].shape, positions))
    return rows, candidates


def _choose_ranks(
    candidates: list[Candidate], config: LowRankConfig, total: int, advice: Callable[[], str] = str
) -> list[int | None]:
    """One rank (or ``None``: dense) per candidate; ``total`` is the whole model's parameters or multiply-adds.

    ``advice()`` says what can raise the reachable parameter reduction (appended to that error).
    """
    if config.param_reduction is not None or config.macs_reduction is not None:
        by_macs = config.macs_reduction is not None
        rule, reduction = ("macs_reduction", config.macs_reduction) if by_macs else ("param_reduction", config.param_reduction)
        unit = "multiply-adds" if by_macs else "parameters"
        # Parameters and multiply-adds differ only by each layer's output positions (1 for parameters).
        scale = [c.positions if by_macs else 1 for c in candidates]
        costs = [c.cost_per_rank * n for c, n in zip(candidates, scale, strict=True)]
        dense = [c.dense_params * n for c, n in zip(candidates, scale, strict=True)]
        target = reduction * total
        most = max_removable([c.full_rank for c in candidates], costs, dense, config.min_rank, config.rank_multiple)
        if most < target:
            largest = math.floor(most / total * 1000) / 1000  # rounded down: a value the user can pass
            raise ValueError(
                f"{rule}={reduction} asks to remove {target:,.0f} of {total:,} {unit}, but with these targets at most "
                f"{most:,} ({most / total:.1%} of the model) can be removed, even with every factorisable layer at "
                f"min_rank={config.min_rank}. Lower {rule} to at most {largest:.3f}."
                + (
                    " Or widen target_modules / exclude fewer modules / lower min_rank or rank_multiple."
                    if by_macs
                    else (f" {hint}" if (hint := advice()) else "")
                )
            )
        measured = config.rank_allocation == "sensitivity"
        return allocate_ranks(
            [np.sqrt(c.marginal_losses) if measured else c.spectrum for c in candidates],
            costs,
            dense,
            target,
            min_rank=config.min_rank,
            rank_multiple=config.rank_multiple,
            relative=not measured,
        )
    ranks = []
    for c in candidates:
        if config.rank_ratio is not None:
            kept = rank_for_ratio(c.full_rank, config.rank_ratio)
        else:
            kept = rank_for_energy(c.spectrum, config.energy)
        ranks.append(
            finalize_rank(kept, c.full_rank, c.cost_per_rank, c.dense_params, config.min_rank, config.rank_multiple)
        )
    return ranks


# A cut that discards less than this fraction of a layer's energy (a relative error under 0.3%) removes what float
# rounding left of an exactly low-rank weight (fp16 and bf16 copies included), not what the model learned.
_ROUND_OFF_ENERGY = 1e-5


def _warn_if_rounding_cuts_kept_ranks(
    candidates: list[Candidate],
    ranks: list[int | None],
    ranks_in_any_rank: Callable[[], list[int | None]],
    rank_multiple: int,
) -> None:
    """Warn when ``rank_multiple`` turns an exact cut into a lossy one (a budget rule, ``rank_multiple > 1``).

    A model trained for this cut (rank projection planned in multiples of 1) is exactly low rank at the budget: a
    cut in any rank removes only zeros. Rounding ranks up spends parameters that the budget then takes from other
    layers, below the rank their weights have, which silently costs accuracy.
    """

    def lost(c: Candidate, rank: int | None) -> float:
        return 1.0 - energy_kept(c.spectrum, rank)

    worst, name = max((lost(c, r), c.name) for c, r in zip(candidates, ranks, strict=True)) if candidates else (0, "")
    if worst <= _ROUND_OFF_ENERGY:
        return
    # Ranks in any multiple reach at least the same reduction, so this allocation cannot fail where the other did not.
    if any(lost(c, r) > _ROUND_OFF_ENERGY for c, r in zip(candidates, ranks_in_any_rank(), strict=True)):
        return  # the cut is lossy anyway: the rounding is not what loses accuracy
    logger.warning(
        "compress: the model is exactly low rank at this budget (trained for this cut, e.g. by rank projection): a cut "
        "in any rank would remove only zero singular values. rank_multiple=%d rounds ranks up and pays for it by "
        "cutting some layers below the rank their weights have (%s loses %.2f%% of its energy), which costs accuracy. "
        "Compress with rank_multiple=1 to keep the model exact, or train with plan_rank_multiple=%d (docs/training.md, "
        "\"Training for a cut\").",
        rank_multiple, name, 100 * worst, rank_multiple,
    )


def decide_ranks(
    model: nn.Module,
    config: LowRankConfig,
    rows: dict[str, LayerReport],
    candidates: list[Candidate],
    calls: dict[str, LayerCall] | None,
    build: Callable[[Candidate, int], LowRankLayer] | None = None,
    layer_timer: LayerTimer | None = None,
) -> tuple[LowRankConfig, dict[str, int | None]]:
    """The rank of every candidate (``None``: it stays dense), once every candidate has its spectrum.

    Returns the config with ``rank_multiple`` resolved (recorded with the model) and the ranks. Rows of layers that
    stay dense get their status. ``build(candidate, rank)`` makes a factorised layer, for ``keep_slower_dense``
    (which times each layer at the ranks it may get).
    """
    if config.rank_multiple is None:  # resolved now, and recorded in the saved config
        config = replace(config, rank_multiple=default_rank_multiple(model_device(model)))
    if config.macs_reduction is not None:  # a layer that did not run costs no compute: nothing to allocate
        for c in candidates:
            if not c.positions:
                rows[c.name].status = STATUS_DENSE_NOT_RUN
        candidates = [c for c in candidates if c.positions]
    total = sum(call.macs for call in calls.values()) if config.macs_reduction is not None else count_parameters(model)
    excluded = [r for r in rows.values() if r.status == STATUS_DENSE_EXCLUDED]

    def advice() -> str:
        return budget_advice(
            model, sum(r.params_before for r in excluded), len(excluded), config.min_rank, config.rank_multiple,
            config.factorise_embeddings,
        )

    def choose(dense: frozenset[str]) -> dict[str, int | None]:
        active = [c for c in candidates if c.name not in dense]
        ranks = dict(zip([c.name for c in active], _choose_ranks(active, config, total, advice), strict=True))
        return {c.name: ranks.get(c.name) for c in candidates}

    if config.keep_slower_dense:
        by_name = {c.name: c for c in candidates}
        layers = {c.name: c.module for c in candidates}
        ranks, slower = drop_slower_layers(choose, layers, lambda name, rank: build(by_name[name], rank), calls,
                                           layer_timer or median_latency)
    else:
        ranks, slower = choose(frozenset()), {}
        if config.rank_multiple > 1 and (config.param_reduction is not None or config.macs_reduction is not None):
            _warn_if_rounding_cuts_kept_ranks(
                candidates, [ranks[c.name] for c in candidates],
                lambda: _choose_ranks(candidates, replace(config, rank_multiple=1), total, advice), config.rank_multiple,
            )
    for c in candidates:
        if ranks[c.name] is None:
            rows[c.name].status = STATUS_DENSE_SLOWER if c.name in slower else STATUS_DENSE_NO_GAIN
    return config, ranks


def record(row: LayerReport, candidate: Candidate, rank: int, layer: LowRankLayer) -> None:
    """Fill the report row of a layer factorised at ``rank`` as ``layer``."""
    row.rank, row.status = rank, STATUS_FACTORISED
    row.params_after = sum(p.numel() for p in layer.parameters())
    row.energy_kept = energy_kept(candidate.spectrum, rank)


@dataclass
class Plan:
    """Everything ``compress`` decided (the whole-model path also builds every replacement before any swap)."""

    config: LowRankConfig
    params_before: int
    rows: dict[str, LayerReport]  # one per supported layer, in registration order
    replacements: dict[str, LowRankLayer]  # the factorised layers, ready to swap in
    macs_before: int | None = None  # on example_inputs (None: none given)
    macs_after: int | None = None
    macs_inputs: str | None = None  # the example inputs' shapes


def warn_if_nothing_factorised(model: nn.Module, config: LowRankConfig, candidates: int) -> None:
    """Say why no layer was factorised, naming the weights smooth_hf cannot factorise."""
    blocked = unfactorisable_weights(model, config.factorise_embeddings)
    logger.warning(
        "compress: no layer was factorised (%d candidate layers, none where the rule keeps a rank that removes "
        "parameters)%s",
        candidates,
        f"; weights smooth_hf cannot factorise: {describe(blocked)}" if blocked else "",
    )


def finish(
    config: LowRankConfig,
    params_before: int,
    rows: dict[str, LayerReport],
    calibration_samples: int | None,
    calls: dict[str, LayerCall] | None,
    example_inputs: object = None,
) -> Plan:
    """The plan's record: the config saved with the model (every factorised layer's rank, the calibration size) and
    the multiply-adds before and after on the example inputs."""
    factorised = [name for name, row in rows.items() if row.status == STATUS_FACTORISED]
    saved = copy.deepcopy(config)
    saved.ranks = {name: rows[name].rank for name in factorised}
    saved.calibration_samples = calibration_samples
    plan = Plan(saved, params_before, rows, {})
    if calls is not None:
        plan.macs_before = sum(call.macs for call in calls.values())
        plan.macs_after = plan.macs_before - sum(
            calls[name].macs - rows[name].rank * macs_per_rank(rows[name].shape, calls[name].positions)
            for name in factorised
        )
        plan.macs_inputs = describe_inputs(example_inputs)
    return plan

"""Replace dense layers by truncated-SVD factorisations, in place, with no fine-tuning.

``compress`` never leaves a model half compressed: it first *plans* without touching the model (checks
every targeted layer, takes its singular values, chooses every rank, builds every replacement), and
only when all of that succeeded does it swap the modules in; a swap that fails half way is undone.
Any error on the way (NaN weights, an unreachable budget, an SVD failure) leaves the model exactly as
it was. BatchNorm repair is a separate step that ``compress`` runs after the swap when asked
(:mod:`smooth_hf.lowrank.batchnorm`); :func:`smooth_hf.evaluation.sweep.budget_sweep` composes the same two steps.

Parameters are counted as in :func:`~smooth_hf.lowrank.report.count_parameters` (unique, whole model).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.batches import model_device
from ..core.weights import weight_matrix
from . import batchnorm as _batchnorm
from .allocation import allocate_ranks, energy_kept, finalize_rank, max_removable, rank_for_energy, rank_for_ratio
from .base import LowRankLayer
from .config import LowRankConfig
from .cost import ExampleInputs, describe_inputs, macs_per_rank, trace_layers
from .decomposition import Decomposition, decompose_within
from .diagnosis import budget_advice, describe, unfactorisable_weights
from .layers import factorise
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
    CompressionReport,
    LayerReport,
    count_parameters,
)
from .structure import replace_module
from .targeting import find_layers, layer_kind
from .timing import LayerTimer, default_rank_multiple, drop_slower_layers, median_latency
from .whitening import InputGrams, Whitening

__all__ = [
    "CompressionReport",
    "LayerReport",
    "STATUS_DENSE_EXCLUDED",
    "STATUS_DENSE_GROUPED",
    "STATUS_DENSE_HOOKED",
    "STATUS_DENSE_NO_GAIN",
    "STATUS_DENSE_NOT_RUN",
    "STATUS_DENSE_READ_BY_PARENT",
    "STATUS_DENSE_SLOWER",
    "STATUS_DENSE_TIED",
    "STATUS_FACTORISED",
    "compress",
    "register_on_compressed",
    "count_parameters",
]

logger = logging.getLogger(__name__)

DATA_FREE = "data_free"

# Called with every model ``compress`` has just cut, so that a library's own save records the low-rank structure:
# smooth_hf.integrations.transformers registers one for transformers models. The engine imports no integration.
_ON_COMPRESSED: list[Callable[[nn.Module], None]] = []


def register_on_compressed(hook: Callable[[nn.Module], None]) -> None:
    """Run ``hook(model)`` after every successful :func:`compress` (once per hook, whatever the registrations)."""
    if hook not in _ON_COMPRESSED:
        _ON_COMPRESSED.append(hook)

@dataclass
class _Candidate:
    """A targeted layer that may be factorised, with what the rank rules need."""

    name: str
    module: nn.Module
    kind: str
    shape: tuple[int, int, int, int]
    decomposition: Decomposition | None  # of the weight; None when the spectrum is a whitened one
    positions: int | None = None  # output positions on example_inputs (None: no example inputs)
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


def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def _choose_ranks(
    candidates: list[_Candidate], config: LowRankConfig, total: int, advice: Callable[[], str] = str
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
    candidates: list[_Candidate],
    ranks: list[int | None],
    ranks_in_any_rank: Callable[[], list[int | None]],
    rank_multiple: int,
) -> None:
    """Warn when ``rank_multiple`` turns an exact cut into a lossy one (a budget rule, ``rank_multiple > 1``).

    A model trained for this cut (rank projection planned in multiples of 1) is exactly low rank at the budget: a
    cut in any rank removes only zeros. Rounding ranks up spends parameters that the budget then takes from other
    layers, below the rank their weights have, which silently costs accuracy.
    """

    def lost(c: _Candidate, rank: int | None) -> float:
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
        "Compress with rank_multiple=1 to keep the model exact, or train with plan_rank_multiple=%d (README, "
        "\"Training for a cut\").",
        rank_multiple, name, 100 * worst, rank_multiple,
    )


@dataclass
class _Plan:
    """Everything ``compress`` decided, computed without touching the model."""

    config: LowRankConfig
    params_before: int
    rows: dict[str, LayerReport]  # one per supported layer, in registration order
    replacements: dict[str, LowRankLayer]  # the factorised layers, ready to swap in
    macs_before: int | None = None  # on example_inputs (None: none given)
    macs_after: int | None = None
    macs_inputs: str | None = None  # the example inputs' shapes


def _check_not_compressed(model: nn.Module) -> None:
    already = [name for name, m in model.named_modules() if isinstance(m, LowRankLayer)]
    if already:
        raise ValueError(
            f"model is already compressed (low-rank layers: {', '.join(already[:5])}"
            f"{', ...' if len(already) > 5 else ''}); compress the dense model instead, or reload a compressed "
            "checkpoint with apply_ranks"
        )


def _plan(
    model: nn.Module,
    config: LowRankConfig,
    example_inputs: ExampleInputs | None = None,
    layer_timer: LayerTimer | None = None,
    whitening: Whitening | None = None,
) -> _Plan:
    """Classify every supported layer, take the candidates' spectra, choose ranks, build the replacements.

    With ``whitening`` (``method="whitened"``) the spectra are those of ``W S`` (the output error on the
    calibration inputs) and the factors its truncation; otherwise the weight's own decomposition.
    """
    calls = trace_layers(model, example_inputs) if example_inputs is not None else None
    embeddings = config.factorise_embeddings
    targets = dict(find_layers(model, config.target_modules, config.exclude_modules, config.skip_first_last, embeddings))
    tied, read_by_parent = _tied_weight_ids(model), _read_by_parent(model)
    params_before = count_parameters(model)
    rows: dict[str, LayerReport] = {}
    candidates: list[_Candidate] = []
    cached = 0  # bytes of singular vectors kept
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
        shape = rows[name].shape
        if status is not None:
            continue
        matrix = weight_matrix(module).detach()
        if matrix.device.type == "meta":
            raise ValueError(f"layer {name!r} is on the meta device: load real weights before compressing")
        if not torch.isfinite(matrix).all():
            raise ValueError(
                f"layer {name!r} has NaN or Inf weights; nothing was compressed. Fix or exclude the layer "
                "(exclude_modules) before compressing."
            )
        positions = None if calls is None else calls[name].positions
        # ---- method hook 1/2: the spectrum the rank rules read
        if whitening is not None:
            candidates.append(_Candidate(name, module, kind, shape, None, positions, whitening.spectrum(name, matrix)))
            continue
        decomposition = decompose_within(matrix, cached)
        cached += decomposition.basis_bytes
        candidates.append(_Candidate(name, module, kind, shape, decomposition, positions))

    if config.rank_multiple is None:  # resolved now, and recorded in the saved config
        config = replace(config, rank_multiple=default_rank_multiple(model_device(model)))
    if config.macs_reduction is not None:  # a layer that did not run costs no compute: nothing to allocate
        for c in candidates:
            if not c.positions:
                rows[c.name].status = STATUS_DENSE_NOT_RUN
        candidates = [c for c in candidates if c.positions]
    total = sum(call.macs for call in calls.values()) if config.macs_reduction is not None else params_before
    if config.rank_allocation == "sensitivity":  # before any factor is built: it truncates with the same SVDs
        losses = whitening.sensitivity(model, {c.name: (c.module, c.cost_per_rank, c.dense_params) for c in candidates})
        for c in candidates:
            c.marginal_losses = losses[c.name]
    built: dict[tuple[str, int], LowRankLayer] = {}
    by_name = {c.name: c for c in candidates}

    def build(c: _Candidate, rank: int) -> LowRankLayer:
        if (c.name, rank) not in built:  # ---- method hook 2/2: the factors
            factors = whitening.factors(c.name, rank, c.module.weight.dtype) if whitening is not None else None
            built[c.name, rank] = factorise(c.module, rank, factors=factors, decomposition=c.decomposition)
        return built[c.name, rank]

    excluded = [r for r in rows.values() if r.status == STATUS_DENSE_EXCLUDED]

    def advice() -> str:
        return budget_advice(
            model, sum(r.params_before for r in excluded), len(excluded), config.min_rank, config.rank_multiple,
            embeddings,
        )

    def choose(dense: frozenset[str]) -> dict[str, int | None]:
        active = [c for c in candidates if c.name not in dense]
        ranks = dict(zip([c.name for c in active], _choose_ranks(active, config, total, advice), strict=True))
        return {c.name: ranks.get(c.name) for c in candidates}

    if config.keep_slower_dense:
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

    replacements: dict[str, LowRankLayer] = {}
    for c in candidates:
        rank, row = ranks[c.name], rows[c.name]
        if rank is None:
            row.status = STATUS_DENSE_SLOWER if c.name in slower else STATUS_DENSE_NO_GAIN
            continue
        replacements[c.name] = build(c, rank)
        row.rank, row.status = rank, STATUS_FACTORISED
        row.params_after = _layer_params(replacements[c.name])
        row.energy_kept = energy_kept(c.spectrum, rank)
    if whitening is not None:
        whitening.release()  # every factor is built: the float64 decompositions are not needed any more
    if not replacements:
        blocked = unfactorisable_weights(model, embeddings)
        logger.warning(
            "compress: no layer was factorised (%d candidate layers, none where the rule keeps a rank that removes "
            "parameters)%s",
            len(candidates),
            f"; weights smooth_hf cannot factorise: {describe(blocked)}" if blocked else "",
        )
    saved = copy.deepcopy(config)
    saved.ranks = {name: rows[name].rank for name in replacements}
    saved.calibration_samples = whitening.grams.samples if whitening is not None else None
    plan = _Plan(saved, params_before, rows, replacements)
    if calls is not None:
        plan.macs_before = sum(call.macs for call in calls.values())
        plan.macs_after = plan.macs_before - sum(
            calls[name].macs - rows[name].rank * macs_per_rank(rows[name].shape, calls[name].positions)
            for name in replacements
        )
        plan.macs_inputs = describe_inputs(example_inputs)
    return plan


def _apply(model: nn.Module, plan: _Plan) -> None:
    """Swap the replacements in and record ``lowrank_config`` / ``lowrank_report``; all or nothing."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in plan.replacements.items():
            originals[name] = model.get_submodule(name)
            replace_module(model, name, new)
        params_after = count_parameters(model)
        expected = plan.params_before - sum(r.params_before - r.params_after for r in plan.rows.values())
        if params_after != expected:
            raise RuntimeError(
                f"compress: the model has {params_after:,} parameters after the swap but {expected:,} were planned, "
                "so a replaced layer shares parameters in a way compress did not detect. The model was restored; "
                "keep the shared layers dense (exclude_modules) and please report the model."
            )
    except BaseException:
        for name, old in originals.items():
            model.set_submodule(name, old)
        raise
    model.lowrank_config = plan.config
    model.lowrank_report = CompressionReport(
        plan.params_before, params_after, list(plan.rows.values()), macs_before=plan.macs_before,
        macs_after=plan.macs_after, macs_inputs=plan.macs_inputs,
    )


BatchNormRepair = Iterable[Any] | str | _batchnorm.DataFreeRecalibration | None


def _check_batchnorm_repair(how: BatchNormRepair) -> Iterable[Any] | _batchnorm.DataFreeRecalibration | None:
    """``how`` with ``"data_free"`` resolved; checked before any work so a typo costs nothing."""
    if isinstance(how, str | bytes):
        if how != DATA_FREE:
            raise ValueError(
                f"recalibrate_batchnorm={how!r}: give None, an iterable of training batches, or "
                f"{DATA_FREE!r} (synthetic inputs, no data needed)"
            )
        return _batchnorm.DataFreeRecalibration()
    return how


def _prepare_batchnorm_repair(
    model: nn.Module, how: Iterable[Any] | _batchnorm.DataFreeRecalibration | None
) -> Callable[[nn.Module], Any] | None:
    """The repair to run after the cut, prepared on the *dense* model (data-free inputs come from its statistics)."""
    if how is None:
        return None
    if not _batchnorm.batchnorm_layers(model):
        logger.warning("recalibrate_batchnorm was given but the model has no BatchNorm layer; skipped")
        return None
    if isinstance(how, _batchnorm.DataFreeRecalibration):
        return how.prepare(model)
    return lambda m: _batchnorm.recalibrate_batchnorm(m, how)


def compress(
    model: nn.Module,
    config: LowRankConfig,
    *,
    calibration_data: Iterable[Any] | InputGrams | None = None,
    example_inputs: ExampleInputs | None = None,
    layer_timer: LayerTimer | None = None,
    recalibrate_batchnorm: BatchNormRepair = None,
) -> nn.Module:
    """Factorise the targeted layers of ``model`` in place by truncated SVD; no fine-tuning.

    Layers are replaced at the same module names by :class:`LowRankLinear` / :class:`LowRankConv2d`,
    so the model's forward is unchanged and its state dict gains ``<name>.down.weight``,
    ``<name>.up.weight``, ``<name>.up.bias`` in place of ``<name>.weight``/``<name>.bias``.
    Grouped convolutions, tied weights and layers where factorising would not remove parameters stay
    dense. See :class:`LowRankConfig` for the rank rules.

    Args:
        calibration_data: for ``config.method="whitened"`` (required there, refused otherwise): batches
            as the trainer uses them -- dicts passed as ``model(**batch)`` for transformers models,
            ``{"pixel_values": ...}`` dicts or image tensors for timm / plain image models; a few hundred
            samples are enough. The model runs on them in eval mode, hooks sum each targeted layer's input
            Gram matrix, and every layer is cut where it loses the least *on those inputs*, with the budget
            allocated by that loss (:mod:`smooth_hf.lowrank.whitening`). An
            :class:`~smooth_hf.lowrank.whitening.InputGrams` from :func:`~smooth_hf.lowrank.whitening.calibrate`
            reuses statistics already collected (compressing copies at several budgets).
        example_inputs: inputs for one forward pass, as the model is called in deployment (shape and
            batch size matter, values do not): a tensor, a tuple of positional arguments, or a dict of
            keyword arguments (a tokenizer's output). Needed by ``macs_reduction`` (each rank is priced
            in multiply-adds at its layer's output resolution) and ``keep_slower_dense`` (each layer is
            timed on its own input shape); with any rule, the report then records the multiply-adds
            before and after (:mod:`smooth_hf.lowrank.cost` says what is counted). The pass runs in
            eval mode without gradients and changes nothing in the model.
        layer_timer: ``(module, input) -> seconds`` used by ``keep_slower_dense`` instead of
            :func:`smooth_hf.lowrank.timing.median_latency`, e.g. to time the runtime you deploy on.
        recalibrate_batchnorm: ``None`` (off), an iterable of training batches, or ``"data_free"``
            / a :class:`smooth_hf.lowrank.batchnorm.DataFreeRecalibration`. After the cut, BatchNorm running
            statistics are re-estimated on the batches (:func:`smooth_hf.lowrank.batchnorm.recalibrate_batchnorm`),
            which often recovers much of the accuracy lost to truncation without changing a weight.
            The data-free form needs no data: before the cut, inputs are synthesised from the dense
            model's own BatchNorm statistics (:func:`smooth_hf.lowrank.batchnorm.synthesize_batchnorm_inputs`;
            ``"data_free"`` uses the model's configured input shape); after it, each running statistic
            moves by the change the cut made on those inputs
            (:func:`smooth_hf.lowrank.batchnorm.shift_batchnorm_statistics`).

    Returns:
        ``model``, with ``model.lowrank_config`` (a copy of ``config`` with ``ranks`` filled, what
        :func:`apply_ranks` needs to rebuild the structure) and ``model.lowrank_report``
        (a :class:`CompressionReport`).

    Raises:
        ValueError: the model is already compressed, a targeted weight has NaN/Inf, the
            ``param_reduction`` / ``macs_reduction`` budget cannot be reached (with ``keep_slower_dense``:
            without the layers kept dense for speed), ``example_inputs`` is missing for a rule that
            needs it, or the calibration data are missing, empty, not what the model takes, or not finite.
            The model is untouched in every case.
        RuntimeError: the swapped-in layers do not hold the planned parameter count (a sharing
            compress did not detect); the swap is undone, so the model is untouched here too.
            (BatchNorm recalibration runs after the cut: if it fails, the model stays compressed with
            its previous BatchNorm statistics and ``batchnorm_recalibrated=False``.)
    """
    if not isinstance(config, LowRankConfig):
        raise TypeError(
            f"config must be a LowRankConfig, got {type(config).__name__}: pass e.g. LowRankConfig(param_reduction=0.7)"
        )
    _check_not_compressed(model)
    needs_inputs = [name for name in ("macs_reduction", "keep_slower_dense") if getattr(config, name) not in (None, False)]
    if config.factorise_embeddings and example_inputs is not None:
        raise ValueError("factorise_embeddings does not count multiply-adds: compress without example_inputs")
    if needs_inputs and example_inputs is None:
        raise ValueError(
            f"{' and '.join(needs_inputs)} need example inputs: call compress(model, config, example_inputs=...) with "
            "a batch shaped like the ones the model will serve, e.g. torch.randn(1, 3, 32, 32) or "
            "tokenizer(texts, return_tensors='pt')."
        )
    if layer_timer is not None and not config.keep_slower_dense:
        raise ValueError("layer_timer is only used with LowRankConfig(keep_slower_dense=True); set it, or drop layer_timer")
    if config.ranks:
        logger.warning("config.ranks is set but compress() chooses ranks from the rule; the given ranks are ignored")
    if config.calibration_samples is not None:
        logger.warning("config.calibration_samples is set but compress() records the number it used; ignored")
    how = _check_batchnorm_repair(recalibrate_batchnorm)

    whitening = Whitening.prepare(model, config, calibration_data)  # forward passes only: the model is unchanged
    plan = _plan(model, config, example_inputs, layer_timer, whitening)  # the model is untouched until _apply
    repair = _prepare_batchnorm_repair(model, how)  # before the swap: it may read the dense model
    _apply(model, plan)
    for hook in _ON_COMPRESSED:  # e.g. transformers models: model.save_pretrained now records the ranks
        hook(model)
    if repair is not None:
        # After the cut; the report is already recorded, so a failing batch leaves a consistent compressed model.
        repair(model)
        model.lowrank_report.batchnorm_recalibrated = True
        model.lowrank_report.batchnorm_data_free = isinstance(how, _batchnorm.DataFreeRecalibration)
    logger.info("%s", model.lowrank_report)
    return model



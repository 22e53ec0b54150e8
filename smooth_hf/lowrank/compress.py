"""Replace dense layers by truncated-SVD factorisations, in place, with no fine-tuning.

``compress`` plans before it touches the model: it checks every targeted layer, takes its singular values and
chooses every rank (:mod:`smooth_hf.lowrank.planning`), so that any error on the way (NaN weights, an unreachable
budget, calibration data the model cannot take) leaves the model exactly as it was. Then:

* a model made of repeated blocks (an LLM's decoder layers, a transformer encoder) is cut one block at a time
  (:mod:`smooth_hf.lowrank.streaming`): the memory of one block's statistics, the same ranks, and the same factors
  to float32 round-off;
* any other model is compressed whole (:func:`_plan`): every replacement is built, then all are swapped in at once,
  and a swap that fails half way is undone.

BatchNorm repair is a separate step that ``compress`` runs after the cut when asked
(:mod:`smooth_hf.lowrank.batchnorm`); :func:`smooth_hf.evaluation.sweep.budget_sweep` composes the same two steps.

Parameters are counted as in :func:`~smooth_hf.lowrank.report.count_parameters` (unique, whole model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..core.devices import on_device
from ..core.weights import weight_matrix
from . import batchnorm as _batchnorm
from .base import LowRankLayer
from .blocks import Blocks, StreamingUnsupported, find_blocks
from .config import LowRankConfig
from .cost import ExampleInputs, trace_layers
from .decomposition import decompose_within
from .layers import factorise
from .planning import Candidate, Plan, classify, decide_ranks, finish, record, warn_if_nothing_factorised
from .report import CompressionReport, count_parameters
from .streaming import compress_streamed
from .structure import replace_module
from .targeting import find_layers
from .timing import LayerTimer
from .whitening import InputGrams, Whitening

__all__ = ["compress", "register_on_compressed"]

logger = logging.getLogger(__name__)

DATA_FREE = "data_free"

# Called with every model ``compress`` has just cut, so that a library's own save records the low-rank structure:
# smooth_hf.integrations.transformers registers one for transformers models. The engine imports no integration.
_ON_COMPRESSED: list[Callable[[nn.Module], None]] = []


def register_on_compressed(hook: Callable[[nn.Module], None]) -> None:
    """Run ``hook(model)`` after every successful :func:`compress` (once per hook, whatever the registrations)."""
    if hook not in _ON_COMPRESSED:
        _ON_COMPRESSED.append(hook)

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
) -> Plan:
    """The whole model at once: classify every layer, take every candidate's spectrum, choose ranks, build every
    replacement (the model is untouched until :func:`_apply`).

    With ``whitening`` (``method="whitened"``) the spectra are those of ``W S`` (the output error on the
    calibration inputs) and the factors its truncation; otherwise the weight's own decomposition.
    """
    calls = trace_layers(model, example_inputs) if example_inputs is not None else None
    params_before = count_parameters(model)
    rows, candidates = classify(model, config, calls)
    cached = 0  # bytes of singular vectors kept
    for c in candidates:  # ---- method hook 1/2: the spectrum the rank rules read
        matrix = weight_matrix(c.module).detach()
        if whitening is not None:
            c.whitened_spectrum = whitening.spectrum(c.name, matrix)
        else:
            c.decomposition = decompose_within(matrix, cached)
            cached += c.decomposition.basis_bytes
    if config.rank_allocation == "sensitivity":  # before any factor is built: it truncates with the same SVDs
        losses = whitening.sensitivity(model, {c.name: (c.module, c.cost_per_rank, c.dense_params) for c in candidates})
        for c in candidates:
            c.marginal_losses = losses[c.name]
    built: dict[tuple[str, int], LowRankLayer] = {}

    def build(c: Candidate, rank: int) -> LowRankLayer:
        if (c.name, rank) not in built:  # ---- method hook 2/2: the factors
            factors = whitening.factors(c.name, rank, c.module.weight.dtype) if whitening is not None else None
            built[c.name, rank] = factorise(c.module, rank, factors=factors, decomposition=c.decomposition)
        return built[c.name, rank]

    config, ranks = decide_ranks(model, config, rows, candidates, calls, build, layer_timer)
    replacements = {c.name: build(c, ranks[c.name]) for c in candidates if ranks.get(c.name) is not None}
    for c in candidates:
        if c.name in replacements:
            record(rows[c.name], c, ranks[c.name], replacements[c.name])
    if whitening is not None:
        whitening.release()  # every factor is built: the float64 decompositions are not needed any more
    if not replacements:
        warn_if_nothing_factorised(model, config, len(candidates))
    plan = finish(config, params_before, rows, whitening.grams.samples if whitening is not None else None, calls,
                  example_inputs)
    plan.replacements = replacements
    return plan


def _apply(model: nn.Module, plan: Plan) -> None:
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
    _record(model, plan, params_after)


def _record(model: nn.Module, plan: Plan, params_after: int) -> None:
    """``model.lowrank_config`` (what a reload needs) and ``model.lowrank_report``."""
    model.lowrank_config = plan.config
    model.lowrank_report = CompressionReport(
        plan.params_before, params_after, list(plan.rows.values()), macs_before=plan.macs_before,
        macs_after=plan.macs_after, macs_inputs=plan.macs_inputs,
    )


def _blocks_to_stream(
    model: nn.Module,
    config: LowRankConfig,
    calibration_data: Iterable[Any] | InputGrams | None,
    streaming: bool | None,
    device: torch.device | None,
) -> Blocks | None:
    """The blocks to compress one at a time, or ``None``: the model is compressed whole."""
    if streaming is not None and not isinstance(streaming, bool):
        raise ValueError(f"streaming must be None (stream where it applies), True or False, got {streaming!r}")
    whole = []
    if config.keep_slower_dense:
        whole.append("keep_slower_dense times layers at several ranks")
    if isinstance(calibration_data, InputGrams):
        whole.append("the statistics were collected beforehand (InputGrams)")
    layers = find_layers(model, config.target_modules, config.exclude_modules, config.skip_first_last,
                         config.factorise_embeddings)
    # (a lazy layer's size is unknown until a forward pass: counted as none here, refused with the reason later)
    blocks = find_blocks(model, {name: 0 if is_lazy(m.weight) else m.weight.numel() for name, m in layers})
    if blocks is None:
        whole.append("the model has no repeated blocks holding most of its targeted weights")
    if streaming is False:
        whole.append("streaming=False asks for the whole model")
    if config.sequential and whole:
        raise ValueError(f"sequential=True cuts a model block after block, but {whole[0]}")
    if whole:
        if streaming:
            raise ValueError(f"streaming=True, but {' and '.join(whole)}: compress it whole (streaming=None or False)")
        return None
    if device is not None and config.rank_allocation == "sensitivity":
        raise ValueError("rank_allocation='sensitivity' runs the whole model once per measurement: with "
                         "device=..., compress with rank_allocation='spectrum', or move the model to the device")
    return blocks


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
    streaming: bool | None = None,
    device: str | torch.device | None = None,
    offload_folder: str | os.PathLike | None = None,
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
        streaming: a model made of repeated blocks (the decoder layers of an LLM, a transformer encoder's layers) is
            compressed one block at a time (:mod:`smooth_hf.lowrank.streaming`): the same ranks, the same factors to
            float32 round-off, with the memory of one block's statistics instead of all of them. ``None`` (the default) streams where it
            applies; ``False`` compresses the model whole; ``True`` refuses a model it cannot stream.
            ``keep_slower_dense`` and statistics collected beforehand (an :class:`InputGrams`) compress whole.
        device: where the forward passes and decompositions run (e.g. ``"cuda"``), the model staying where it is:
            streamed, one block at a time is moved there and back; compressed whole, the model is.
        offload_folder: streamed only: where each layer's decomposition waits, on disk, between the pass that takes
            the spectra and the cut (default: a temporary folder, removed afterwards).

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
    Whitening.check_data(config, calibration_data)
    device = torch.device(device) if device is not None else None
    if config.method == "whitened" and not isinstance(calibration_data, InputGrams):
        calibration_data = list(calibration_data)  # read more than once (a generator would be spent)
    blocks = _blocks_to_stream(model, config, calibration_data, streaming, device)
    repair = _prepare_batchnorm_repair(model, how)  # before the cut: it may read the dense model
    plan = None
    if blocks is not None:
        calls = trace_layers(model, example_inputs) if example_inputs is not None else None
        rows, candidates = classify(model, config, calls)
        try:
            plan = compress_streamed(model, config, blocks, rows, candidates, calls, example_inputs, calibration_data,
                                     device, offload_folder)
        except StreamingUnsupported as why:  # found on the first pass, before any layer changed
            if streaming:
                raise ValueError(f"streaming=True, but this model's blocks cannot be streamed ({why}): compress it "
                                 "whole (streaming=None or False)") from None
            logger.info("compress: %s, so the model is compressed whole", why)
        else:
            _record(model, plan, count_parameters(model))
    if plan is None:
        with on_device(model, device):
            whitening = Whitening.prepare(model, config, calibration_data)  # forward passes only: model unchanged
            plan = _plan(model, config, example_inputs, layer_timer, whitening)  # the model is untouched until _apply
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



"""Replace dense layers by truncated-SVD factorisations, in place, with no fine-tuning.

``compress`` works in three phases so that a model is never left half compressed: it checks every
targeted layer and computes its singular values, then chooses every rank, then builds every
replacement; only when all of that succeeded does it swap the modules in. Any error on the way
(NaN weights, an unreachable budget, an SVD failure) leaves the model exactly as it was.

"Parameters" are always the unique parameters of the whole model (``count_parameters``): weights,
biases, norm scales, embeddings; a tied weight (GPT-2's ``lm_head``/``wte``) counts once; buffers
(BatchNorm running statistics) are not parameters and do not count.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .. import batchnorm as _batchnorm
from ..penalties import out_in_weight
from ..targeting import find_layers, layer_kind
from .allocation import allocate_ranks, energy_kept, finalize_rank, max_removable, rank_for_energy, rank_for_ratio
from .config import LowRankConfig
from .diagnosis import budget_advice, describe, unfactorisable_weights
from .layers import LowRankConv2d, LowRankLinear, singular_values

__all__ = [
    "CompressionReport",
    "LayerReport",
    "STATUS_DENSE_EXCLUDED",
    "STATUS_DENSE_GROUPED",
    "STATUS_DENSE_NO_GAIN",
    "STATUS_DENSE_TIED",
    "STATUS_FACTORISED",
    "apply_ranks",
    "compress",
    "count_parameters",
]

logger = logging.getLogger(__name__)

STATUS_FACTORISED = "factorised"
STATUS_DENSE_NO_GAIN = "dense: factorising would not remove parameters"
STATUS_DENSE_GROUPED = "dense: grouped conv"
STATUS_DENSE_TIED = "dense: tied weight"
STATUS_DENSE_EXCLUDED = "dense: excluded"
# nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj: replacing it would crash.
STATUS_DENSE_READ_BY_PARENT = "dense: weight read directly by nn.MultiheadAttention"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of ``model``: a tied or shared parameter counts once; buffers do not count.

    Raises:
        ValueError: the model has uninitialised lazy layers (``nn.LazyLinear``...), whose sizes are unknown.
    """
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise ValueError(
            f"{type(model).__name__} has uninitialised lazy parameters ({', '.join(lazy[:3])}"
            f"{', ...' if len(lazy) > 3 else ''}), e.g. from nn.LazyLinear: their shapes are only known after the "
            "first forward pass. Run one forward pass (model(example_input)) first, then count or compress."
        )
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerReport:
    """What happened to one supported layer. ``shape`` is ``(out, in, kh, kw)`` (``1, 1`` for linear)."""

    name: str
    kind: str
    shape: tuple[int, int, int, int]
    full_rank: int
    rank: int | None
    params_before: int
    params_after: int
    energy_kept: float
    status: str


@dataclass
class CompressionReport:
    """Parameter counts of the whole model before and after, and one row per supported layer."""

    params_before: int
    params_after: int
    layers: list[LayerReport] = field(default_factory=list)
    batchnorm_recalibrated: bool = False
    batchnorm_data_free: bool = False  # recalibrated on synthetic inputs, not on training batches

    @property
    def reduction(self) -> float:
        """Fraction of the model's parameters removed (0.7 = 70% fewer)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def factorised(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reduction"] = self.reduction
        return data

    def to_markdown(self) -> str:
        lines = [
            f"Parameters: {self.params_before:,} -> {self.params_after:,} ({self.reduction:.1%} fewer, whole model, "
            f"unique parameters). BatchNorm recalibrated: {self.batchnorm_recalibration}.",
            "",
            "| layer | kind | shape (out, in, kh, kw) | rank / full | params before | params after | energy kept "
            "| status |",
            "|---|---|---|---|---:|---:|---:|---|",
        ]
        for r in self.layers:
            rank = f"{r.rank} / {r.full_rank}" if r.rank is not None else f"- / {r.full_rank}"
            shape = "x".join(str(d) for d in r.shape)
            lines.append(
                f"| `{r.name}` | {r.kind} | {shape} | {rank} | {r.params_before:,} | {r.params_after:,} "
                f"| {r.energy_kept:.4f} | {r.status} |"
            )
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return (
            f"CompressionReport({self.params_before:,} -> {self.params_after:,} parameters, "
            f"{self.reduction:.1%} fewer; {len(self.factorised)}/{len(self.layers)} layers factorised"
            f"{'; BatchNorm recalibrated (' + self.batchnorm_recalibration + ')' if self.batchnorm_recalibrated else ''})"
        )

    @property
    def batchnorm_recalibration(self) -> str:
        """"no", "on training batches" or "data-free, on synthetic inputs"."""
        if not self.batchnorm_recalibrated:
            return "no"
        return "data-free, on synthetic inputs" if self.batchnorm_data_free else "on training batches"


@dataclass
class _Candidate:
    """A targeted layer that may be factorised, with what the rank rules need."""

    name: str
    module: nn.Module
    kind: str
    shape: tuple[int, int, int, int]
    spectrum: torch.Tensor  # float64 singular values, descending

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


def _shape(module: nn.Module, kind: str) -> tuple[int, int, int, int]:
    weight = out_in_weight(module)
    if kind == "conv2d":
        return tuple(weight.shape)  # type: ignore[return-value]
    return (weight.shape[0], weight.shape[1], 1, 1)


def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Parameters reachable under several names: replacing one owner would silently untie them."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def _read_by_parent(model: nn.Module) -> set[str]:
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (peft-style), on the old module's device/dtype and in its train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    weight = getattr(old, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        new.to(device=weight.device, dtype=weight.dtype)
    new.train(old.training)
    setattr(parent, child, new)


def _low_rank_from_dense(module: nn.Module, kind: str, rank: int) -> nn.Module:
    if kind == "conv2d":
        return LowRankConv2d.from_dense(module, rank)
    if kind in ("linear", "conv1d"):
        return LowRankLinear.from_dense(module, rank)
    raise TypeError(f"cannot factorise {type(module).__name__}: only nn.Linear, nn.Conv2d and HF Conv1D are supported")


def _choose_ranks(
    candidates: list[_Candidate], config: LowRankConfig, params_before: int, advice: Callable[[], str] = str
) -> list[int | None]:
    costs = [c.cost_per_rank for c in candidates]
    dense = [c.dense_params for c in candidates]
    if config.param_reduction is not None:
        target = config.param_reduction * params_before
        most = max_removable([c.full_rank for c in candidates], costs, dense, config.min_rank, config.rank_multiple)
        if most < target:
            largest = math.floor(most / params_before * 1000) / 1000  # rounded down: a value the user can pass
            raise ValueError(
                f"param_reduction={config.param_reduction} asks to remove {target:,.0f} of {params_before:,} "
                f"parameters, but with these targets at most {most:,} ({most / params_before:.1%} of the model) "
                f"can be removed, even with every factorisable layer at min_rank={config.min_rank}. Lower "
                f"param_reduction to at most {largest:.3f}." + (f" {hint}" if (hint := advice()) else "")
            )
        return allocate_ranks(
            [c.spectrum for c in candidates],
            costs,
            dense,
            target,
            min_rank=config.min_rank,
            rank_multiple=config.rank_multiple,
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


DATA_FREE = "data_free"


def compress(
    model: nn.Module,
    config: LowRankConfig,
    *,
    recalibrate_batchnorm: Iterable[Any] | str | _batchnorm.DataFreeRecalibration | None = None,
) -> nn.Module:
    """Factorise the targeted layers of ``model`` in place by truncated SVD; no fine-tuning.

    Layers are replaced at the same module names by :class:`LowRankLinear` / :class:`LowRankConv2d`,
    so the model's forward is unchanged and its state dict gains ``<name>.down.weight``,
    ``<name>.up.weight``, ``<name>.up.bias`` in place of ``<name>.weight``/``<name>.bias``.
    Grouped convolutions, tied weights and layers where factorising would not remove parameters stay
    dense. See :class:`LowRankConfig` for the rank rules.

    Args:
        recalibrate_batchnorm: ``None`` (off), an iterable of training batches, or ``"data_free"``
            / a :class:`smooth_hf.batchnorm.DataFreeRecalibration`. After the cut, BatchNorm running
            statistics are re-estimated on the batches (:func:`smooth_hf.batchnorm.recalibrate_batchnorm`),
            which often recovers much of the accuracy lost to truncation without changing a weight.
            The data-free form needs no data: before the cut, inputs are synthesised from the dense
            model's own BatchNorm statistics (:func:`smooth_hf.batchnorm.synthesize_batchnorm_inputs`;
            ``"data_free"`` uses the model's configured input shape); after it, each running statistic
            moves by the change the cut made on those inputs
            (:func:`smooth_hf.batchnorm.shift_batchnorm_statistics`).

    Returns:
        ``model``, with ``model.lowrank_config`` (a copy of ``config`` with ``ranks`` filled, what
        :func:`apply_ranks` needs to rebuild the structure) and ``model.lowrank_report``
        (a :class:`CompressionReport`).

    Raises:
        ValueError: the model is already compressed, a targeted weight has NaN/Inf, or the
            ``param_reduction`` budget cannot be reached. The model is untouched in every case.
            (BatchNorm recalibration runs after the cut: if it fails, the model stays compressed with
            its previous BatchNorm statistics and ``batchnorm_recalibrated=False``.)
    """
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")
    already = [name for name, m in model.named_modules() if getattr(m, "is_low_rank", False)]
    if already:
        raise ValueError(
            f"model is already compressed (low-rank layers: {', '.join(already[:5])}"
            f"{', ...' if len(already) > 5 else ''}); compress the dense model instead, or reload a compressed "
            "checkpoint with apply_ranks"
        )
    if config.ranks:
        logger.warning("config.ranks is set but compress() chooses ranks from the rule; the given ranks are ignored")
    if isinstance(recalibrate_batchnorm, str | bytes):
        if recalibrate_batchnorm != DATA_FREE:
            raise ValueError(
                f"recalibrate_batchnorm={recalibrate_batchnorm!r}: give None, an iterable of training batches, or "
                f"{DATA_FREE!r} (synthetic inputs, no data needed)"
            )
        recalibrate_batchnorm = _batchnorm.DataFreeRecalibration()

    # Phase 1: classify every supported layer and take the spectra of the candidates.
    targets = dict(find_layers(model, config.target_modules, config.exclude_modules, config.skip_first_last))
    tied, read_by_parent = _tied_weight_ids(model), _read_by_parent(model)
    params_before = count_parameters(model)
    rows: dict[str, LayerReport] = {}
    candidates: list[_Candidate] = []
    for name, module in find_layers(model):
        kind = layer_kind(module)
        shape = _shape(module, kind)
        full_rank = min(shape[0], shape[1] * shape[2] * shape[3])
        n_params = _layer_params(module)
        status = None
        if name not in targets:
            status = STATUS_DENSE_EXCLUDED
        elif kind == "conv2d" and module.groups != 1:
            status = STATUS_DENSE_GROUPED
        elif any(id(p) in tied for p in module.parameters()):  # weight or bias shared
            status = STATUS_DENSE_TIED
        elif name in read_by_parent:
            status = STATUS_DENSE_READ_BY_PARENT
        rows[name] = LayerReport(name, kind, shape, full_rank, None, n_params, n_params, 1.0, status or "")
        if status is not None:
            continue
        weight = out_in_weight(module).detach()
        if weight.device.type == "meta":
            raise ValueError(f"layer {name!r} is on the meta device: load real weights before compressing")
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"layer {name!r} has NaN or Inf weights; nothing was compressed. Fix or exclude the layer "
                "(exclude_modules) before compressing."
            )
        # Singular values only (svdvals): keeping every layer's U and V until the ranks are known would
        # double peak memory on a large model; the factors are computed once, for factorised layers only.
        spectrum = singular_values(weight.reshape(shape[0], -1)).cpu()
        candidates.append(_Candidate(name, module, kind, shape, spectrum))

    # Phase 2: ranks. Phase 3: build replacements, still without touching the model.
    excluded = [r for r in rows.values() if r.status == STATUS_DENSE_EXCLUDED]
    ranks = _choose_ranks(
        candidates,
        config,
        params_before,
        advice=lambda: budget_advice(
            model, sum(r.params_before for r in excluded), len(excluded), config.min_rank, config.rank_multiple
        ),
    )
    replacements: dict[str, nn.Module] = {}
    for c, rank in zip(candidates, ranks, strict=True):
        row = rows[c.name]
        if rank is None:
            row.status = STATUS_DENSE_NO_GAIN
            continue
        replacements[c.name] = _low_rank_from_dense(c.module, c.kind, rank)
        row.rank, row.status = rank, STATUS_FACTORISED
        row.params_after = _layer_params(replacements[c.name])
        row.energy_kept = energy_kept(c.spectrum, rank)

    if not replacements:
        blocked = unfactorisable_weights(model)
        logger.warning(
            "compress: no layer was factorised (%d candidate layers, none where the rule keeps a rank that removes "
            "parameters)%s",
            len(candidates),
            f"; weights smooth_hf cannot factorise: {describe(blocked)}" if blocked else "",
        )

    # Data-free recalibration reads the dense model's statistics, so its inputs are made before the swap.
    has_batchnorm = bool(_batchnorm.batchnorm_layers(model))
    data_free = isinstance(recalibrate_batchnorm, _batchnorm.DataFreeRecalibration)
    repair = recalibrate_batchnorm.prepare(model) if data_free and has_batchnorm else None

    # Phase 4: swap.
    for name, new in replacements.items():
        _replace_module(model, name, new)
    params_after = count_parameters(model)
    expected = params_before - sum(r.params_before - r.params_after for r in rows.values())
    assert params_after == expected, f"parameter count {params_after} != planned {expected}"  # surgery check

    report = CompressionReport(params_before, params_after, list(rows.values()))
    saved = copy.deepcopy(config)
    saved.ranks = {name: rows[name].rank for name in replacements}
    # Recorded before recalibrating, so the model is consistent even if a recalibration batch fails.
    model.lowrank_config = saved
    model.lowrank_report = report
    from ..hf_quantizer import attach_quantization_config  # here: it imports this module

    attach_quantization_config(model)  # transformers models: model.save_pretrained now records the ranks
    if recalibrate_batchnorm is not None:
        if has_batchnorm:
            if repair is not None:
                repair(model)
            else:
                _batchnorm.recalibrate_batchnorm(model, recalibrate_batchnorm)
            report.batchnorm_recalibrated = True
            report.batchnorm_data_free = data_free
        else:
            logger.warning("recalibrate_batchnorm was given but the model has no BatchNorm layer; skipped")
    logger.info("%s", report)
    return model


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Give ``model`` the structure of a compressed checkpoint, ready for ``load_state_dict(strict=True)``.

    Each named layer becomes an *uninitialised* low-rank layer of the recorded rank, on the
    layer's device and dtype (the meta device included, for big-model loading): no SVD is run since
    the weights are about to be overwritten. Every entry is validated before any layer is replaced.

    Raises:
        ValueError: a name is missing or not a Linear/Conv2d/Conv1D layer (or a grouped conv), or a
            rank is not in ``[1, full rank]``.
    """
    plan = []
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"apply_ranks: no module named {name!r} in {type(model).__name__}") from None
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(
                f"apply_ranks: {name!r} is a {type(module).__name__}, not a dense Linear, Conv2d or Conv1D layer"
                f"{' (already low-rank?)' if getattr(module, 'is_low_rank', False) else ''}"
            )
        if kind == "conv2d" and module.groups != 1:
            raise ValueError(f"apply_ranks: {name!r} is a grouped conv (groups={module.groups}); it cannot be low-rank")
        out, inp, kh, kw = _shape(module, kind)
        full_rank = min(out, inp * kh * kw)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
            raise ValueError(f"apply_ranks: rank for {name!r} must be an integer in [1, {full_rank}], got {rank!r}")
        plan.append((name, module, kind, (out, inp, kh, kw), rank))
    for name, module, kind, (out, inp, kh, kw), rank in plan:
        weight, bias = module.weight, module.bias is not None
        if kind == "conv2d":
            new = LowRankConv2d(
                inp,
                out,
                (kh, kw),
                rank,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=bias,
                padding_mode=module.padding_mode,
                device="meta",
                dtype=weight.dtype,
            )
        else:
            new = LowRankLinear(inp, out, rank, bias=bias, device="meta", dtype=weight.dtype)
        if weight.device.type != "meta":
            new = new.to_empty(device=weight.device)
        _replace_module(model, name, new)
    return model

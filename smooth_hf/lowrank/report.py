"""``CompressionReport``: what ``compress`` did, per layer and for the whole model.

One place for the report: its JSON form (``to_dict`` / ``from_dict``, saved next to a checkpoint as
``compression_report.json``), the per-layer Markdown table (``layer_table``, used by ``to_markdown`` and
by the model card), and the rebuild from a model's low-rank layers when no report was kept
(``from_model``).

"Parameters" are always the unique parameters of the whole model (``count_parameters``): weights,
biases, norm scales, embeddings; a tied weight (GPT-2's ``lm_head``/``wte``) counts once; buffers
(BatchNorm running statistics) are not parameters and do not count.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from torch import nn
from torch.nn.parameter import is_lazy

from .base import LowRankLayer

__all__ = [
    "STATUS_DENSE_EXCLUDED",
    "STATUS_DENSE_GROUPED",
    "STATUS_DENSE_HOOKED",
    "STATUS_DENSE_NO_GAIN",
    "STATUS_DENSE_NOT_RUN",
    "STATUS_DENSE_READ_BY_PARENT",
    "STATUS_DENSE_SLOWER",
    "STATUS_DENSE_TIED",
    "STATUS_DENSE_UNRECORDED",
    "STATUS_FACTORISED",
    "CompressionReport",
    "LayerReport",
    "count_parameters",
    "markdown_cell",
]

STATUS_FACTORISED = "factorised"
STATUS_DENSE_NO_GAIN = "dense: factorising would not remove parameters"
STATUS_DENSE_GROUPED = "dense: grouped conv"
STATUS_DENSE_TIED = "dense: tied weight"
STATUS_DENSE_HOOKED = "dense: hooks manage its weight or read its sub-modules (e.g. the old weight_norm, an observer)"
STATUS_DENSE_UNRECORDED = "dense (why is not recorded: report rebuilt from the compressed model)"
STATUS_DENSE_EXCLUDED = "dense: excluded"
STATUS_DENSE_SLOWER = "dense: factorised was not faster on this device (keep_slower_dense)"
STATUS_DENSE_NOT_RUN = "dense: not run on example_inputs (no multiply-adds to save)"
# nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj: replacing it would crash.
STATUS_DENSE_READ_BY_PARENT = "dense: weight read directly by nn.MultiheadAttention"

_DERIVED_KEYS = ("reduction", "macs_reduction")  # written by to_dict for readers of the JSON, recomputed on reading


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


def markdown_cell(value: Any) -> str:
    """Markdown-table-safe text: a ``|`` or newline in a value must not break the table."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class LayerReport:
    """What happened to one supported layer. ``shape`` is ``(out, in, kh, kw)`` (``1, 1`` for linear).

    ``energy_kept`` is NaN when unknown (a report rebuilt from a compressed model: the dense weights are gone).
    """

    name: str
    kind: str
    shape: tuple[int, int, int, int]
    full_rank: int
    rank: int | None
    params_before: int
    params_after: int
    energy_kept: float
    status: str

    @classmethod
    def dense(cls, name: str, module: nn.Module, kind: str, status: str) -> LayerReport:
        """The row of a layer left dense (``kind`` as :func:`smooth_hf.lowrank.targeting.layer_kind` gives it)."""
        from .layers import dense_layer_shape  # here: layers imports the package's modules that import this one

        shape = dense_layer_shape(module, kind)
        n_params = sum(p.numel() for p in module.parameters())
        return cls(name, kind, shape, min(shape[0], shape[1] * shape[2] * shape[3]), None, n_params, n_params, 1.0,
                   status)


@dataclass
class CompressionReport:
    """Parameter counts of the whole model before and after, and one row per supported layer."""

    params_before: int
    params_after: int
    layers: list[LayerReport] = field(default_factory=list)
    batchnorm_recalibrated: bool = False
    batchnorm_data_free: bool = False  # recalibrated on synthetic inputs, not on training batches
    # Multiply-adds of all Linear/Conv2d/Conv1D layers in one forward pass on the example inputs given to
    # compress (their shapes in macs_inputs); None when none were given. See smooth_hf.lowrank.cost.
    macs_before: int | None = None
    macs_after: int | None = None
    macs_inputs: str | None = None

    @property
    def reduction(self) -> float:
        """Fraction of the model's parameters removed (0.7 = 70% fewer)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def macs_reduction(self) -> float | None:
        """Fraction of the layers' multiply-adds removed on the example inputs, or None when not measured."""
        if self.macs_before is None or self.macs_after is None or not self.macs_before:
            return None
        return 1.0 - self.macs_after / self.macs_before

    @property
    def kept_dense_for_speed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == STATUS_DENSE_SLOWER]

    @property
    def factorised(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    @property
    def batchnorm_recalibration(self) -> str:
        """"no", "on training batches" or "data-free, on synthetic inputs"."""
        if not self.batchnorm_recalibrated:
            return "no"
        return "data-free, on synthetic inputs" if self.batchnorm_data_free else "on training batches"

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reduction"] = self.reduction
        data["macs_reduction"] = self.macs_reduction
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The inverse of :meth:`to_dict` (e.g. of a ``compression_report.json``); ``reduction`` is recomputed.

        Raises:
            ValueError: unknown or missing keys, in the report or in a layer row.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a compression report must be a JSON object, got {type(data).__name__}")
        report = _known_fields(cls, {k: v for k, v in data.items() if k not in _DERIVED_KEYS}, "report")
        rows = report.pop("layers", [])
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError("a compression report's 'layers' must be a list of objects, one per layer")
        layers = []
        for row in rows:
            row = _known_fields(LayerReport, row, f"layer row {row.get('name', '?')!r}")
            row["shape"] = tuple(row["shape"])
            layers.append(LayerReport(**row))
        return cls(layers=layers, **report)

    # ---- rebuilt from a model -----------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> CompressionReport:
        """The report of a compressed model whose report was not kept, rebuilt from its layers.

        Every supported layer is listed. Why a dense one stayed dense is not recorded in the model
        (``STATUS_DENSE_UNRECORDED``), and the energy kept of a factorised one is unknown (NaN): it is a property
        of the dense weights, which are gone.
        """
        from .targeting import layer_kind, low_rank_factor_names  # here: targeting imports this package

        config = getattr(model, "lowrank_config", None)
        embeddings = bool(getattr(config, "factorise_embeddings", False))
        named = list(model.named_modules())
        factors = low_rank_factor_names(named)
        layers, removed = [], 0
        for name, module in named:
            if name in factors:
                continue
            if not isinstance(module, LowRankLayer):
                kind = layer_kind(module, embeddings)
                if kind is not None:
                    layers.append(LayerReport.dense(name, module, kind, STATUS_DENSE_UNRECORDED))
                continue
            out, inp, kh, kw = module.dense_shape
            bias = module.up.bias.numel() if module.up.bias is not None else 0
            before = out * inp * kh * kw + bias
            after = sum(p.numel() for p in module.parameters())
            removed += before - after
            layers.append(
                LayerReport(
                    name,
                    module.kind,
                    (out, inp, kh, kw),
                    min(out, inp * kh * kw),
                    module.rank,
                    before,
                    after,
                    math.nan,
                    STATUS_FACTORISED,
                )
            )
        params_after = count_parameters(model)
        return cls(params_after + removed, params_after, layers)

    # ---- Markdown -----------------------------------------------------------------------------
    def layer_table(self) -> str:
        """The per-layer table in Markdown (no trailing newline): the one renderer, used by the model card too."""
        lines = [
            "| layer | kind | shape (out x in x kh x kw) | rank / full rank | params before | params after "
            "| energy kept | status |",
            "|---|---|---|---|---:|---:|---:|---|",
        ]
        for layer in self.layers:
            rank = f"{layer.rank} / {layer.full_rank}" if layer.rank is not None else f"dense ({layer.full_rank})"
            energy = "n/a" if layer.energy_kept is None or math.isnan(layer.energy_kept) else f"{layer.energy_kept:.4f}"
            lines.append(
                f"| `{markdown_cell(layer.name)}` | {markdown_cell(layer.kind)} | {'x'.join(str(d) for d in layer.shape)} "
                f"| {rank} | {layer.params_before:,} | {layer.params_after:,} | {energy} | {markdown_cell(layer.status)} |"
            )
        return "\n".join(lines)

    def _macs_line(self) -> str:
        if self.macs_reduction is None:
            return ""
        return (
            f" Multiply-adds: {self.macs_before:,} -> {self.macs_after:,} ({self.macs_reduction:.1%} fewer, Linear/Conv "
            f"layers, one forward pass on inputs {self.macs_inputs})."
        )

    def to_markdown(self) -> str:
        """A summary line and the per-layer table."""
        slower = len(self.kept_dense_for_speed)
        return (
            f"Parameters: {self.params_before:,} -> {self.params_after:,} ({self.reduction:.1%} fewer, whole model, "
            f"unique parameters).{self._macs_line()}"
            f"{f' Kept dense because factorising was not faster: {slower} layer(s).' if slower else ''} "
            f"BatchNorm recalibrated: {self.batchnorm_recalibration}.\n\n{self.layer_table()}\n"
        )

    def __str__(self) -> str:
        return (
            f"CompressionReport({self.params_before:,} -> {self.params_after:,} parameters, "
            f"{self.reduction:.1%} fewer; "
            f"{'' if self.macs_reduction is None else f'{self.macs_reduction:.1%} fewer multiply-adds; '}"
            f"{len(self.factorised)}/{len(self.layers)} layers factorised"
            f"{f', {len(self.kept_dense_for_speed)} kept dense for speed' if self.kept_dense_for_speed else ''}"
            f"{'; BatchNorm recalibrated (' + self.batchnorm_recalibration + ')' if self.batchnorm_recalibrated else ''})"
        )


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` as constructor arguments of the dataclass ``cls``; unknown or missing keys are an error."""
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise ValueError(
            f"{what} of a compression report has {'unknown keys ' + ', '.join(unknown) if unknown else ''}"
            f"{'; ' if unknown and missing else ''}{'missing keys ' + ', '.join(missing) if missing else ''}. "
            "It was written by another version or edited: re-save the model with smooth_hf.save_pretrained."
        )
    return dict(data)

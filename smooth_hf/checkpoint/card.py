"""Model cards for compressed models: Hub metadata (YAML) plus what a reader needs to trust the numbers.

The card is rendered from a Jinja template shipped inside the package (``templates/model_card.md``),
with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` and :class:`~huggingface_hub.ModelCardData`,
like trl's cards: the YAML front matter is produced by ``huggingface_hub`` (so it is always valid Hub
metadata, ``model-index`` included), the body by the template. Every number comes from the model
(``model.lowrank_report`` / ``model.lowrank_config``) or from :class:`ModelCardInfo`, never typed by hand.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..core.libraries import base_library, pipeline_task
from ..lowrank import CompressionReport, LowRankConfig
from ..lowrank.report import markdown_cell

__all__ = ["ModelCardInfo", "render_model_card"]

logger = logging.getLogger(__name__)

TEMPLATE = "model_card.md"
BASE_TAGS = ("smooth_hf", "low-rank", "compression")


@dataclass
class ModelCardInfo:
    """What the card cannot learn from the model itself: provenance, data, measured metrics, training setup.

    Everything is optional: a card for a model saved with no info still states the parameter counts,
    the ranks and how to reload it. Metrics must be *measured* (e.g. by the evaluation recipe), since
    they go into the Hub's ``model-index``, which the Hub shows as the model's results.
    """

    model_name: str | None = field(
        default=None,
        metadata={"help": "Title of the card and name in the model-index. Default: derived from the architecture."},
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the dense model this one was compressed from (YAML base_model); None if it is not "
            "on the Hub."
        },
    )
    datasets: list[str] = field(
        default_factory=list, metadata={"help": "Hub dataset ids used for training / evaluation (YAML datasets)."}
    )
    dataset_pretty_name: str | None = field(
        default=None, metadata={"help": "Human-readable dataset name shown in the model-index (default: datasets[0])."}
    )
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split the metrics were measured on, e.g. 'test'."}
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "Hub task id, e.g. 'image-classification' or 'text-classification' (YAML pipeline_tag). "
            "Default: inferred from the model class."
        },
    )
    metrics: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Metric name -> value measured on the COMPRESSED model, e.g. {'accuracy': 0.905}."},
    )
    dense_metrics: dict[str, float] | None = field(
        default=None,
        metadata={"help": "The same metrics measured on the model before compression, for the comparison table."},
    )
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Training setup shown as a table: smoothness penalty coefficients, epochs, lr, ..."},
    )
    license: str | None = field(default=None, metadata={"help": "Hub license id, e.g. 'apache-2.0'."})
    tags: list[str] = field(
        default_factory=list, metadata={"help": f"Extra Hub tags; {', '.join(BASE_TAGS)} are always added."}
    )
    extra: str | None = field(
        default=None, metadata={"help": "Free Markdown appended to the card (limitations, citation, ...)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        self.datasets = [d for d in self.datasets if d]  # e.g. [args.dataset_name] when no dataset was named
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        for name in ("metrics", "dense_metrics"):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ValueError(
                    f"ModelCardInfo.{name} must be a dict of metric name -> number, got {type(values).__name__}"
                )
            bad = {
                k: v
                for k, v in values.items()
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            }
            if bad:
                raise ValueError(f"ModelCardInfo.{name} values must be finite numbers; invalid: {bad!r}")


# ---------------------------------------------------------------------------------------------- helpers


def _architecture(model: nn.Module) -> str:
    library = base_library(model)
    if library == "transformers" and model.config.architectures:
        return model.config.architectures[0]
    if library == "timm":
        return model.pretrained_cfg["architecture"]
    return type(model).__name__


def _fmt_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return markdown_cell(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _rank_rule(config: LowRankConfig) -> str:
    if config.rank_allocation == "sensitivity":
        budget = (
            f"remove {config.param_reduction:.1%} of the whole model's parameters" if config.param_reduction is not None
            else f"remove {config.macs_reduction:.1%} of the Linear/Conv multiply-adds for the example inputs"
        )
        rule = (
            f"global budget: {budget}, with ranks allocated by measured sensitivity: each layer alone was truncated "
            f"at a few ranks on {config.sensitivity_samples} calibration samples, and the budget drops the components "
            "that move the model's output the least per parameter saved"
        )
    elif config.param_reduction is not None and config.method == "whitened":
        rule = (
            f"global parameter budget: remove {config.param_reduction:.1%} of the whole model's parameters, "
            "with ranks allocated across layers so that the least relative output energy on the calibration "
            "data is lost (a whitened rank-r cut loses exactly the tail of the singular values of `W S`)"
        )
    elif config.param_reduction is not None:
        rule = (
            f"global parameter budget: remove {config.param_reduction:.1%} of the whole model's parameters, "
            "with ranks allocated across layers so that the least relative spectral energy is lost "
            "(Eckart-Young: a rank-r truncation loses exactly the tail of the singular values)"
        )
    elif config.macs_reduction is not None:
        rule = (
            f"global compute budget: remove {config.macs_reduction:.1%} of the multiply-adds of the Linear/Conv layers "
            "for the example inputs given at compression, with ranks allocated across layers so that the least "
            "relative spectral energy is lost"
        )
    elif config.rank_ratio is not None:
        rule = f"fixed rank ratio: every factorised layer keeps ceil({config.rank_ratio:g} x full rank) singular values"
    else:
        rule = (
            f"energy threshold: every factorised layer keeps the smallest rank whose squared singular values "
            f"reach {config.energy:g} of the total"
        )
    details = [f"min_rank={config.min_rank}", f"rank_multiple={config.rank_multiple}"]
    if config.keep_slower_dense:
        details.append("layers whose factorised form was not faster on the compression device kept dense")
    if config.skip_first_last:
        details.append("first and last layers kept dense")
    if config.target_modules is not None:
        details.append(f"target_modules={config.target_modules!r}")
    if config.exclude_modules is not None:
        details.append(f"exclude_modules={config.exclude_modules!r}")
    return f"{rule} ({', '.join(details)})"


def _method(config: LowRankConfig) -> dict[str, Any]:
    """How each layer was cut, and on what data: the card's "Method" line and its "energy kept" wording."""
    if config.method != "whitened":
        return {"whitened": False}
    samples = f"{config.calibration_samples:,} samples" if config.calibration_samples else "an unrecorded number of samples"
    name = markdown_cell(config.calibration_dataset) if config.calibration_dataset else "unnamed calibration data"
    return {"whitened": True, "calibration": f"{name}, {samples}", "damping": f"{config.whitening_damping:g}",
            "sensitivity": config.rank_allocation == "sensitivity"}


def _metric_rows(info: ModelCardInfo) -> list[dict[str, str]]:
    dense = info.dense_metrics or {}
    rows = []
    for name in list(info.metrics) + [k for k in dense if k not in info.metrics]:
        value, before = info.metrics.get(name), dense.get(name)
        delta = f"{value - before:+.4g}" if value is not None and before is not None else ""
        rows.append(
            {
                "name": markdown_cell(name),
                "dense": _fmt_number(before) if before is not None else "",
                "compressed": _fmt_number(value) if value is not None else "",
                "delta": delta,
            }
        )
    return rows


def _card_data(model: nn.Module, info: ModelCardInfo, title: str, task: str | None) -> ModelCardData:
    library = base_library(model)
    tags = list(BASE_TAGS)
    if library:
        tags.append(library)  # discoverability under the base library's tag, without claiming its loader
    tags += [t for t in info.tags if t not in tags]
    eval_results = None
    if info.metrics:
        dataset_id = info.datasets[0] if info.datasets else None
        dataset_name = info.dataset_pretty_name or dataset_id
        if task is None or dataset_name is None:
            raise ValueError(
                "ModelCardInfo.metrics go into the Hub's model-index, which needs a task and a dataset: set "
                "ModelCardInfo.task (e.g. 'image-classification') and datasets=[<Hub dataset id>] "
                "(or dataset_pretty_name)."
            )
        eval_results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset_id or dataset_name,
                dataset_name=dataset_name,
                dataset_split=info.dataset_split,
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in info.metrics.items()
        ]
    return ModelCardData(
        # library_name is what the Hub keys its "Use this model" snippet and library filter on. "timm" or
        # "transformers" would show `timm.create_model("hf-hub:...")` / `AutoModel.from_pretrained(...)` without
        # the `import smooth_hf` that the factorised state dict needs (transformers learns the "smooth_hf"
        # quantization method from it). "smooth_hf" names what to install; the base library is still listed as
        # a tag and in base_model for discovery.
        library_name="smooth_hf",
        base_model=info.base_model,
        datasets=list(info.datasets) or None,
        license=info.license,
        tags=tags,
        pipeline_tag=task,
        metrics=list(info.metrics) or None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )


def render_model_card(model: nn.Module, info: ModelCardInfo | None = None, *, location: str | None = None) -> ModelCard:
    """Render the card of a compressed model (YAML metadata + body) from the packaged template.

    Args:
        model: a model compressed by :func:`smooth_hf.compress` or reloaded by :func:`smooth_hf.from_pretrained`
            (it must carry ``lowrank_config``). Its ``lowrank_report`` gives the per-layer table; a reloaded
            model without one gets a table rebuilt from its low-rank layers (energy kept: n/a).
        info: provenance, data, measured metrics and training setup (all optional).
        location: the repo id or folder shown in the "how to reload" snippet.

    Raises:
        ValueError: the model was not compressed, or metrics were given without a task/dataset for the
            model-index.
    """
    info = info if info is not None else ModelCardInfo()
    config = getattr(model, "lowrank_config", None)
    if not isinstance(config, LowRankConfig):
        raise ValueError(
            f"{type(model).__name__} has no lowrank_config: call smooth_hf.compress(model, LowRankConfig(...)) "
            "first (or load a compressed checkpoint with smooth_hf.from_pretrained)."
        )
    report = getattr(model, "lowrank_report", None)
    report_file = isinstance(report, CompressionReport)  # save_pretrained writes it as compression_report.json
    if not report_file:
        report = CompressionReport.from_model(model)
    architecture = _architecture(model)
    title = info.model_name or f"{architecture} (low-rank compressed)"
    task = info.task or pipeline_task(model)
    card_data = _card_data(model, info, title, task)
    removed = report.params_before - report.params_after
    context = {
        "title": title,
        "architecture": architecture,
        "library": base_library(model) or "unknown",
        "model_class": type(model).__name__,
        "base_model": info.base_model,
        "datasets": info.datasets,
        "task": task,
        "params_before": f"{report.params_before:,}",
        "params_after": f"{report.params_after:,}",
        "params_removed": f"{removed:,}",
        "reduction": f"{report.reduction:.1%}",
        "compression_ratio": f"{report.params_before / report.params_after:.2f}x" if report.params_after else "n/a",
        "n_factorised": len(report.factorised),
        "n_layers": len(report.layers),
        "rank_rule": _rank_rule(config),
        "method": _method(config),
        "batchnorm_recalibrated": bool(getattr(report, "batchnorm_recalibrated", False)),
        "batchnorm_data_free": bool(getattr(report, "batchnorm_data_free", False)),
        "layer_table": report.layer_table(),
        "metrics": _metric_rows(info),
        "dataset_split": info.dataset_split,
        "training": [{"name": markdown_cell(k), "value": _fmt_number(v)} for k, v in info.training.items()],
        "location": location or "<repo id or local folder>",
        "extra": info.extra,
        "report_file": report_file,
    }
    template = resources.files("smooth_hf.checkpoint").joinpath("templates").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, card=context)

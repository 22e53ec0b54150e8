"""Accuracy (or perplexity) against parameters (or multiply-adds) removed: compress copies of a model at several
budgets, no fine-tuning.

Used by ``recipes/compress.py --budgets``, the main job and the benchmarks, so every table in the
project is produced the same way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..lowrank import InputGrams, LowRankConfig, calibrate, compress, count_macs, count_parameters
from ..lowrank.batchnorm import DataFreeRecalibration, batchnorm_layers, recalibrate_batchnorm
from ..lowrank.cost import ExampleInputs

__all__ = ["BN_REPAIRS", "METRIC_SCALES", "RULE_LABELS", "budget_sweep", "plot_sweep", "sweep_markdown"]

logger = logging.getLogger(__name__)


# Row key -> (table header suffix, plot label suffix, plot line style) of each BatchNorm repair.
BN_REPAIRS = {
    "accuracy_bn_recalibrated": ("+ BN recal.", "+ BN recalibration", "--"),
    "accuracy_bn_data_free": ("+ BN data-free", "+ BN recalibration, data-free", ":"),
}
# What a sweep's budgets are fractions of, by the LowRankConfig rule they set: the tables' and plots' label.
RULE_LABELS = {"param_reduction": "parameters removed", "macs_reduction": "multiply-adds removed"}
# How each metric a sweep scores is shown: accuracy as a percentage, perplexity as it is (lower is better).
METRIC_SCALES = {"accuracy": 100.0, "perplexity": 1.0}


def budget_sweep(
    model: nn.Module,
    budgets: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    *,
    config_kwargs: dict[str, Any] | None = None,
    recalibration_batches: Callable[[], Iterable[Any]] | None = None,
    data_free_batchnorm: bool | DataFreeRecalibration = False,
    calibration_data: Iterable[Any] | InputGrams | None = None,
    on_cut: Callable[[float, nn.Module, dict[str, Any]], None] | None = None,
    rule: str = "param_reduction",
    example_inputs: ExampleInputs | None = None,
    metric: str = "accuracy",
    reuse_statistics: bool = True,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """One row per budget (0 = the dense model): parameters, fraction removed, and ``metric`` (``evaluate``'s value).

    ``rule`` is the ``LowRankConfig`` field each budget sets: ``"param_reduction"`` or ``"macs_reduction"`` (which
    prices multiply-adds on ``example_inputs``, as ``compress`` does). With ``example_inputs`` every row also gets
    ``macs`` (per call on them) and ``macs_removed``.

    ``evaluate(model) -> float``, stored under ``metric`` (``"accuracy"``, ``"perplexity"``). For a model with BatchNorm, two repairs of the running
    statistics (forward passes only, no weight changes) can be measured on the same compressed
    model, each reported apart so the "no fine-tuning, nothing else" number stays plain:

    * ``recalibration_batches`` (a callable returning fresh training batches): rows get
      ``accuracy_bn_recalibrated``;
    * ``data_free_batchnorm`` (``True`` or a :class:`~smooth_hf.lowrank.batchnorm.DataFreeRecalibration`): inputs
      are synthesised once from the dense model's own statistics, and rows get ``accuracy_bn_data_free``.

    ``config_kwargs`` are extra ``LowRankConfig`` fields (targets, ``method``; ``rank_ratio`` instead
    of a budget is not allowed here). With ``method="whitened"``, ``calibration_data`` are the
    calibration batches (or :class:`~smooth_hf.lowrank.InputGrams`): their statistics are collected
    once, on the dense model, and serve every budget; with ``reuse_statistics=False`` every budget's ``compress``
    takes them again, which a large model made of blocks needs (it then holds one block's statistics at a time,
    not every layer's: :mod:`smooth_hf.lowrank.streaming`).

    ``device``: where each ``compress`` runs (:func:`~smooth_hf.lowrank.compress`'s ``device``).

    ``on_cut(budget, model, row)`` sees each compressed model (as cut, before any repair) with its row, e.g. to
    keep one of them.
    """
    if rule not in RULE_LABELS:
        raise ValueError(f"rule must be one of {', '.join(RULE_LABELS)}, got {rule!r}")
    if rule == "macs_reduction" and example_inputs is None:
        raise ValueError("a macs_reduction sweep prices multiply-adds on inputs: pass example_inputs")
    dense_params = count_parameters(model)
    dense_macs = count_macs(model, example_inputs) if example_inputs is not None else None
    if metric not in METRIC_SCALES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_SCALES)}, got {metric!r}")
    if reuse_statistics and calibration_data is not None and not isinstance(calibration_data, InputGrams):
        targets = LowRankConfig(param_reduction=0.0, **(config_kwargs or {}))  # read for its targets only
        calibration_data = calibrate(model, targets, calibration_data)
    repairs: dict[str, Callable[[nn.Module], Any]] = {}
    if batchnorm_layers(model):
        if recalibration_batches is not None:
            repairs["accuracy_bn_recalibrated"] = lambda m: recalibrate_batchnorm(m, recalibration_batches())
        if data_free_batchnorm:
            settings = data_free_batchnorm if isinstance(data_free_batchnorm, DataFreeRecalibration) else DataFreeRecalibration()
            repairs["accuracy_bn_data_free"] = settings.prepare(model)  # inputs synthesised once, from the dense model
    rows = []
    for budget in sorted({0.0, *budgets}):
        if budget == 0.0:
            candidate = model
        else:
            candidate = copy.deepcopy(model)
            config = LowRankConfig(**{rule: budget}, **(config_kwargs or {}))
            compress(candidate, config, calibration_data=calibration_data,
                     example_inputs=example_inputs if rule == "macs_reduction" else None, device=device)
        params = count_parameters(candidate)
        row = {"budget": budget, "params": params, "removed": 1 - params / dense_params}
        if dense_macs is not None:
            row["macs"] = count_macs(candidate, example_inputs)
            row["macs_removed"] = 1 - row["macs"] / dense_macs
        row[metric] = evaluate(candidate)
        if budget > 0:
            for key, repair in repairs.items():  # each repair starts from the cut model's own (stale) statistics
                repaired = copy.deepcopy(candidate)
                repair(repaired)
                row[key] = evaluate(repaired)
        rows.append(row)
        if budget > 0 and on_cut is not None:
            on_cut(budget, candidate, row)
        logger.info("budget %.0f%% (%s): %d parameters, %s %.4f%s", 100 * budget, rule, params, metric, row[metric],
                    "".join(f", {BN_REPAIRS[k][0]} {row[k]:.4f}" for k in BN_REPAIRS if k in row))
    return rows


def sweep_markdown(results: dict[str, list[dict[str, Any]]], rule: str = "param_reduction", metric: str = "accuracy") -> str:
    """A Markdown table: one row per budget, one column per model (and per BN repair when present); the budgets are
    fractions of what ``rule`` removes (:data:`RULE_LABELS`), the cells ``metric`` (accuracy in %)."""
    budgets = sorted({row["budget"] for rows in results.values() for row in rows})
    columns = []  # (model name, row key, header)
    for name, rows in results.items():
        columns.append((name, metric, name))
        for key, (header, *_) in BN_REPAIRS.items():
            if any(key in row for row in rows):
                columns.append((name, key, f"{name} {header}"))
    lines = [f"| {RULE_LABELS[rule]} | " + " | ".join(header for *_, header in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for budget in budgets:
        cells = []
        for name, key, _ in columns:
            row = next((r for r in results[name] if r["budget"] == budget), None)
            value = None if row is None else row.get(key, row[metric] if budget == 0 else None)
            cells.append("-" if value is None else f"{METRIC_SCALES[metric] * value:.2f}")
        label = "0% (dense)" if budget == 0 else f"{100 * budget:.0f}%"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(results: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "",
               rule: str = "param_reduction", metric: str = "accuracy") -> Path:
    """PNG: accuracy (%) or perplexity against parameters (or, for a ``macs_reduction`` sweep, multiply-adds) removed
    (%), one line per model (dashed / dotted: BN repairs)."""
    x = "macs_removed" if rule == "macs_reduction" else "removed"
    scale = METRIC_SCALES[metric]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r[x])
        line = ax.plot([100 * r[x] for r in rows], [scale * r[metric] for r in rows], marker="o", label=name)[0]
        for key, (_, label, style) in BN_REPAIRS.items():
            bn = [r for r in rows if key in r]
            if bn:
                ax.plot([100 * r[x] for r in rows[:1] + bn],
                        [scale * rows[0][metric]] + [scale * r[key] for r in bn],
                        marker="x", linestyle=style, color=line.get_color(), label=f"{name} {label}")
    ax.set_xlabel(f"{RULE_LABELS[rule]} (% of the whole model)")
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else metric)
    ax.set_title(title or f"{metric.capitalize()} without fine-tuning", fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    # Many curves: put the legend beside the axes so it never hides one.
    outside = len(ax.get_lines()) > 4
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

"""Accuracy against parameters removed: compress copies of a model at several budgets, no fine-tuning.

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

from .batchnorm import batchnorm_layers, recalibrate_batchnorm
from .lowrank import LowRankConfig, compress, count_parameters

__all__ = ["budget_sweep", "plot_sweep", "sweep_markdown"]

logger = logging.getLogger(__name__)


def budget_sweep(
    model: nn.Module,
    budgets: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    *,
    config_kwargs: dict[str, Any] | None = None,
    recalibration_batches: Callable[[], Iterable[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per budget (0 = the dense model): parameters, fraction removed, accuracy.

    ``evaluate(model) -> accuracy``. With ``recalibration_batches`` (a callable returning fresh
    training batches) and a model that has BatchNorm, each row also gets ``accuracy_bn_recalibrated``:
    the same compressed model after re-estimating BatchNorm statistics (forward passes only, no
    weight changes) -- reported apart so the "no fine-tuning, nothing else" number stays plain.
    ``config_kwargs`` are extra ``LowRankConfig`` fields (targets, ``rank_ratio`` instead of a
    budget is not allowed here).
    """
    dense_params = count_parameters(model)
    recalibrate = recalibration_batches is not None and bool(batchnorm_layers(model))
    rows = []
    for budget in sorted({0.0, *budgets}):
        if budget == 0.0:
            candidate = model
        else:
            candidate = copy.deepcopy(model)
            compress(candidate, LowRankConfig(param_reduction=budget, **(config_kwargs or {})))
        params = count_parameters(candidate)
        row = {"budget": budget, "params": params, "removed": 1 - params / dense_params, "accuracy": evaluate(candidate)}
        if recalibrate and budget > 0:
            recalibrate_batchnorm(candidate, recalibration_batches())
            row["accuracy_bn_recalibrated"] = evaluate(candidate)
        rows.append(row)
        logger.info("budget %.0f%%: %d parameters, accuracy %.4f%s", 100 * budget, params, row["accuracy"],
                    f" ({row['accuracy_bn_recalibrated']:.4f} with BN recalibrated)" if "accuracy_bn_recalibrated" in row else "")
    return rows


def sweep_markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table: one row per budget, one column per model (and per BN variant when present)."""
    budgets = sorted({row["budget"] for rows in results.values() for row in rows})
    columns = []  # (model name, row key, header)
    for name, rows in results.items():
        columns.append((name, "accuracy", name))
        if any("accuracy_bn_recalibrated" in row for row in rows):
            columns.append((name, "accuracy_bn_recalibrated", f"{name} + BN recal."))
    lines = ["| parameters removed | " + " | ".join(header for *_, header in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for budget in budgets:
        cells = []
        for name, key, _ in columns:
            row = next((r for r in results[name] if r["budget"] == budget), None)
            value = None if row is None else row.get(key, row["accuracy"] if budget == 0 else None)
            cells.append("-" if value is None else f"{100 * value:.2f}")
        label = "0% (dense)" if budget == 0 else f"{100 * budget:.0f}%"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(results: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """PNG: accuracy (%) against parameters removed (%), one line per model (dashed: BN recalibrated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r["removed"])
        line = ax.plot([100 * r["removed"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=name)[0]
        bn = [r for r in rows if "accuracy_bn_recalibrated" in r]
        if bn:
            ax.plot([100 * r["removed"] for r in rows[:1] + bn],
                    [100 * rows[0]["accuracy"]] + [100 * r["accuracy_bn_recalibrated"] for r in bn],
                    marker="x", linestyle="--", color=line.get_color(), label=f"{name} + BN recalibration")
    ax.set_xlabel("parameters removed (% of the whole model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy without fine-tuning", fontsize=10, wrap=True)
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

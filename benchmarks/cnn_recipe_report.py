"""Tables from ``benchmarks/cnn_recipe.py`` result lines: accuracy vs parameters (or multiply-adds) removed, mean and
spread over seeds.

    python benchmarks/cnn_recipe_report.py benchmarks/results/cnn_recipe_gpu.jsonl [more.jsonl ...] [--markdown]

Runs whose names differ only in a trailing ``_s<seed>`` are grouped; each cell is the mean accuracy (%) over
the group's seeds, with ± half their range ((max - min) / 2) when there are several. ``nuc`` is the scale-free nuclear term
of the trained model (1 = flat spectrum).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(paths: list[str]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        runs += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return runs


def group_name(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Group -> {budget -> [accuracies]}, seeds, nuclear terms, training seconds."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"acc": defaultdict(list), "seeds": [], "nuc": [],
                                                            "train_seconds": [], "rule": "param_reduction"})
    for run in runs:
        if "error" in run:
            continue
        g = groups[group_name(run["spec"]["name"])]
        g["seeds"].append(run["spec"]["seed"])
        g["nuc"].append(run["normalized_nuclear"])
        g["train_seconds"].append(run["train_seconds"])
        g["rule"] = run.get("sweep_rule", "param_reduction")
        for row in run["rows"]:
            g["acc"][row["budget"]].append(100 * row["accuracy"])
    return groups


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ±{(max(values) - min(values)) / 2:.2f}"


def table(groups: dict[str, dict[str, Any]], only: list[str] | None = None, reference: str | None = None) -> str:
    """One row per group (in ``only``'s order when given); with ``reference`` (a plain group), two more columns:
    the mean accuracy at 70% and 80% minus the reference's mean dense accuracy."""
    names = only or list(groups)
    missing = [n for n in names if n not in groups]
    if missing:
        raise SystemExit(f"no finished run in group(s) {missing}; groups: {sorted(groups)}")
    budgets = sorted({b for n in names for b in groups[n]["acc"]})
    head = "| run | seeds | nuc | cut | " + " | ".join(f"{100 * b:.0f}%" for b in budgets)
    gaps = reference is not None and {0.7, 0.8} <= set(budgets)
    head += " | 70% vs dense plain | 80% vs dense plain |" if gaps else " |"
    lines = [head, "|" + "---|" * (len(budgets) + 4 + 2 * gaps)]
    dense_plain = statistics.fmean(groups[reference]["acc"][0.0]) if gaps else None
    for name in names:
        g = groups[name]
        cut = "MACs" if g["rule"] == "macs_reduction" else "params"
        line = (f"| {name} | {len(g['seeds'])} | {statistics.fmean(g['nuc']):.3f} | {cut} | "
                + " | ".join(cell(g["acc"].get(b, [])) for b in budgets) + " |")
        if gaps:
            line += "".join(f" {statistics.fmean(g['acc'][b]) - dense_plain:+.2f} |" for b in (0.7, 0.8))
        lines.append(line)
    return "\n".join(lines)


def errors(runs: list[dict[str, Any]]) -> list[str]:
    return [f"{r['spec']['name']}: {r['error']}" for r in runs if "error" in r]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="JSON-lines files written by cnn_recipe.py.")
    p.add_argument("--only", default="", help="Comma-separated groups to show, in this order (default: all).")
    p.add_argument("--reference", default=None, help="The plain group the 70%%/80%% gap columns compare with.")
    args = p.parse_args(argv)
    runs = load(args.paths)
    print(table(summarize(runs), [n for n in args.only.split(",") if n] or None, args.reference))
    for line in errors(runs):
        print("ERROR", line)


if __name__ == "__main__":
    main()

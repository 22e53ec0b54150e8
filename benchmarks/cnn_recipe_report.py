"""Tables from ``benchmarks/cnn_recipe.py`` result lines: accuracy vs parameters removed, mean and spread over seeds.

    python benchmarks/cnn_recipe_report.py benchmarks/results/cnn_recipe_gpu.jsonl [more.jsonl ...] [--markdown]

Runs whose names differ only in a trailing ``_s<seed>`` are grouped; each cell is the mean accuracy (%) over
the group's seeds, with the spread (max - min) when there are several. ``nuc`` is the scale-free nuclear term
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
                                                            "train_seconds": []})
    for run in runs:
        if "error" in run:
            continue
        g = groups[group_name(run["spec"]["name"])]
        g["seeds"].append(run["spec"]["seed"])
        g["nuc"].append(run["normalized_nuclear"])
        g["train_seconds"].append(run["train_seconds"])
        for row in run["rows"]:
            g["acc"][row["budget"]].append(100 * row["accuracy"])
    return groups


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ±{(max(values) - min(values)) / 2:.2f}"


def table(groups: dict[str, dict[str, Any]]) -> str:
    budgets = sorted({b for g in groups.values() for b in g["acc"]})
    head = "| run | seeds | nuc | " + " | ".join(f"{100 * b:.0f}%" for b in budgets) + " | train s |"
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    for name, g in groups.items():
        lines.append(f"| {name} | {len(g['seeds'])} | {statistics.fmean(g['nuc']):.3f} | "
                     + " | ".join(cell(g["acc"].get(b, [])) for b in budgets)
                     + f" | {statistics.fmean(g['train_seconds']):.0f} |")
    return "\n".join(lines)


def errors(runs: list[dict[str, Any]]) -> list[str]:
    return [f"{r['spec']['name']}: {r['error']}" for r in runs if "error" in r]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="JSON-lines files written by cnn_recipe.py.")
    args = p.parse_args(argv)
    runs = load(args.paths)
    print(table(summarize(runs)))
    for line in errors(runs):
        print("ERROR", line)


if __name__ == "__main__":
    main()

"""What every benchmark records the same way: the machine, the exact command, the common flags, the JSON.

Each result file states where its numbers came from (date, command, arguments, machine), so every number
in BENCHMARKS.md can be traced to a file. Scripts import this as ``_common`` (they run from this folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import torch

from smooth_hf.core.machine import load_average, machine_info, machine_summary

__all__ = [
    "RESULTS_DIR",
    "add_common_arguments",
    "apply_threads",
    "load_average",
    "machine_info",
    "machine_summary",
    "run_metadata",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_arguments(parser: argparse.ArgumentParser, *, seed: int = 0, threads: int | None = None) -> None:
    """``--threads``, ``--seed``, ``--output_dir`` and ``--tag``, spelled alike in every benchmark (the older
    spellings ``--num_threads`` and ``--out-dir`` still work)."""
    parser.add_argument("--threads", "--num_threads", dest="threads", type=int, default=threads,
                        help="torch.set_num_threads (default: torch's own choice). On a shared machine, fewer "
                        "threads than cores avoids OpenMP oversubscription.")
    parser.add_argument("--seed", type=int, default=seed, help="Seed of the data, the order and the initialisation.")
    parser.add_argument("--output_dir", "--out-dir", dest="output_dir", type=Path, default=RESULTS_DIR,
                        help="Where the result files (JSON, Markdown, PNG) go.")
    parser.add_argument("--tag", default="", help="Suffix of the result file names.")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def run_metadata(script: str, argv: list[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Date, the command that reproduces the run, its parsed arguments and :func:`machine_info`."""
    words = sys.argv[1:] if argv is None else argv
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{Path(script).name}", *words]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path

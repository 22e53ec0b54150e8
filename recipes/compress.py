"""Compress a trained checkpoint without fine-tuning, evaluate it, save it (and push it to the Hub).

    # one budget: 70% fewer parameters over the whole model, evaluated, saved with a model card
    python recipes/compress.py --model_name_or_path runs/smooth --dataset_name fashion_mnist \\
        --param_reduction 0.7 --output_dir runs/smooth-lowrank-70

    # ... and shared on the Hub (needs `hf auth login` or HF_TOKEN)
    python recipes/compress.py --model_name_or_path runs/smooth --param_reduction 0.7 \\
        --output_dir runs/smooth-lowrank-70 --push_to_hub --hub_model_id you/resnet18-smooth-lowrank-70

    # whitened (activation-aware) truncation: each layer cut where it loses the least on 512 training images
    python recipes/compress.py --model_name_or_path runs/smooth --dataset_name fashion_mnist \\
        --param_reduction 0.7 --method whitened --calibration_samples 512 --output_dir runs/smooth-whitened-70

    # a sweep: accuracy vs parameters removed, as a table (Markdown + JSON) and a PNG plot
    python recipes/compress.py --model_name_or_path runs/smooth --budgets 0.5,0.6,0.7,0.8,0.9 \\
        --output_dir runs/smooth-sweep

`--model_name_or_path` is a folder written by recipes/train.py (safetensors + config.json, timm or
transformers). Reload the result with `smooth_hf.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader
from transformers import HfArgumentParser, default_data_collator

from smooth_hf.auto import check_num_labels, image_input_config, load_dense
from smooth_hf.batchnorm import DataFreeRecalibration
from smooth_hf.data import ImageTransform, label_names, load_image_classification
from smooth_hf.evaluation import classification_accuracy
from smooth_hf.hub import push_to_hub, save_pretrained
from smooth_hf.lowrank import LowRankConfig, compress
from smooth_hf.model_card import ModelCardInfo
from smooth_hf.sweep import budget_sweep, plot_sweep, sweep_markdown

logger = logging.getLogger("compress")


@dataclass
class CompressArguments:
    model_name_or_path: str = field(metadata={"help": "A trained dense checkpoint folder (recipes/train.py output)."})
    output_dir: str = field(metadata={"help": "Where the compressed model (or the sweep's table and plot) goes."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "Evaluation data (see recipes/train.py)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the test split."})
    param_reduction: float | None = field(default=None, metadata={"help": "Fraction of ALL parameters to remove (global allocation)."})
    rank_ratio: float | None = field(default=None, metadata={"help": "Keep this fraction of each layer's rank instead."})
    energy: float | None = field(default=None, metadata={"help": "Keep this fraction of each layer's spectral energy instead."})
    budgets: str | None = field(default=None, metadata={"help": "Sweep: comma-separated param_reduction values."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Layers to factorise (default: all)."})
    exclude_modules: list[str] | None = field(default=None, metadata={"help": "Layers to keep dense."})
    skip_first_last: bool = field(default=False, metadata={"help": "Keep the first and last layer dense."})
    rank_multiple: int = field(default=1, metadata={"help": "Round ranks up to a multiple of this (speed)."})
    method: Literal["svd", "whitened"] = field(default="svd", metadata={"help": "'svd': truncated SVD of each weight, no data. 'whitened': "
                        "the cut that loses the least on each layer's inputs over --calibration_samples training "
                        "images (activation-aware, SVD-LLM), ranks allocated by that loss."})
    calibration_samples: int = field(default=512, metadata={"help": "--method whitened: how many training images "
                                     "(a seeded sample of the training split) calibrate the cut."})
    recalibrate_batchnorm: int = field(
        default=0, metadata={"help": "Re-estimate BatchNorm statistics on this many training images after the cut "
                             "(forward passes only; 0 = off, the plain no-fine-tuning result)."},
    )
    batchnorm_data_free: bool = field(
        default=False, metadata={"help": "Re-estimate BatchNorm statistics after the cut on inputs synthesised from the "
                                 "dense model's own statistics: no training images needed (forward passes only)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the compressed model to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. you/model-lowrank-70."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the dense model, for the card."})
    seed: int = field(default=42, metadata={"help": "Seed for the eval subset and BN batches."})

    def __post_init__(self) -> None:
        rules = [self.param_reduction, self.rank_ratio, self.energy, self.budgets]
        if sum(r is not None for r in rules) != 1:
            raise ValueError("give exactly one of --param_reduction, --rank_ratio, --energy or --budgets")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. you/model-lowrank-70)")
        if self.recalibrate_batchnorm < 0:
            raise ValueError(f"--recalibrate_batchnorm is a number of training images >= 0, got {self.recalibrate_batchnorm}")
        if self.recalibrate_batchnorm and self.batchnorm_data_free and not self.budgets:
            raise ValueError("give --recalibrate_batchnorm N (training images) or --batchnorm_data_free (no data), "
                             "not both: one compressed model gets one set of statistics (a --budgets sweep may "
                             "report both)")
        if self.method == "whitened" and self.calibration_samples < 1:
            raise ValueError(f"--method whitened needs --calibration_samples >= 1 (a few hundred), got {self.calibration_samples}")
        if self.push_to_hub and self.budgets:
            raise ValueError("--push_to_hub uploads one model: use --param_reduction, not --budgets")


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(CompressArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    out = Path(args.output_dir)

    model = load_dense(args.model_name_or_path)
    spec = image_input_config(model)
    transform = {k: spec[k] for k in ("channels", "mean", "std", "image_size")}
    data = load_image_classification(args.dataset_name, args.dataset_config_name, seed=args.seed)
    check_num_labels(model, len(label_names(data["train"])))
    test = data["test"]
    if args.max_eval_samples:
        test = test.shuffle(seed=args.seed).select(range(min(args.max_eval_samples, len(test))))
    test = test.with_transform(ImageTransform(**transform))
    shuffled = data["train"].shuffle(seed=args.seed)

    def batches(n: int) -> DataLoader:
        """The first ``n`` images of one seeded shuffle of the training split, as the trainer batches them."""
        subset = shuffled.select(range(min(n, len(shuffled)))).with_transform(ImageTransform(**transform))
        return DataLoader(subset, batch_size=128, collate_fn=default_data_collator)

    calibration = batches(args.calibration_samples) if args.method == "whitened" else None

    # Synthetic inputs take the data's image shape: a CIFAR-stem model may be configured for 32x32 and fed 28x28.
    data_free = None
    if args.batchnorm_data_free:
        data_free = DataFreeRecalibration(input_shape=tuple(test[0]["pixel_values"].shape), seed=args.seed)

    def evaluate(m):
        return classification_accuracy(m, test)

    targets = {"target_modules": args.target_modules, "exclude_modules": args.exclude_modules,
               "skip_first_last": args.skip_first_last, "rank_multiple": args.rank_multiple, "method": args.method}
    if calibration is not None:
        targets["calibration_dataset"] = f"{args.dataset_name} (training split, sample of seed {args.seed})"
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
        rows = budget_sweep(model, budgets, evaluate, config_kwargs=targets,
                            recalibration_batches=(lambda: batches(args.recalibrate_batchnorm))
                            if args.recalibrate_batchnorm else None,
                            data_free_batchnorm=data_free or False, calibration_data=calibration)
        results = {Path(args.model_name_or_path).name: rows}
        out.mkdir(parents=True, exist_ok=True)
        table = sweep_markdown(results)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        plot = plot_sweep(results, out / "accuracy_vs_params_removed.png")
        print(table, f"\ntable: {out / 'results.md'}\nplot: {plot}", sep="\n")
        return results

    dense_accuracy = evaluate(model)
    config = LowRankConfig(param_reduction=args.param_reduction, rank_ratio=args.rank_ratio, energy=args.energy, **targets)
    recalibration = batches(args.recalibrate_batchnorm) if args.recalibrate_batchnorm else data_free
    compress(model, config, calibration_data=calibration, recalibrate_batchnorm=recalibration)
    accuracy = evaluate(model)
    report = model.lowrank_report
    print(report)
    print(f"accuracy: dense {100 * dense_accuracy:.2f}% -> compressed {100 * accuracy:.2f}% "
          f"({'BN recalibrated, ' + report.batchnorm_recalibration if report.batchnorm_recalibrated else 'no fine-tuning, nothing else'})")
    card = ModelCardInfo(base_model=args.base_model, datasets=[args.dataset_name], dataset_split="test",
                         metrics={"accuracy": accuracy}, dense_metrics={"accuracy": dense_accuracy},
                         training=_training_setup(args.model_name_or_path))
    save_pretrained(model, out, model_card=card)
    print(f"saved: {out}  (reload: smooth_hf.from_pretrained({str(out)!r}))")
    if args.push_to_hub:
        url = push_to_hub(model, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token, model_card=card)
        print(f"pushed: {url}")
    return {"dense_accuracy": dense_accuracy, "accuracy": accuracy, "reduction": model.lowrank_report.reduction}


def _training_setup(checkpoint: str) -> dict:
    """Penalty coefficients from the training run's saved arguments, when recipes/train.py wrote them."""
    path = Path(checkpoint) / "training_args.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    keys = ("nuclear_norm_coef", "first_order_coef", "second_order_coef", "penalty_normalization",
            "num_train_epochs", "learning_rate")
    return {k: saved[k] for k in keys if k in saved}


if __name__ == "__main__":
    main()

"""The main job: the paper's claim on its own model family, on real data, end to end, in minutes on a CPU.

    make main        # = python recipes/smooth_vs_plain.py

1. trains the same CIFAR-style ResNet (``resnet14_cifar``) twice from scratch on real Fashion-MNIST (local
   Debian files, no Hub), with the recommended CNN recipe (``smooth_hf.recommended``): once plain, once with
   the nuclear-norm penalty -- through ``recipes/train.py``, as a user would;
2. compresses copies of both at several budgets (fraction of ALL parameters removed) by truncated SVD with
   the global rank allocation -- no fine-tuning, no BatchNorm repair, nothing else -- through
   ``recipes/compress.py --budgets``;
3. prints the table (accuracy vs parameters removed, smooth vs plain), writes it as Markdown and JSON with a
   PNG plot, and saves the smooth model compressed at ``--save_budget`` with its model card
   (``recipes/compress.py --param_reduction``).

The defaults fit a 2-core CPU in minutes (the model is a narrow ResNet-14 and training is short); every
argument of ``recipes/train.py`` is accepted too, e.g. the full recipe on ResNet-18 with a GPU::

    python recipes/smooth_vs_plain.py --model_name_or_path resnet18_cifar --config_overrides "" \\
        --max_train_samples 0 --max_eval_samples 0 --num_train_epochs 4 --output_dir runs/main-r18
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import compress as compress_recipe
import train as train_recipe
import transformers
from transformers import HfArgumentParser

from smooth_hf import SmoothTrainingArguments
from smooth_hf.recommended import CNN_DATA, CNN_TRAINING
from smooth_hf.script_args import ModelArguments, TrainingDataArguments
from smooth_hf.sweep import plot_sweep, sweep_markdown

PENALTIES = ("nuclear_norm_coef", "first_order_coef", "second_order_coef")

# What `make main` runs: the CNN recipe on a model and data sized for minutes on 2 CPU cores.
MAIN_JOB_DEFAULTS = {
    **CNN_TRAINING,
    **CNN_DATA,
    "model_name_or_path": "resnet14_cifar",
    "config_overrides": "channels=[16,32,64]",
    "dataset_name": "fashion_mnist",
    "max_train_samples": 30000,
    "num_train_epochs": 2,
    "max_eval_samples": 5000,
    "output_dir": "runs/main",
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "nuclear_norm_coef": 0.3,
}


@dataclass
class MainJobArguments:
    budgets: str = field(default="0.5,0.6,0.7,0.8,0.9", metadata={"help": "Fractions of all parameters to remove."})
    save_budget: float = field(default=0.7, metadata={"help": "Budget at which the smooth model is saved with a card."})


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((MainJobArguments, ModelArguments, TrainingDataArguments, SmoothTrainingArguments))
    parser.set_defaults(**MAIN_JOB_DEFAULTS)
    job, model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    for name in ("max_train_samples", "max_eval_samples"):  # 0 = all, so the defaults can be switched off
        if getattr(data_args, name) == 0:
            setattr(data_args, name, None)
    return job, model_args, data_args, training_args


def main(argv: list[str] | None = None) -> dict:
    job, model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    out = Path(training_args.output_dir)
    if not any(getattr(training_args, k) for k in PENALTIES):
        raise ValueError("the smooth model needs a penalty: give --nuclear_norm_coef (or another *_coef) > 0")

    runs = {"plain": replace(training_args, output_dir=str(out / "plain"), **dict.fromkeys(PENALTIES, 0.0)),
            "smooth": replace(training_args, output_dir=str(out / "smooth"))}
    results, timings = {}, {}
    for name, args in runs.items():
        penalties = {k: getattr(args, k) for k in PENALTIES if getattr(args, k)}
        print(f"\n== training the {name} model ({model_args.model_name_or_path}, penalties: {penalties or 'none'}) ==",
              flush=True)
        began = time.time()
        train_recipe.run(model_args, replace(data_args), replace(args, do_train=True, do_eval=False))
        timings[f"train_{name}_seconds"] = round(time.time() - began, 1)
        print(f"== compressing the {name} model at {job.budgets} (no fine-tuning) ==", flush=True)
        sweep = compress_recipe.main(["--model_name_or_path", args.output_dir, "--budgets", job.budgets,
                                      "--output_dir", str(out / f"{name}-sweep")])
        (results[name],) = sweep.values()

    saved = out / f"smooth-lowrank-{round(100 * job.save_budget)}"
    compress_recipe.main(["--model_name_or_path", str(out / "smooth"), "--param_reduction", str(job.save_budget),
                          "--output_dir", str(saved)])

    table = sweep_markdown(results)
    (out / "results.md").write_text(table + "\n")
    timings["total_seconds"] = round(time.time() - start, 1)
    arguments = {"job": asdict(job), "model": asdict(model_args), "data": asdict(data_args),
                 "training": {k: v for k, v in training_args.to_dict().items() if k in {*MAIN_JOB_DEFAULTS, "seed"}}}
    (out / "results.json").write_text(json.dumps({"arguments": arguments, "timings": timings, "results": results},
                                                 indent=2, default=str))
    title = f"{model_args.model_name_or_path} on {data_args.dataset_name}, no fine-tuning"
    plot = plot_sweep(results, out / "accuracy_vs_params_removed.png", title)
    num_test = data_args.max_eval_samples or "all"
    print(f"\n== accuracy (%) on {num_test} {data_args.dataset_name} test images vs parameters removed, "
          "no fine-tuning ==")
    print(table)
    print(f"\ntable: {out / 'results.md'}\nplot: {plot}\ncompressed smooth model + card: {saved}")
    print(f"total time: {timings['total_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()

"""The main job: smooth vs plain training, then compression without fine-tuning, on real data, end to end.

    make main        # = python recipes/smooth_vs_plain.py            (the "cnn" recipe, minutes on 2 CPU cores)
    python recipes/smooth_vs_plain.py --recipe cnn-full --output_dir runs/main-cnn-full   # the paper's setting

1. trains the same model twice from scratch on real Fashion-MNIST (local Debian files, no Hub), through
   ``recipes/train.py`` as a user would: once plain, once smooth (the recipe's rank projection and/or penalties);
2. compresses copies of both at several budgets (fraction of ALL parameters removed) by truncated SVD with
   the global rank allocation -- no fine-tuning, no BatchNorm repair, nothing else -- through
   ``recipes/compress.py --budgets``, scored on all 10,000 test images;
3. prints the table (accuracy vs parameters removed, smooth vs plain), writes it as Markdown and JSON with a
   PNG plot, and saves the smooth model compressed at ``--save_budget`` with its model card (the smooth model's
   sweep keeps that cut: ``recipes/compress.py --budgets ... --param_reduction``).

``--recipe`` picks the model and training settings, built from ``smooth_hf.training.presets``:

* ``cnn`` (default): the CNN recipe (``CNN_TRAINING``, ``CNN_DATA``: SGD, one-cycle, rank projection planned for
  80% fewer parameters) shrunk to fit a 2-core CPU in minutes: the CIFAR-style ``resnet14_cifar`` at widths
  16-32-128 (ResNet-18's shape: most parameters in the last stage) on 20,000 images for 2 epochs at batch 64, the
  plain and the smooth model trained side by side (BENCHMARKS.md, section 1 says what it shows).
* ``cnn-full``: the CNN recipe as recommended, on ``resnet14_cifar`` at widths 32-64-128, all 60,000 training
  images for 4 epochs: the setting of the paper's claim. Minutes on a GPU, much longer on 2 CPU cores (timings:
  BENCHMARKS.md, section 2).
* ``vit``: a small vision transformer (4 layers, hidden 64, no BatchNorm) on 20,000 images for 5 epochs with
  AdamW and nuclear norm + first-order differences (``VIT_TRAINING``).

Every argument of ``recipes/train.py`` is accepted too and overrides the recipe, e.g. ResNet-18 with a GPU::

    python recipes/smooth_vs_plain.py --recipe cnn-full --model_name_or_path resnet18_cifar --output_dir runs/main-r18
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from ..core.machine import core_shares
from ..evaluation.sweep import plot_sweep, sweep_markdown
from ..training.config import PLAIN, SmoothTrainingArguments
from ..training.presets import CNN_DATA, CNN_TRAINING, VIT_TRAINING
from . import compress as compress_recipe
from . import train as train_recipe
from .args import ModelArguments, TrainingDataArguments

# Settings every recipe shares; each recipe adds its model and training settings (a command line overrides both).
COMMON_DEFAULTS = {
    "dataset_name": "fashion_mnist",
    "output_dir": "runs/main",
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "max_eval_samples": 0,  # all 10,000 test images
}
RECIPES: dict[str, dict] = {
    "cnn": {
        **CNN_TRAINING,
        **CNN_DATA,
        "model_name_or_path": "resnet14_cifar",
        # ResNet-18's shape at a size that trains in minutes: most parameters in the last, cheapest stage (7x7 maps)
        "config_overrides": "channels=[16,32,128]",
        "max_train_samples": 20000,
        "num_train_epochs": 2,
        # twice the updates of the recipe's batch 128 in about the same time: at this short length the projected
        # model gains more from them than plain does (BENCHMARKS.md, section 1)
        "per_device_train_batch_size": 64,
    },
    "cnn-full": {
        **CNN_TRAINING,
        **CNN_DATA,
        "model_name_or_path": "resnet14_cifar",
        "max_train_samples": 0,  # all 60,000
    },
    "vit": {
        **VIT_TRAINING,
        "model_type": "vit",
        "config_overrides": "image_size=28,patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,"
                            "intermediate_size=128",
        "max_train_samples": 20000,
    },
}
DEFAULT_RECIPE = "cnn"  # what `make main` runs
_MODEL_KEYS = ("model_name_or_path", "model_type", "config_overrides")


@dataclass
class MainJobArguments:
    recipe: str = field(
        default=DEFAULT_RECIPE, metadata={"help": "Model and training settings (smooth_hf.training.presets).", "choices": sorted(RECIPES)}
    )
    budgets: str = field(default="0.5,0.7,0.8,0.9", metadata={"help": "Fractions of all parameters to remove."})
    save_budget: float = field(default=0.7, metadata={"help": "Budget at which the smooth model is saved with a card."})
    side_by_side: bool = field(
        default=True,
        metadata={"help": "Train and sweep the plain and the smooth model at the same time, in two processes with half "
                  "of the CPU cores each (on 2 cores more work per second than one after the other with both: "
                  "BENCHMARKS.md, section 1); their logs go to <output_dir>/plain.log and smooth.log. False: one "
                  "after the other, logging here."},
    )


def defaults_for(recipe: str, argv: list[str]) -> dict:
    """The recipe's settings; a model named on the command line replaces the recipe's model entirely."""
    settings = {**COMMON_DEFAULTS, **RECIPES[recipe]}
    if any(arg.split("=")[0] in ("--model_name_or_path", "--model_type") for arg in argv):
        for key in _MODEL_KEYS:
            settings.pop(key, None)
    return settings


def parse_args(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    recipe = pre.parse_known_args(argv)[0].recipe
    parser = HfArgumentParser((MainJobArguments, ModelArguments, TrainingDataArguments, SmoothTrainingArguments))
    parser.set_defaults(**defaults_for(recipe, argv))
    job, model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    for name in ("max_train_samples", "max_eval_samples"):  # 0 = all, so a recipe (or a user) can switch them off
        if getattr(data_args, name) == 0:
            setattr(data_args, name, None)
    return job, model_args, data_args, training_args


def train_and_sweep(
    name: str, model_args: ModelArguments, data_args: TrainingDataArguments, args: SmoothTrainingArguments,
    budgets: str, eval_flags: list[str], model_name: str, keep: tuple[float, Path] | None = None,
) -> tuple[list[dict], float]:
    """Train one model through ``recipes/train.py``, then sweep it through ``recipes/compress.py --budgets``:
    its rows (accuracy per budget) and its training time in seconds. ``keep = (budget, folder)``: the cut at that
    budget is saved there with its card (the sweep's results go there too)."""
    steering = {k: getattr(args, k) for k in PLAIN if getattr(args, k)}
    print(f"\n== training the {name} model ({model_name}, {steering or 'no penalty, no projection'}) ==", flush=True)
    began = time.time()
    train_recipe.run(model_args, replace(data_args), replace(args, do_train=True, do_eval=False))
    seconds = round(time.time() - began, 1)
    print(f"== compressing the {name} model at {budgets} (no fine-tuning) ==", flush=True)
    output_dir = Path(args.output_dir)
    kept = ["--param_reduction", str(keep[0]), "--output_dir", str(keep[1])] if keep else \
        ["--output_dir", str(output_dir.parent / f"{name}-sweep")]
    sweep = compress_recipe.main(["--model_name_or_path", str(output_dir), "--budgets", budgets, *kept, *eval_flags])
    (rows,) = sweep.values()
    return rows, seconds


def _in_own_process(task: tuple, cores: list[int], log: Path) -> tuple[list[dict], float]:
    """:func:`train_and_sweep` in a child process pinned to ``cores`` (one torch thread per core), its output to ``log``."""
    os.sched_setaffinity(0, cores)  # its own cores: two processes' threads never compete for one core
    torch.set_num_threads(len(cores))
    with open(log, "w") as stream:  # file descriptors, so that C-level and logging output land there too
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    name, model_args, data_args, args, *rest = task
    return train_and_sweep(name, model_args, data_args, replace(args, disable_tqdm=True), *rest)  # a log, not a terminal


def main(argv: list[str] | None = None) -> dict:
    job, model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    out = Path(training_args.output_dir)
    if not training_args.steers_to_low_rank:
        raise ValueError("the smooth model needs rank projection or a penalty: give --rank_projection_param_reduction "
                         "(e.g. 0.8) or --nuclear_norm_coef (or another *_coef) > 0")

    # the sweeps score the test images the job names (compress.py's own default is every test image)
    eval_flags = ["--max_eval_samples", str(data_args.max_eval_samples)] if data_args.max_eval_samples else []
    model_name = model_args.model_name_or_path or f"{model_args.model_type} from scratch"
    runs = {"plain": replace(training_args, output_dir=str(out / "plain"), **PLAIN),
            "smooth": replace(training_args, output_dir=str(out / "smooth"))}
    saved = out / f"smooth-lowrank-{round(100 * job.save_budget)}"
    keep = {"smooth": (job.save_budget, saved)}  # the smooth model's sweep also saves its cut at --save_budget
    results, timings = {}, {}
    tasks = {name: (name, model_args, data_args, args, job.budgets, eval_flags, model_name, keep.get(name))
             for name, args in runs.items()}
    shares = core_shares(len(tasks)) if job.side_by_side else None
    if shares is None:
        for name, task in tasks.items():
            results[name], timings[f"train_{name}_seconds"] = train_and_sweep(*task)
    else:
        out.mkdir(parents=True, exist_ok=True)
        logs = {name: out / f"{name}.log" for name in tasks}
        print(f"\n== training and compressing the plain and the smooth model side by side ({model_name}, "
              f"{len(shares[0])} CPU core(s) each); logs: {', '.join(map(str, logs.values()))} ==", flush=True)
        with ProcessPoolExecutor(len(tasks), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_in_own_process, task, share, logs[name]): name
                       for (name, task), share in zip(tasks.items(), shares, strict=True)}
            for future in as_completed(futures):
                name = futures[future]
                try:
                    results[name], timings[f"train_{name}_seconds"] = future.result()
                except Exception as err:
                    raise RuntimeError(f"the {name} model's run failed ({err}): its log is {logs[name]}") from err
                dense = results[name][0]["accuracy"]
                print(f"{name}: trained in {timings[f'train_{name}_seconds']:.0f} s, dense accuracy "
                      f"{100 * dense:.2f}%, swept at {job.budgets}", flush=True)
        results = {name: results[name] for name in tasks}  # plain first, whichever finished first

    table = sweep_markdown(results)
    (out / "results.md").write_text(table + "\n")
    timings["total_seconds"] = round(time.time() - start, 1)
    arguments = {"job": asdict(job), "model": asdict(model_args), "data": asdict(data_args),
                 "training": training_args.to_dict()}
    (out / "results.json").write_text(json.dumps({"arguments": arguments, "timings": timings, "results": results},
                                                 indent=2, default=str))
    title = f"{model_name} on {data_args.dataset_name}, no fine-tuning"
    plot = plot_sweep(results, out / "accuracy_vs_params_removed.png", title)
    num_test = data_args.max_eval_samples or "all"
    print(f"\n== accuracy (%) on {num_test} {data_args.dataset_name} test images vs parameters removed, "
          "no fine-tuning ==")
    print(table)
    print(f"\ntable: {out / 'results.md'}\nplot: {plot}\ncompressed smooth model + card: {saved}")
    print(f"total time: {timings['total_seconds']:.0f} s")
    return results


def cli() -> None:
    """The ``smooth-hf-main-job`` console script."""
    main()

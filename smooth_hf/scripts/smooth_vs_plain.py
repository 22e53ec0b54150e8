"""The main job: smooth vs plain training, then compression without fine-tuning, on real data, end to end.

    make main        # = python recipes/smooth_vs_plain.py            (the "cnn" recipe, minutes on 2 CPU cores)
    python recipes/smooth_vs_plain.py --recipe cnn-full --output_dir runs/main-cnn-full   # the paper's setting

1. trains the same model twice from scratch on real Fashion-MNIST (local Debian files, no Hub), through
   ``recipes/train.py`` as a user would: once plain, once smooth (the recipe's rank projection and/or penalties);
2. compresses copies of both at several budgets (fraction of ALL parameters removed) by truncated SVD with
   the global rank allocation -- no fine-tuning, no BatchNorm repair, nothing else -- through
   ``recipes/compress.py --budgets``, scored on all 10,000 test images;
3. times both models cut at ``--save_budget`` against their dense selves (eager and ``torch.compile``, batch 1 and
   64, in the same process: ``smooth_hf.evaluation.latency``), so the table shows speed beside size;
4. prints the tables (accuracy vs parameters removed, smooth vs plain; the speed-ups of the cut), writes them as
   Markdown and JSON with a PNG plot, and saves the smooth model compressed at ``--save_budget`` with its model card
   (the smooth model's sweep keeps that cut: ``recipes/compress.py --budgets ... --param_reduction``).

``--recipe`` picks the model and training settings, built from ``smooth_hf.training.presets``:

* ``cnn`` (default): the CNN recipe (``CNN_TRAINING``, ``CNN_DATA``: SGD, one-cycle, rank projection planned for
  80% fewer parameters) shrunk to fit a 2-core CPU in minutes: the CIFAR-style ``resnet14_cifar`` at widths
  16-32-128 (ResNet-18's shape: most parameters in the last stage) on 20,000 images for 2 epochs at batch 64, the
  plain and the smooth model trained side by side (BENCHMARKS.md, section 1 says what it shows).
* ``cnn-full``: the CNN recipe as recommended, on ``resnet14_cifar`` at widths 32-64-128, all 60,000 training
  images for 4 epochs: the setting of the paper's claim. Minutes on a GPU, much longer on 2 CPU cores (timings:
  BENCHMARKS.md, section 2).
* ``cnn-speed``: the ``cnn`` recipe planned for a compute budget instead (``CNN_SPEED_TRAINING``: 70% fewer
  multiply-adds on the training images), swept and saved by multiply-adds removed: the cut that is faster, not only
  smaller.
* ``vit``: a small vision transformer (4 layers, hidden 64, no BatchNorm) on 20,000 images for 5 epochs with
  AdamW and nuclear norm + first-order differences (``VIT_TRAINING``).

Every argument of ``recipes/train.py`` is accepted too and overrides the recipe, e.g. ResNet-18 with a GPU::

    python recipes/smooth_vs_plain.py --recipe cnn-full --model_name_or_path resnet18_cifar --output_dir runs/main-r18
"""

from __future__ import annotations

import argparse
import copy
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

from ..checkpoint.dense import load_dense
from ..core.files import TRAINING_ARGS_NAME
from ..core.machine import core_shares
from ..evaluation.latency import RUNTIME_NAMES, RUNTIMES, speedups
from ..evaluation.sweep import RULE_LABELS, plot_sweep, sweep_markdown
from ..lowrank import LowRankConfig, compress
from ..training.config import PLAIN, SmoothTrainingArguments
from ..training.cut_plan import example_inputs_for
from ..training.presets import CNN_DATA, CNN_SPEED_TRAINING, CNN_TRAINING, VIT_TRAINING
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
_MAIN_JOB_CNN = {
    **CNN_DATA,
    "model_name_or_path": "resnet14_cifar",
    # ResNet-18's shape at a size that trains in minutes: most parameters in the last, cheapest stage (7x7 maps)
    "config_overrides": "channels=[16,32,128]",
    "max_train_samples": 20000,
    "num_train_epochs": 2,
    # twice the updates of the recipe's batch 128 in about the same time: at this short length the projected
    # model gains more from them than plain does (BENCHMARKS.md, section 1)
    "per_device_train_batch_size": 64,
}
RECIPES: dict[str, dict] = {
    "cnn": {**CNN_TRAINING, **_MAIN_JOB_CNN},
    "cnn-speed": {**CNN_SPEED_TRAINING, **_MAIN_JOB_CNN},
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
    save_budget: float = field(
        default=0.7, metadata={"help": "Budget at which the smooth model is saved with a card, and both models are "
                               "timed against their dense selves."})
    speed_batch_sizes: str = field(
        default="1,64", metadata={"help": "Batch sizes at which the cuts are timed; '' = no timing."})
    speed_runtimes: str = field(
        default="eager,compile", metadata={"help": "How the cuts are timed, comma-separated: eager (PyTorch), eager_cl (eager in channels_last), "
                                "eager_fused (eager_cl with each BatchNorm folded into its convolution), compile "
                                "(torch.compile)."})
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


@dataclass
class _Job:
    """What both models' runs share: the sweep, the cut kept and timed, and how it is scored."""

    rule: str  # the LowRankConfig rule of the budgets: param_reduction, or macs_reduction for a compute recipe
    budgets: str
    save_budget: float
    speed_batch_sizes: tuple[int, ...]
    speed_runtimes: tuple[str, ...]
    eval_flags: list[str]
    model_name: str


def train_and_sweep(
    name: str, model_args: ModelArguments, data_args: TrainingDataArguments, args: SmoothTrainingArguments, job: _Job,
    keep: Path | None = None,
) -> tuple[list[dict], float, dict]:
    """Train one model through ``recipes/train.py``, sweep it through ``recipes/compress.py --budgets``, and time its
    cut at the save budget against its dense self: its rows (accuracy per budget), its training time in seconds and
    the timings. ``keep``: the folder where the cut at the save budget is saved with its card (the sweep's results
    go there too)."""
    steering = {k: getattr(args, k) for k in PLAIN if getattr(args, k)}
    print(f"\n== training the {name} model ({job.model_name}, {steering or 'no penalty, no projection'}) ==", flush=True)
    began = time.time()
    _, _, data = train_recipe.run(model_args, replace(data_args), replace(args, do_train=True, do_eval=False))
    seconds = round(time.time() - began, 1)
    print(f"== compressing the {name} model at {job.budgets} of its {job.rule} (no fine-tuning) ==", flush=True)
    output_dir = Path(args.output_dir)
    kept = [f"--{job.rule}", str(job.save_budget), "--output_dir", str(keep)] if keep else \
        ["--output_dir", str(output_dir.parent / f"{name}-sweep")]
    sweep = compress_recipe.main(["--model_name_or_path", str(output_dir), "--budgets", job.budgets,
                                  "--budget_rule", job.rule, *kept, *job.eval_flags])
    (rows,) = sweep.values()
    speed = {}
    if job.speed_batch_sizes:
        shape = tuple(data["test"][0]["pixel_values"].shape)
        print(f"== timing the {name} model cut at {job.save_budget} of its {job.rule} against its dense self "
              f"(batch {', '.join(map(str, job.speed_batch_sizes))}; {', '.join(job.speed_runtimes)}) ==", flush=True)
        speed = time_cut(output_dir, job.rule, job.save_budget, shape, job.speed_batch_sizes, job.speed_runtimes)
    return rows, seconds, speed


def time_cut(folder: Path, rule: str, budget: float, shape: tuple[int, ...], batch_sizes: tuple[int, ...],
             runtimes: tuple[str, ...]) -> dict:
    """The dense model in ``folder`` and its cut at ``budget`` (as recipes/compress.py makes it: the plan's rank
    multiple), timed together in this process (:func:`smooth_hf.evaluation.latency.speedups`)."""
    dense = load_dense(folder).eval()
    saved = json.loads((folder / TRAINING_ARGS_NAME).read_text())
    config = LowRankConfig(**{rule: budget}, rank_multiple=saved.get("plan_rank_multiple"))
    cut = compress(copy.deepcopy(dense), config, example_inputs=example_inputs_for(shape))
    timings = speedups({"dense": dense, "cut": cut}, lambda batch: example_inputs_for(shape, batch), batch_sizes,
                       runtimes)
    report = cut.lowrank_report
    return {"rule": rule, "budget": budget, "input_shape": list(shape), "threads": torch.get_num_threads(),
            "params_removed": report.reduction, "macs_removed": 1 - report.macs_after / report.macs_before,
            "latency": timings}


def _in_own_process(task: tuple, cores: list[int], log: Path) -> tuple[list[dict], float, dict]:
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
    # both models are swept and timed by the rule the smooth model was trained for (a compute budget: multiply-adds)
    rule = training_args.projection_rule or "param_reduction"
    runtimes = tuple(r.strip() for r in job.speed_runtimes.split(",") if r.strip())
    if set(runtimes) - set(RUNTIMES):  # checked before minutes of training, not after
        raise ValueError(f"--speed_runtimes {job.speed_runtimes!r}: use a comma-separated subset of {','.join(RUNTIMES)}")
    shared = _Job(rule, job.budgets, job.save_budget, tuple(int(b) for b in job.speed_batch_sizes.split(",") if b),
                  runtimes, eval_flags, model_name)
    runs = {"plain": replace(training_args, output_dir=str(out / "plain"), **PLAIN),
            "smooth": replace(training_args, output_dir=str(out / "smooth"))}
    saved = out / f"smooth-lowrank-{round(100 * job.save_budget)}"
    keep = {"smooth": saved}  # the smooth model's sweep also saves its cut at --save_budget
    results, timings, speed = {}, {}, {}
    tasks = {name: (name, model_args, data_args, args, shared, keep.get(name)) for name, args in runs.items()}
    shares = core_shares(len(tasks)) if job.side_by_side else None
    if shares is None:
        for name, task in tasks.items():
            results[name], timings[f"train_{name}_seconds"], speed[name] = train_and_sweep(*task)
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
                    results[name], timings[f"train_{name}_seconds"], speed[name] = future.result()
                except Exception as err:
                    raise RuntimeError(f"the {name} model's run failed ({err}): its log is {logs[name]}") from err
                dense = results[name][0]["accuracy"]
                print(f"{name}: trained in {timings[f'train_{name}_seconds']:.0f} s, dense accuracy "
                      f"{100 * dense:.2f}%, swept at {job.budgets}", flush=True)
        results = {name: results[name] for name in tasks}  # plain first, whichever finished first

    table = sweep_markdown(results, rule)
    speed_table = speed_markdown(results, speed) if shared.speed_batch_sizes else ""
    (out / "results.md").write_text(table + "\n" + (f"\n{speed_table}\n" if speed_table else ""))
    timings["total_seconds"] = round(time.time() - start, 1)
    arguments = {"job": asdict(job), "model": asdict(model_args), "data": asdict(data_args),
                 "training": training_args.to_dict()}
    (out / "results.json").write_text(json.dumps({"arguments": arguments, "timings": timings, "results": results,
                                                  "speed": speed}, indent=2, default=str))
    title = f"{model_name} on {data_args.dataset_name}, no fine-tuning"
    plot = plot_sweep(results, out / compress_recipe.plot_name(rule), title, rule)
    num_test = data_args.max_eval_samples or "all"
    print(f"\n== accuracy (%) on {num_test} {data_args.dataset_name} test images vs {RULE_LABELS[rule]}, "
          "no fine-tuning ==")
    print(table)
    if speed_table:
        print(f"\n== speed of the cut at {job.save_budget:.0%} of the {'multiply-adds' if rule == 'macs_reduction' else 'parameters'}"
              f" against the same model dense (one process per model, {speed['smooth']['threads']} thread(s)) ==")
        print(speed_table)
    print(f"\ntable: {out / 'results.md'}\nplot: {plot}\ncompressed smooth model + card: {saved}")
    print(f"total time: {timings['total_seconds']:.0f} s")
    return results


def speed_markdown(results: dict[str, list[dict]], speed: dict[str, dict]) -> str:
    """One row per model: the cut's accuracy, what it removes, and its speed-up over the same model dense."""
    first = next(iter(speed.values()))
    columns = list(first["latency"]["cut"])  # eager_b1, compile_b1, eager_b64, ...
    order = list(RUNTIMES)  # eager first, as the runtimes are listed
    columns.sort(key=lambda c: (int(c.rsplit("_b", 1)[1]), order.index(c.rsplit("_b", 1)[0])))
    header = [f"{RUNTIME_NAMES[c.rsplit('_b', 1)[0]]} b{c.rsplit('_b', 1)[1]}" for c in columns]
    lines = ["| model, cut | accuracy | parameters removed | multiply-adds removed | " + " | ".join(header) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for name, timed in speed.items():
        row = next(r for r in results[name] if r["budget"] == timed["budget"])
        cells = [f"{timed['latency']['cut'][c]['speedup']:.2f}x" for c in columns]
        label = f"{timed['budget']:.0%} fewer {'multiply-adds' if timed['rule'] == 'macs_reduction' else 'parameters'}"
        lines.append(f"| {name}, {label} | {100 * row['accuracy']:.2f} | {timed['params_removed']:.1%} | "
                     f"{timed['macs_removed']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli() -> None:
    """The ``smooth-hf-main-job`` console script."""
    main()

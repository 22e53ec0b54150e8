"""Compress a trained checkpoint without fine-tuning, evaluate it, save it (and push it to the Hub).

    # one budget: 70% fewer parameters over the whole model, evaluated, saved with a model card
    python recipes/compress.py --model_name_or_path runs/smooth --param_reduction 0.7 \\
        --output_dir runs/smooth-lowrank-70

    # ... and shared on the Hub (needs `hf auth login` or HF_TOKEN)
    python recipes/compress.py --model_name_or_path runs/smooth --param_reduction 0.7 \\
        --output_dir runs/smooth-lowrank-70 --push_to_hub --hub_model_id you/resnet18-smooth-lowrank-70

    # whitened (activation-aware) truncation: each layer cut where it loses the least on 512 training images
    python recipes/compress.py --model_name_or_path runs/smooth --param_reduction 0.7 --method whitened \\
        --calibration_samples 512 --output_dir runs/smooth-whitened-70

    # ... with the ranks allocated by each layer's measured effect on the model's output (a few forward
    # passes over the first --sensitivity_samples calibration images per layer)
    python recipes/compress.py --model_name_or_path runs/smooth --param_reduction 0.7 --method whitened \\
        --rank_allocation sensitivity --output_dir runs/smooth-sensitivity-70

    # a sweep: accuracy vs parameters removed, as a table (Markdown + JSON) and a PNG plot
    python recipes/compress.py --model_name_or_path runs/smooth --budgets 0.5,0.6,0.7,0.8,0.9 \\
        --output_dir runs/smooth-sweep

    # ... keeping one of the cuts: the model at --param_reduction is saved too, with its card
    python recipes/compress.py --model_name_or_path runs/smooth --budgets 0.5,0.6,0.7,0.8,0.9 \\
        --param_reduction 0.7 --output_dir runs/smooth-lowrank-70

    # a model trained for a cut (rank projection), cut as it was trained: the rule, budget and input shape are
    # read from its training_args.json (e.g. 70% fewer multiply-adds on 1x28x28 images)
    python recipes/compress.py --model_name_or_path runs/speed --output_dir runs/speed-cut

    # 70% fewer multiply-adds on the inputs the model will serve (default: the training data's shape)
    python recipes/compress.py --model_name_or_path runs/smooth --macs_reduction 0.7 --input_shape 1,28,28 \\
        --output_dir runs/smooth-macs-70

`--model_name_or_path` is a folder written by recipes/train.py (safetensors + config.json, timm or
transformers). The model is evaluated on the data it was trained on (recorded in the folder's
`data_args.json`: dataset, split, seed) unless `--dataset_name` names other data; the same
`--max_eval_samples` scores the same images as in training. A model trained for a cut (rank projection) is cut, when
no rule is given, with the rule and budget it was trained for, and always with the rank multiple its plan used
(`plan_rank_multiple` in the folder's `training_args.json`) unless `--rank_multiple` says otherwise; multiply-adds
are priced on the input shape the plan used (`plan_input_shape`) unless `--input_shape` says otherwise. Reload the result with
`smooth_hf.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from ..checkpoint.card import ModelCardInfo
from ..checkpoint.compressed import save_pretrained
from ..checkpoint.dense import load_dense
from ..checkpoint.folders import check_save_target
from ..core.files import TRAINING_ARGS_NAME
from ..data.images import (
    dataset_card_fields,
    dataset_display_name,
    select_subset,
)
from ..evaluation.accuracy import logits_of
from ..evaluation.sweep import budget_sweep, plot_sweep, sweep_markdown
from ..hub import push_to_hub
from ..lowrank import compress
from ..lowrank.batchnorm import DataFreeRecalibration
from ..training.cut_plan import example_inputs_for, format_shape, parse_shape
from ..training.smoothness import COEFFICIENTS
from .args import DataArguments, LowRankArguments, resolve_data_arguments
from .task_data import load_task_data

logger = logging.getLogger("compress")
_REMOVED = {"param_reduction": "params_removed", "macs_reduction": "macs_removed"}


def plot_name(rule: str, metric: str = "accuracy") -> str:
    """The sweep plot's file name: ``accuracy_vs_params_removed.png`` and the like."""
    return f"{metric}_vs_{_REMOVED[rule]}.png"


CALIBRATION_SAMPLES = 512  # --calibration_samples' default


@dataclass
class CompressArguments:
    model_name_or_path: str = field(metadata={"help": "A trained dense checkpoint folder (recipes/train.py output)."})
    output_dir: str = field(metadata={"help": "Where the compressed model (or the sweep's table and plot) goes."})
    budgets: str | None = field(
        default=None, metadata={"help": "Sweep: comma-separated fractions of --budget_rule, each cut scored (a table "
                                "and a plot). With that rule's flag too (--param_reduction / --macs_reduction), the "
                                "model cut at that budget is also saved, with its card, from the same run."}
    )
    budget_rule: str | None = field(
        default=None, metadata={"help": "What --budgets remove: param_reduction (parameters) or macs_reduction "
                                "(multiply-adds on --input_shape). Default: the rule the model was trained for "
                                "(training_args.json), else param_reduction.", "choices": list(LowRankArguments.BUDGETS)},
    )
    input_shape: str | None = field(
        default=None, metadata={"help": "One input sample's shape that --macs_reduction prices multiply-adds on "
                                "(channels,height,width, e.g. 3,32,32; or a number of tokens). Default: the one the "
                                "training plan used (plan_input_shape in training_args.json), else the evaluation "
                                "data's."},
    )
    recalibrate_batchnorm: int = field(
        default=0, metadata={"help": "Re-estimate BatchNorm statistics on this many training images after the cut "
                             "(forward passes only; 0 = off, the plain no-fine-tuning result)."},
    )
    calibration_samples: int = field(
        default=CALIBRATION_SAMPLES, metadata={"help": "--method whitened: how many training images (a seeded sample of the training "
                               "split, the same images every time) calibrate the cut."},
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
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the test split (datasets without one), the evaluation subset and the BN batches "
                  "(default: the training run's)."},
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Where the calibration passes and the decompositions run (e.g. cuda), the model staying in "
                  "CPU memory: a model made of repeated blocks (an LLM) is moved there one block at a time."},
    )

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. you/model-lowrank-70)")
        if self.recalibrate_batchnorm < 0:
            raise ValueError(f"--recalibrate_batchnorm is a number of training images >= 0, got {self.recalibrate_batchnorm}")
        if self.recalibrate_batchnorm and self.batchnorm_data_free and not self.budgets:
            raise ValueError("give --recalibrate_batchnorm N (training images) or --batchnorm_data_free (no data), "
                             "not both: one compressed model gets one set of statistics (a --budgets sweep may "
                             "report both)")
        if self.calibration_samples < 1:
            raise ValueError(f"--calibration_samples is a number of training images >= 1, got {self.calibration_samples}")
        if self.budgets is not None:
            self.budget_values()  # checked now, before a model or data is loaded

    def budget_values(self) -> list[float]:
        """``--budgets`` as numbers, each a fraction of the parameters in [0, 1); anything else is a clear error."""
        wrong = ValueError(f"--budgets takes comma-separated fractions of the parameters to remove, each in [0, 1), "
                           f"e.g. 0.5,0.7,0.9; got {self.budgets!r}")
        try:
            values = [float(b) for b in (self.budgets or "").split(",") if b.strip()]
        except ValueError:
            raise wrong from None
        if not values or not all(0 <= v < 1 for v in values):
            raise wrong
        return values


def parse_args(argv: list[str] | None = None) -> tuple[CompressArguments, DataArguments, LowRankArguments]:
    parser = HfArgumentParser((CompressArguments, DataArguments, LowRankArguments))
    args, data_args, rank_args = parser.parse_args_into_dataclasses(args=argv)
    rules = rank_args.rules_given()
    if len(rules) > 1 + (args.budgets is not None):
        raise ValueError("give one of --param_reduction, --macs_reduction, --rank_ratio or --energy (or none: the cut "
                         "the model was trained for), or --budgets (a sweep, which may add the cut it saves)")
    if args.budgets is not None and any(rule not in LowRankArguments.BUDGETS for rule in rules):
        raise ValueError("a --budgets sweep saves a cut of its own rule: give --param_reduction or --macs_reduction "
                         "with it, not --rank_ratio / --energy")
    if args.budgets is not None and rules and (args.recalibrate_batchnorm or args.batchnorm_data_free):
        raise ValueError("a sweep keeps its cut as made (no BN repair): to save a BN-repaired model, give the "
                         "budget and the repair without --budgets")
    if args.input_shape is not None:
        args.input_shape = format_shape(parse_shape(args.input_shape, "--input_shape"))
    if args.hub_model_id and not args.push_to_hub:
        logger.warning("--hub_model_id does nothing without --push_to_hub (nothing is uploaded)")
    if args.push_to_hub and not rules and args.budgets:
        raise ValueError("--push_to_hub uploads one model: with --budgets, give the budget to upload (e.g. "
                         "--param_reduction 0.7)")
    return args, data_args, rank_args


def resolve_rule(args: CompressArguments, rank_args: LowRankArguments, setup: dict) -> str | None:
    """Fill the cut the model was trained for when no rule is given; the rule of ``--budgets`` (None: no sweep).

    A model trained with rank projection is exactly of the planned ranks: cut with the same rule and budget, method
    and targets (and the rank multiple and input shape of the plan, applied in :func:`main`), it loses nothing. The
    method and the embeddings follow the plan unless given.
    """
    for name, planned_value in (("method", setup.get("rank_projection_method")),
                                ("factorise_embeddings", setup.get("factorise_embeddings"))):
        if getattr(rank_args, name) is None:
            setattr(rank_args, name, planned_value if planned_value is not None else rank_args.targets()[name])
            if planned_value not in (None, "svd", False):
                print(f"{name} {planned_value}: as the model was trained for its cut (training_args.json)")
    if args.calibration_samples != CALIBRATION_SAMPLES and rank_args.method != "whitened":
        logger.warning("--calibration_samples does nothing without --method whitened")
    planned = next(((rule, setup[f"rank_projection_{rule}"]) for rule in LowRankArguments.BUDGETS
                    if setup.get(f"rank_projection_{rule}") is not None), None)
    rules = rank_args.rules_given()
    if args.budgets is not None:
        rule = args.budget_rule or (rules[0] if rules else planned[0] if planned else "param_reduction")
        if rules and rules != [rule]:
            raise ValueError(f"--budgets sweeps {rule} (--budget_rule), so the cut it saves is a {rule} too: give "
                             f"--{rule}, not --{rules[0]}")
        return rule
    if args.budget_rule is not None:
        logger.warning("--budget_rule does nothing without --budgets")
    if not rules:
        if planned is None:
            raise ValueError("give one of --param_reduction, --macs_reduction, --rank_ratio, --energy or --budgets: "
                             f"{args.model_name_or_path} was not trained for a cut (no rank_projection_*_reduction "
                             "in its training_args.json), so there is no planned cut to make")
        setattr(rank_args, *planned)
        print(f"{planned[0]} {planned[1]}: the cut the model was trained for (rank_projection_{planned[0]} in "
              "training_args.json)")
    return None


def main(argv: list[str] | None = None) -> dict:
    args, data_args, rank_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    out = Path(args.output_dir)
    setup = _training_setup(args.model_name_or_path)  # for the card, and the cut training planned
    sweep_rule = resolve_rule(args, rank_args, setup)
    kept_budget = getattr(rank_args, sweep_rule) if sweep_rule else None  # the sweep's cut to save, if any
    if not args.budgets or kept_budget is not None:  # a model will be saved there: refuse now, not after
        check_save_target(out)

    model = load_dense(args.model_name_or_path)
    planned = setup.get("plan_rank_multiple")
    if rank_args.rank_multiple is None and planned is not None:  # cut in the ranks training planned, not others
        rank_args.rank_multiple = planned
        print(f"rank_multiple {planned}: the multiple the model was trained for (plan_rank_multiple in training_args.json)")
    data_args, seed, record = resolve_data_arguments(data_args, args.model_name_or_path, args.seed)
    task = load_task_data(model, args.model_name_or_path, data_args, seed, record)
    if record is not None and task.labels is not None and record.get("labels") not in (None, task.labels):
        logger.warning("the evaluation data's classes %s are not the ones the model was trained on %s (recorded in "
                       "data_args.json): the accuracy compares different labels; check --dataset_name",
                       task.labels, record["labels"])
    test = task.test
    print(f"evaluation data: {data_args.dataset_name}, {len(test)} test {task.unit} (seed {seed})")

    def batches(n: int) -> DataLoader:
        """``n`` training examples (the first of the seeded shuffle every recipe uses), batched as in training."""
        size = 128 if task.metric == "accuracy" else 8  # a language model's sequences are long
        return DataLoader(select_subset(task.train, n, seed), batch_size=size, collate_fn=task.collate)

    calibration = batches(args.calibration_samples) if rank_args.method == "whitened" else None
    recorded = {}  # what the card and compression_config.json say the cut was calibrated on
    if calibration is not None:
        shown = dataset_display_name(data_args.dataset_name)  # the card may be pushed: no local path in it
        recorded["calibration_dataset"] = f"{shown} (training split, seeded sample, seed {seed})"
    targets = {**rank_args.targets(), **recorded}

    # Synthetic inputs take the data's image shape: a CIFAR-stem model may be configured for 32x32 and fed 28x28.
    data_free = None
    if args.batchnorm_data_free:
        data_free = DataFreeRecalibration(input_shape=task.sample_shape, seed=seed)

    # Multiply-adds are priced on one sample of the shape the training plan used (or given, or the data's).
    shape = args.input_shape or setup.get("plan_input_shape") or format_shape(task.sample_shape)
    uses_macs = sweep_rule == "macs_reduction" or rank_args.macs_reduction is not None
    example = example_inputs_for(parse_shape(shape, "--input_shape")) if uses_macs else None
    if uses_macs:
        print(f"multiply-adds priced on inputs of shape ({shape})")
    elif args.input_shape is not None:
        logger.warning("--input_shape does nothing without --macs_reduction (or a --budgets sweep of macs_reduction)")
    evaluate, metric, processor = task.evaluate, task.metric, task.processor

    def save(compressed, score: float, dense_score: float) -> None:
        """Write ``compressed`` with its card to ``--output_dir`` (and push it, if asked)."""
        card = ModelCardInfo(base_model=args.base_model, **dataset_card_fields(data_args.dataset_name),
                             dataset_split="test", metrics={metric: score}, dense_metrics={metric: dense_score},
                             training={**setup, f"test {task.unit} scored": len(test)})
        save_pretrained(compressed, out, model_card=card, processor=processor)
        print(f"saved: {out}  (reload: smooth_hf.from_pretrained({str(out)!r}))")
        if args.push_to_hub:
            url = push_to_hub(compressed, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                              model_card=card, processor=processor)
            print(f"pushed: {url}")

    if args.budgets:
        budgets = sorted(set(args.budget_values()) | ({kept_budget} if kept_budget is not None else set()))
        kept = {}

        def keep_cut(budget: float, cut, row: dict) -> None:
            if budget == kept_budget:
                kept.update(model=cut, row=row)

        rows = budget_sweep(model, budgets, evaluate, config_kwargs=targets,
                            recalibration_batches=(lambda: batches(args.recalibrate_batchnorm))
                            if args.recalibrate_batchnorm else None,
                            data_free_batchnorm=data_free or False, calibration_data=calibration, on_cut=keep_cut,
                            rule=sweep_rule, example_inputs=example, metric=metric,
                            # a language model is cut block by block at every budget: its statistics are not kept
                            reuse_statistics=metric == "accuracy", device=args.device)
        results = {Path(args.model_name_or_path).name: rows}
        out.mkdir(parents=True, exist_ok=True)
        table = sweep_markdown(results, sweep_rule, metric)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        plot = plot_sweep(results, out / plot_name(sweep_rule, metric), rule=sweep_rule, metric=metric)
        print(table, f"\ntable: {out / 'results.md'}\nplot: {plot}", sep="\n")
        if kept:
            print(kept["model"].lowrank_report)
            save(kept["model"], kept["row"][metric], rows[0][metric])
        return results

    dense_score = evaluate(model)
    # How far the cut moves the outputs, on the first test examples: float round-off for a model trained for this cut.
    probe = next(iter(DataLoader(test, batch_size=8 if metric == "perplexity" else 64, collate_fn=task.collate)))
    before = _logits(model, probe)
    recalibration = batches(args.recalibrate_batchnorm) if args.recalibrate_batchnorm else data_free
    config = replace(rank_args.to_config(), **recorded)
    compress(model, config, calibration_data=calibration, recalibrate_batchnorm=recalibration, example_inputs=example,
             device=args.device)
    score = evaluate(model)
    change = float((_logits(model, probe) - before).abs().max())
    report = model.lowrank_report
    print(report)
    shown = (lambda v: f"{100 * v:.2f}%") if metric == "accuracy" else (lambda v: f"{v:.3f}")
    print(f"{metric}: dense {shown(dense_score)} -> compressed {shown(score)} "
          f"({'BN recalibrated, ' + report.batchnorm_recalibration if report.batchnorm_recalibrated else 'no fine-tuning, nothing else'}); "
          f"the logits of the first {len(before)} test {task.unit} moved by at most {change:.3g}")
    save(model, score, dense_score)
    return {f"dense_{metric}": dense_score, metric: score, "reduction": report.reduction, "num_test": len(test),
            "max_logit_change": change, "model": model}


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return logits_of(model, batch).float()
    finally:
        model.train(was_training)


def _training_setup(checkpoint: str) -> dict:
    """Penalties and rank projection from the training run's saved arguments, when recipes/train.py wrote them."""
    path = Path(checkpoint) / TRAINING_ARGS_NAME
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    setup = {k: saved[k] for k in COEFFICIENTS if saved.get(k)}  # the penalties that were on
    if setup:
        setup["penalty_normalization"] = saved.get("penalty_normalization")
    planning = ("nuclear_norm_param_reduction", "nuclear_norm_macs_reduction", "rank_projection_param_reduction",
                "rank_projection_macs_reduction")
    setup.update({k: saved[k] for k in (*planning, "num_train_epochs", "learning_rate") if saved.get(k) is not None})
    if (saved.get("max_steps") or -1) > 0:  # the Trainer stops at max_steps, whatever num_train_epochs says
        setup.pop("num_train_epochs", None)
        setup["max_steps"] = saved["max_steps"]
    if any(k in setup for k in planning):  # the planned cut's rounding, and the inputs a compute budget was priced on
        setup.update({k: saved[k] for k in ("plan_rank_multiple", "plan_input_shape") if saved.get(k) is not None})
    if any(k.startswith("rank_projection") for k in setup):  # how the projection cut: the later cut cuts the same way
        setup.update({k: saved[k] for k in ("rank_projection_method", "factorise_embeddings") if k in saved})
    return setup


def cli() -> None:
    """The ``smooth-hf-compress`` console script."""
    main()

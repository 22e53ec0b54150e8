"""The main job: smooth vs plain training, then compression without fine-tuning, on real data.

    make main        # = python recipes/smooth_vs_plain.py --output_dir runs/main

1. trains the same small vision transformer twice, from scratch, on real Fashion-MNIST (local Debian
   files, no Hub): plain, and with the smoothness penalties;
2. compresses copies of both at several budgets (fraction of ALL parameters removed) by truncated
   SVD with the global rank allocation -- no fine-tuning, no other step;
3. prints the table (accuracy vs parameters removed, smooth vs plain) and writes it as Markdown and
   JSON, a PNG plot, and the smooth model compressed at --save_budget with its model card.

BatchNorm recalibration (forward passes only) is reported in separate columns, never mixed into the
plain "no fine-tuning" numbers (the default ViT has no BatchNorm, so there are none). The defaults
fit a 2-core CPU in under 10 minutes. The paper's CNN setting, CPU-sized:

    python recipes/smooth_vs_plain.py --model_name_or_path resnet14_cifar \
        --config_overrides "channels=[16,32,64]" --num_train_epochs 3 --augment \
        --nuclear_norm_coef 10 --first_order_coef 0    # CNNs: the nuclear norm alone (BENCHMARKS.md, section 2)

and with --model_name_or_path resnet18_cifar --config_overrides "" and the full training set on a GPU.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, default_data_collator, set_seed

from smooth_hf import SmoothTrainer, SmoothTrainingArguments
from smooth_hf.auto import build_model, image_input_config, save_dense
from smooth_hf.data import ImageTransform, label_names, load_image_classification
from smooth_hf.evaluation import classification_accuracy
from smooth_hf.hub import save_pretrained
from smooth_hf.lowrank import LowRankConfig, compress
from smooth_hf.model_card import ModelCardInfo
from smooth_hf.sweep import budget_sweep, plot_sweep, sweep_markdown

logger = logging.getLogger("smooth_vs_plain")


@dataclass
class MainJobArguments:
    output_dir: str = field(default="runs/main", metadata={"help": "Where the table, plot, models and card go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A timm name (e.g. resnet14_cifar) or transformers checkpoint, instead of --model_type."}
    )
    model_type: str | None = field(
        default="vit", metadata={"help": "A transformers architecture trained from scratch (used when no --model_name_or_path)."}
    )
    config_overrides: str | None = field(
        default="image_size=28,patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128",
        metadata={"help": "Model config / timm kwargs, e.g. 'channels=[16,32,64]' for resnet14_cifar. The default: a "
                  "139k-parameter ViT that trains in about 2.5 minutes on 2 CPU cores."},
    )
    augment: bool = field(default=False, metadata={"help": "Random crop + flip while training (helps CNNs, slows ViTs)."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "Any dataset smooth_hf.data loads."})
    max_train_samples: int | None = field(default=20000, metadata={"help": "Training images (None = all)."})
    max_eval_samples: int | None = field(default=5000, metadata={"help": "Test images for every accuracy."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs for each of the two models."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate (cosine schedule)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    nuclear_norm_coef: float = field(default=5.0, metadata={"help": "Smooth model: nuclear-norm coefficient."})
    first_order_coef: float = field(default=1.0, metadata={"help": "Smooth model: first-order coefficient."})
    second_order_coef: float = field(default=0.0, metadata={"help": "Smooth model: second-order coefficient."})
    nuclear_norm_every: int = field(default=25, metadata={"help": "SVD refresh period of the nuclear norm."})
    budgets: str = field(default="0.5,0.6,0.7,0.8,0.9", metadata={"help": "Fractions of parameters to remove."})
    bn_recalibration_samples: int = field(
        default=512, metadata={"help": "Training images for the separate BN-recalibration columns (0 = skip)."}
    )
    save_budget: float = field(default=0.7, metadata={"help": "Budget at which the smooth model is saved with a card."})
    seed: int = field(default=42, metadata={"help": "Seed for data order and initialisation (same for both)."})


def train_one(name: str, job: MainJobArguments, data, coefs: dict[str, float]):
    set_seed(job.seed)
    names = label_names(data["train"])
    model = build_model(job.model_name_or_path or None, model_type=job.model_type or None, num_labels=len(names),
                        num_channels=1, config_overrides=job.config_overrides or None, id2label=dict(enumerate(names)))
    args = SmoothTrainingArguments(
        output_dir=str(Path(job.output_dir) / name), num_train_epochs=job.num_train_epochs,
        per_device_train_batch_size=job.per_device_train_batch_size, learning_rate=job.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=job.weight_decay, logging_steps=25, save_strategy="no",
        report_to=[], seed=job.seed, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **coefs,
    )
    spec = image_input_config(model)
    transform = {"channels": spec["channels"], "mean": spec["mean"], "std": spec["std"], "image_size": spec["image_size"]}
    train = data["train"].with_transform(ImageTransform(**transform, train=job.augment))
    print(f"\n== training the {name} model ({sum(p.numel() for p in model.parameters()):,} parameters; "
          f"penalties: {coefs or 'none'}) ==", flush=True)
    SmoothTrainer(model=model, args=args, train_dataset=train).train()
    save_dense(model, Path(job.output_dir) / name / "dense")
    return model.eval(), transform


def main(argv: list[str] | None = None) -> dict:
    (job,) = HfArgumentParser(MainJobArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("smooth_hf.sweep").setLevel(logging.INFO)
    start = time.time()
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in job.budgets.split(",")]

    data = load_image_classification(job.dataset_name, seed=job.seed)
    if job.max_train_samples:
        data["train"] = data["train"].shuffle(seed=job.seed).select(range(min(job.max_train_samples, len(data["train"]))))
    if job.max_eval_samples:
        data["test"] = data["test"].shuffle(seed=job.seed).select(range(min(job.max_eval_samples, len(data["test"]))))
    print(f"data: {job.dataset_name}, {len(data['train'])} training / {len(data['test'])} test images", flush=True)

    smooth_coefs = {"nuclear_norm_coef": job.nuclear_norm_coef, "first_order_coef": job.first_order_coef,
                    "second_order_coef": job.second_order_coef, "nuclear_norm_every": job.nuclear_norm_every}
    results, models = {}, {}
    for name, coefs in (("plain", {}), ("smooth", smooth_coefs)):
        model, transform = train_one(name, job, data, coefs)
        test = data["test"].with_transform(ImageTransform(**transform))
        calib = data["train"].select(range(min(job.bn_recalibration_samples, len(data["train"]))))
        calib = calib.with_transform(ImageTransform(**transform))

        def batches(calib=calib):
            return torch.utils.data.DataLoader(calib, batch_size=128, collate_fn=default_data_collator)

        print(f"== compressing the {name} model at {job.budgets} (no fine-tuning) ==", flush=True)
        results[name] = budget_sweep(model, budgets, lambda m, test=test: classification_accuracy(m, test),
                                     recalibration_batches=batches if job.bn_recalibration_samples else None)
        models[name] = (model, test)

    table = sweep_markdown(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"arguments": asdict(job), "results": results}, indent=2))
    plot = plot_sweep(results, out / "accuracy_vs_params_removed.png",
                      f"{job.model_name_or_path or job.model_type} on {job.dataset_name}, no fine-tuning")

    # The smooth model at the saved budget, with a card whose numbers were measured just now.
    model, test = models["smooth"]
    dense_accuracy = next(r["accuracy"] for r in results["smooth"] if r["budget"] == 0)
    compress(model, LowRankConfig(param_reduction=job.save_budget))
    accuracy = classification_accuracy(model, test)
    card = ModelCardInfo(
        model_name=f"{job.model_name_or_path or job.model_type}-fashion-mnist-smooth-lowrank-{round(100 * job.save_budget)}",
        datasets=["zalando-datasets/fashion_mnist" if job.dataset_name == "fashion_mnist" else job.dataset_name],
        dataset_pretty_name="Fashion-MNIST" if job.dataset_name == "fashion_mnist" else None, dataset_split="test",
        task="image-classification", metrics={"accuracy": accuracy}, dense_metrics={"accuracy": dense_accuracy},
        training={**smooth_coefs, "epochs": job.num_train_epochs, "train images": len(data["train"]),
                  "learning_rate": job.learning_rate, "model kwargs": job.config_overrides or "-"},
        license="apache-2.0",
    )
    saved = save_pretrained(model, out / f"smooth-lowrank-{round(100 * job.save_budget)}", model_card=card)

    print(f"\n== accuracy (%) on {len(test)} {job.dataset_name} test images vs parameters removed, no fine-tuning ==")
    print(table)
    print(f"\ntable: {out / 'results.md'}\nplot: {plot}\ncompressed smooth model + card: {saved}")
    print(f"total time: {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()

"""Train an image classifier with smoothness penalties (smooth_hf), on 1 CPU, N CPU processes or N GPUs.

Copy-paste commands (from the repository root, after `make install`):

    # the paper's model on real Fashion-MNIST (local Debian files, no Hub), one process
    accelerate launch recipes/train.py --model_name_or_path resnet18_cifar --dataset_name fashion_mnist \\
        --max_train_samples 512 --max_eval_samples 256 --do_train --do_eval --output_dir runs/smooth \\
        --nuclear_norm_coef 5 --first_order_coef 1 --num_train_epochs 1 --per_device_train_batch_size 64

    # two real CPU processes (gloo DDP)
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml recipes/train.py ...same flags...

    # every GPU of a machine (set num_processes in the file or on the command line)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/train.py ...same flags...

    # a transformers ViT from scratch, or any Hub checkpoint / timm model
    accelerate launch recipes/train.py --model_type vit \\
        --config_overrides "image_size=28,patch_size=4,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256" \\
        --dataset_name fashion_mnist --do_train --do_eval --output_dir runs/vit --first_order_coef 1
    accelerate launch recipes/train.py --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name cifar10 ...

Without penalty flags this is plain training (the baseline). The output folder holds the weights
(safetensors) and the config that rebuilds the model: `recipes/compress.py` takes it from there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser, set_seed

from smooth_hf import SmoothTrainer, SmoothTrainingArguments
from smooth_hf.auto import build_model, check_num_labels, image_input_config, save_dense
from smooth_hf.data import ImageTransform, label_names, load_image_classification
from smooth_hf.metrics import accuracy_metrics

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A timm model name (e.g. resnet18_cifar, resnet14_cifar, timm/resnet18.a1_in1k) or a "
                  "transformers checkpoint (Hub id or local folder)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train a transformers architecture of this type from scratch (e.g. vit) instead."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value overrides of the model config / timm kwargs, e.g. "
                  "'hidden_size=128,num_hidden_layers=4'."},
    )
    from_scratch: bool = field(default=False, metadata={"help": "Do not load pretrained weights."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist (local Debian files when installed, else the Hub), cifar10, any Hub "
                  "image-classification dataset, a save_to_disk folder, or a folder of class sub-folders."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split (debugging, quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the eval split."})
    train_val_split: float = field(default=0.1, metadata={"help": "Eval fraction when the dataset has no test split."})
    augment: bool = field(default=True, metadata={"help": "Random crop + flip on training images."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, SmoothTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    data = load_image_classification(
        data_args.dataset_name, data_args.dataset_config_name, data_args.image_column_name,
        data_args.label_column_name, data_args.train_val_split, training_args.seed,
    )
    names = label_names(data["train"])
    model = build_model(
        model_args.model_name_or_path, num_labels=len(names), model_type=model_args.model_type,
        config_overrides=model_args.config_overrides, pretrained=not model_args.from_scratch,
        num_channels=1 if model_args.model_type is None and _is_grey(data["train"]) else None,
        id2label=dict(enumerate(names)),
    )
    check_num_labels(model, len(names))

    spec = image_input_config(model)
    common = {"channels": spec["channels"], "mean": spec["mean"], "std": spec["std"], "image_size": spec["image_size"]}
    train, test = data["train"], data["test"]
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    train = train.with_transform(ImageTransform(**common, train=data_args.augment))
    test = test.with_transform(ImageTransform(**common))

    # Images are transformed on the fly from the raw "image" column, which the model's forward does not
    # name: the Trainer must not drop it (as in transformers' run_image_classification.py).
    training_args.remove_unused_columns = False
    trainer = SmoothTrainer(
        model=model, args=training_args, train_dataset=train if training_args.do_train else None,
        eval_dataset=test if training_args.do_eval else None, compute_metrics=accuracy_metrics,
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            # Weights + the config that rebuilds them, and the arguments (penalties) for the model card.
            save_dense(trainer.model, training_args.output_dir)
            with open(os.path.join(training_args.output_dir, "training_args.json"), "w") as f:
                json.dump(training_args.to_dict(), f, indent=2, default=str)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return metrics


def _is_grey(dataset) -> bool:
    """Whether the images have one channel (then a timm model is built with in_chans=1)."""
    import numpy as np

    return np.asarray(dataset[0]["image"]).ndim == 2


if __name__ == "__main__":
    main()

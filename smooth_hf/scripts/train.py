r"""Train an image classifier for low-rank compression (smooth_hf), on 1 CPU, N CPU processes or N GPUs.

Copy-paste commands (from the repository root, after `make install`):

    # the recommended CNN recipe (smooth_hf.training.presets) on real Fashion-MNIST (local Debian files, no Hub);
    # for the plain baseline drop the last flag and use another --output_dir; for a faster model (docs/training-for-speed.md)
    # replace it by --rank_projection_macs_reduction 0.7 --output_dir runs/speed. resnet18_cifar is the paper's model
    # (a GPU job). On a CPU, without --num_cpu_threads_per_process accelerate launch trains with one thread whatever the cores.
    accelerate launch --num_cpu_threads_per_process $(nproc) recipes/train.py --model_name_or_path resnet14_cifar --dataset_name fashion_mnist \
        --do_train --do_eval --output_dir runs/smooth --optim sgd --optim_args momentum=0.9,nesterov=True \
        --learning_rate 0.1 --weight_decay 5e-4 --lr_scheduler_type cosine --warmup_steps 0.25 \
        --per_device_train_batch_size 128 --num_train_epochs 4 --channels_last --augment --random_crop_padding 0 \
        --rank_projection_param_reduction 0.8

    # two real CPU processes (gloo DDP); with --per_device_train_batch_size 64 the recipe's batch stays 128
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml recipes/train.py ...same flags...

    # every GPU of a machine (set num_processes in the file or on the command line)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/train.py ...same flags...

    # a transformers ViT from scratch, or any Hub checkpoint / timm model
    accelerate launch recipes/train.py --model_type vit \
        --config_overrides "image_size=28,patch_size=4,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256" \
        --dataset_name fashion_mnist --do_train --do_eval --output_dir runs/vit --first_order_coef 1 --learning_rate 2e-3
    accelerate launch recipes/train.py --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name cifar10 \
        --do_train --do_eval --output_dir runs/vit-cifar10 --learning_rate 2e-5 --augment

Without penalty or rank-projection flags this is plain training (the baseline). Models trained from scratch need a
`--learning_rate` (the Trainer's default suits fine-tuning); `--augment` adds random flips (and crops of the
image padded by `--random_crop_padding` pixels). The output folder holds the weights (safetensors), the config
that rebuilds the model and a record of the data (`data_args.json`): `recipes/compress.py` takes it from there.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
import transformers
from datasets import DatasetDict
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint.build import build_model, check_num_labels, task_of
from ..checkpoint.dense import save_dense
from ..core.files import TRAINING_ARGS_NAME, WEIGHTS_NAME
from ..data.images import image_channels, label_names, prepare_image_splits
from ..data.processors import image_input_config, image_processor_for
from ..data.text import prepare_text_splits, text_collator, tokenizer_for
from ..evaluation.metrics import accuracy_metrics
from ..training.config import SmoothTrainingArguments
from ..training.shards import whole_weights
from ..training.trainer import SmoothTrainer
from .args import ModelArguments, TrainingDataArguments, save_data_record

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, TrainingDataArguments, SmoothTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, TrainingDataArguments, SmoothTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def check_output_dir(training_args: SmoothTrainingArguments) -> None:
    """Refuse, before any work, a command that would do nothing or mix two runs in one folder."""
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("nothing to do: pass --do_train (and --do_eval to score the test split)")
    out = training_args.output_dir
    if not training_args.do_train or training_args.resume_from_checkpoint or training_args.overwrite_output_dir:
        return
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    earlier = last or next((os.path.join(out, name) for name in (WEIGHTS_NAME, TRAINING_ARGS_NAME)
                            if os.path.isfile(os.path.join(out, name))), None)
    if earlier:
        resume = f"resume it with --resume_from_checkpoint {last}, " if last else ""
        raise ValueError(
            f"--output_dir {out} holds an earlier run ({earlier}): {resume}choose another --output_dir, or pass "
            "--overwrite_output_dir to train there anyway (its files are replaced; checkpoints it has stay)."
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    check_output_dir(training_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    return run(model_args, data_args, training_args)[1]


def run(
    model_args: ModelArguments, data_args: TrainingDataArguments, training_args: SmoothTrainingArguments
) -> tuple[SmoothTrainer, dict[str, float], DatasetDict]:
    """Build, train (and evaluate) as the command line asks; the trainer, its metrics and the transformed splits.

    The main job (:mod:`smooth_hf.scripts.smooth_vs_plain`) trains its two models through this, so it runs what users run.
    """
    set_seed(training_args.seed)
    text = task_of(model_args.model_name_or_path, model_args.model_type) == "text-classification"
    if text:
        raw = prepare_text_splits(**data_args.split_kwargs(text=True), seed=training_args.seed)
    else:
        raw = prepare_image_splits(**data_args.split_kwargs(), seed=training_args.seed)
    names = label_names(raw["train"])
    model = build_model(
        model_args.model_name_or_path, num_labels=len(names), model_type=model_args.model_type,
        config_overrides=model_args.config_overrides, pretrained=not model_args.from_scratch,
        # timm models are built for the data's channels; transformers models convert the images instead
        num_channels=image_channels(raw["train"]) if model_args.model_type is None and not text else None,
        id2label=dict(enumerate(names)), task="text-classification" if text else "image-classification",
    )
    check_num_labels(model, len(names))
    collator = None
    if text:
        # The checkpoint's own tokenizer, saved with the model so that every later step and pipeline(...) reads it.
        processor = tokenizer_for(model_args.model_name_or_path)
        data = prepare_text_splits(raw, processor, max_seq_length=data_args.max_seq_length)
        collator = text_collator(processor)  # pads each batch to its longest sentence
    else:
        # A transformers checkpoint's own image processor (its size and normalisation), or the one a model built from
        # a config is trained with; saved with the model, so that every later step and pipeline(...) reads the same.
        processor = image_processor_for(model, model_args.model_name_or_path)
        data = prepare_image_splits(raw, image_input_config(model, processor), **data_args.transform_kwargs())
        # Images are transformed on the fly from the raw "image" column, which the model's forward does not
        # name: the Trainer must not drop it (as in transformers' run_image_classification.py).
        training_args.remove_unused_columns = False
    trainer = SmoothTrainer(
        model=model, args=training_args, train_dataset=data["train"] if training_args.do_train else None,
        eval_dataset=data["test"] if training_args.do_eval else None, compute_metrics=accuracy_metrics,
        processing_class=processor, data_collator=collator,
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        # Under FSDP2 every process takes part in gathering the weights whole; the main process writes the same folder
        # as a run without sharding.
        with whole_weights(trainer.model) as model:
            if trainer.is_world_process_zero():
                # Weights + the config that rebuilds them, the arguments (penalties) for the model card, and the
                # data, so that recipes/compress.py evaluates on the same dataset, split and subset by default.
                save_dense(model, training_args.output_dir, processor=processor)
                with open(os.path.join(training_args.output_dir, TRAINING_ARGS_NAME), "w") as f:
                    json.dump(training_args.to_dict(), f, indent=2, default=str)
                save_data_record(training_args.output_dir, data_args, training_args.seed, data)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return trainer, metrics, data


def cli() -> None:
    """The ``smooth-hf-train`` console script."""
    main()
    # As accelerate's examples end (accelerator.end_training()): under `accelerate launch` / torchrun, each process
    # leaves its process group before the interpreter's teardown, where gloo or NCCL threads still running can abort a
    # process that has finished. Only after a run that succeeded: a rank that failed must not wait for the others.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

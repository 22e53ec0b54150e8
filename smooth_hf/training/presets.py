"""Recommended settings, measured, kept in one place: the recipes, the docs and the benchmarks read them here.

``CNN_TRAINING`` trains a CIFAR-style ResNet from scratch so that it loses nothing to a truncated-SVD cut of up to
80% of its parameters without fine-tuning (the measurements behind each value: BENCHMARKS.md, section 2). It is a
set of :class:`~smooth_hf.SmoothTrainingArguments` / ``recipes/train.py`` arguments::

    SmoothTrainingArguments(output_dir="runs/cnn", **CNN_TRAINING)
    python recipes/train.py --model_name_or_path resnet14_cifar ... $(cnn_flags)   # see cnn_flags()

``CNN_DATA`` holds the data arguments of the same recipe (``TrainingDataArguments``: augmentation).

``CNN_SPEED_TRAINING`` is the same recipe trained for a compute budget: the projection plans the ranks of
``LowRankConfig(macs_reduction=0.7)`` on the training images' shape, so the cut removes multiply-adds where a CNN
spends them (its early, high-resolution layers) and the model runs faster, not only smaller (BENCHMARKS.md, section 8).
``recipes/compress.py`` then cuts it with the same rule and shape, with no flag.

``TEXT_FINE_TUNE`` fine-tunes a pretrained transformers text checkpoint (a small BERT such as all-MiniLM-L6-v2) for a
cut of half the whole model's parameters, word embeddings included: whitened rank projection, so that
``recipes/compress.py`` with no flag cuts it (whitened, embeddings included) without changing its outputs
(BENCHMARKS.md, section 9).

``VIT_TRAINING`` trains a small vision transformer (no BatchNorm) from scratch with AdamW, with the coefficients
chosen by the ViT coefficient sweep (BENCHMARKS.md, section 3).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CNN_DATA", "CNN_SPEED_TRAINING", "CNN_TRAINING", "TEXT_FINE_TUNE", "VIT_TRAINING", "as_flags",
           "cnn_flags", "without_steering"]

CNN_TRAINING: dict[str, Any] = {
    # SGD with Nesterov momentum and a one-cycle schedule: the classic CIFAR ResNet recipe.
    "optim": "sgd",
    "optim_args": "momentum=0.9,nesterov=True",
    "learning_rate": 0.1,
    "weight_decay": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.25,  # a float below 1 is a fraction of the steps in transformers 5
    "per_device_train_batch_size": 128,
    "num_train_epochs": 4,
    "channels_last": True,  # the same training, faster convolutions (checked per model: smooth_hf.core.memory_format)
    # Train for the cut: the weights are projected, gradually, onto the ranks of an 80% cut (docs/training.md, "Training for a
    # cut"), so any cut up to 80% loses nothing. It kept more accuracy at 70% and 80% fewer parameters than every
    # nuclear-norm setting measured (BENCHMARKS.md, section 2). Set it to the deepest cut you will make.
    "rank_projection_param_reduction": 0.8,
}

# The CNN recipe for speed: the same training, the projection planned for 70% fewer multiply-adds (on one training
# image's shape, recorded in training_args.json) instead of 80% fewer parameters.
CNN_SPEED_TRAINING: dict[str, Any] = {
    **{k: v for k, v in CNN_TRAINING.items() if k != "rank_projection_param_reduction"},
    "rank_projection_macs_reduction": 0.7,
}

CNN_DATA: dict[str, Any] = {"augment": True, "random_crop_padding": 0}  # horizontal flips only

TEXT_FINE_TUNE: dict[str, Any] = {
    # the usual fine-tune of a small BERT: AdamW, linear decay after a short warm-up
    "learning_rate": 5e-5,
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "per_device_train_batch_size": 32,
    "num_train_epochs": 2,
    # trained for the cut: the whole model's parameters halved, embeddings included, projected in whitened space
    "rank_projection_param_reduction": 0.5,
    "rank_projection_method": "whitened",
    "factorise_embeddings": True,
    # A whitened projection costs a few forward passes and a decomposition per layer. Every 10 steps it costs 1.5x a
    # plain step and keeps 1.2 points more at the cut than every 25 steps (1.2x): accuracy first (BENCHMARKS.md,
    # section 9).
    "rank_projection_every": 10,
}

VIT_TRAINING: dict[str, Any] = {
    "learning_rate": 2e-3,  # AdamW (the Trainer's default optimizer)
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 128,
    "num_train_epochs": 5,
    # Without BatchNorm the first-order term buys back dense accuracy that the nuclear norm alone costs.
    "nuclear_norm_coef": 5.0,
    "first_order_coef": 1.0,
}


def as_flags(settings: dict[str, Any]) -> list[str]:
    """``{"learning_rate": 0.1}`` -> ``["--learning_rate", "0.1"]``: the same settings on a command line."""
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}", str(value)]
    return flags


def cnn_flags(penalty: bool = True, training: dict[str, Any] | None = None) -> list[str]:
    """The CNN recipe (``training``: ``CNN_TRAINING`` by default, or ``CNN_SPEED_TRAINING``) as ``recipes/train.py``
    flags; ``penalty=False`` gives the plain baseline's."""
    training = CNN_TRAINING if training is None else training
    return as_flags({**(training if penalty else without_steering(training)), **CNN_DATA})


def without_steering(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` less what makes a run smooth (``smooth_hf.training.config.PLAIN``'s keys and the weighting):
    the plain baseline trained the same way."""
    from .config import PLAIN

    return {k: v for k, v in settings.items() if k not in PLAIN and k != "penalty_normalization"}

"""Recommended settings, measured, kept in one place: the recipes, the README and the benchmarks read them here.

``CNN_TRAINING`` trains a CIFAR-style ResNet from scratch so that it loses nothing to a truncated-SVD cut of up to
80% of its parameters without fine-tuning (the measurements behind each value: BENCHMARKS.md, section 2). It is a
set of :class:`~smooth_hf.SmoothTrainingArguments` / ``recipes/train.py`` arguments::

    SmoothTrainingArguments(output_dir="runs/cnn", **CNN_TRAINING)
    python recipes/train.py --model_name_or_path resnet14_cifar ... $(cnn_flags)   # see cnn_flags()

``CNN_DATA`` holds the data arguments of the same recipe (``TrainingDataArguments``: augmentation).

``VIT_TRAINING`` trains a small vision transformer (no BatchNorm) from scratch with AdamW, with the coefficients
chosen by the ViT coefficient sweep (BENCHMARKS.md, section 3).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CNN_DATA", "CNN_TRAINING", "VIT_TRAINING", "as_flags", "cnn_flags", "without_steering"]

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
    # Train for the cut: the weights are projected, gradually, onto the ranks of an 80% cut (README "Training for a
    # cut"), so any cut up to 80% loses nothing. It kept more accuracy at 70% and 80% fewer parameters than every
    # nuclear-norm setting measured (BENCHMARKS.md, section 2). Set it to the deepest cut you will make.
    "rank_projection_param_reduction": 0.8,
}

CNN_DATA: dict[str, Any] = {"augment": True, "random_crop_padding": 0}  # horizontal flips only

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


def cnn_flags(penalty: bool = True) -> list[str]:
    """The CNN recipe as ``recipes/train.py`` flags; ``penalty=False`` gives the plain baseline's."""
    return as_flags({**(CNN_TRAINING if penalty else without_steering(CNN_TRAINING)), **CNN_DATA})


def without_steering(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` less what makes a run smooth (``smooth_hf.training.config.PLAIN``'s keys and the weighting):
    the plain baseline trained the same way."""
    from .config import PLAIN

    return {k: v for k, v in settings.items() if k not in PLAIN and k != "penalty_normalization"}

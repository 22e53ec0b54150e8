"""Feeding a training batch to a model, whatever form it takes: the one place that knows the forms.

BatchNorm recalibration and whitened compression both run a model on batches "as the trainer uses
them": image tensors, ``(inputs, labels)`` pairs, ``{"pixel_values": ...}`` dicts (timm and HF vision
models) or dicts of keyword inputs (``model(**batch)``, transformers models). Label keys are dropped:
these are forward passes for statistics, not for a loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LABEL_KEYS", "batch_size", "feed_batch", "model_device", "modes_kept"]

LABEL_KEYS = ("labels", "label", "targets")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameter lives, which is where its batches go; the CPU for a model without any."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def feed_batch(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """``model`` run on ``batch`` (moved to ``device``); returns the model's output.

    Raises:
        TypeError: a batch of a form none of the above describes.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, Mapping):
        if "pixel_values" in batch:
            # Positional, so timm models (forward(x)) and HF vision models (forward(pixel_values)) both work.
            return model(_to(batch["pixel_values"], device))
        return model(**{k: _to(v, device) for k, v in batch.items() if k not in LABEL_KEYS})
    if isinstance(batch, (list, tuple)) and batch:
        return model(_to(batch[0], device))  # torchvision-style (images, labels)
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__}: give tensors, (inputs, labels) pairs or dicts "
        "with 'pixel_values' (image models) or the model's keyword inputs (transformers models)"
    )


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its (first) input tensor; 0 if it has none."""
    if isinstance(batch, Mapping):
        key = "pixel_values" if "pixel_values" in batch else next((k for k in batch if k not in LABEL_KEYS), None)
        batch = batch.get(key) if key is not None else None
    elif isinstance(batch, (list, tuple)):
        batch = batch[0] if batch else None
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 0


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag is restored on exit, whatever happened inside."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training

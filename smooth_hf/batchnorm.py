"""Re-estimate BatchNorm running statistics after a change of weights (no training).

Truncating a convolution shifts the mean and variance of its outputs, and the BatchNorm that
follows still normalises with the statistics of the dense layer. A few forward passes over
training images re-estimate them; no weight changes, so this stays "compression without
fine-tuning" (the same trick as ``torch.optim.swa_utils.update_bn``, but model-mode preserving and
with dropout off).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]

logger = logging.getLogger(__name__)

_LABEL_KEYS = ("labels", "label", "targets")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (any dimension, timm's ``BatchNormAct2d`` too) that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _forward(model: nn.Module, batch: Any, device: torch.device) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch.to(device))
    elif isinstance(batch, Mapping):
        if "pixel_values" in batch:
            # Positional, so timm models (forward(x)) and HF vision models (forward(pixel_values)) both work.
            model(_to(batch["pixel_values"], device))
        else:
            model(**{k: _to(v, device) for k, v in batch.items() if k not in _LABEL_KEYS})
    elif isinstance(batch, (list, tuple)) and batch:
        model(_to(batch[0], device))  # torchvision-style (images, labels)
    else:
        raise TypeError(
            f"cannot feed a batch of type {type(batch).__name__}: give tensors, (inputs, labels) pairs or dicts "
            "with 'pixel_values'"
        )


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> nn.Module:
    """Replace every BatchNorm's running mean/var by their average over ``batches``.

    Statistics are reset and accumulated as a cumulative average (``momentum=None``), so every
    batch counts equally and nothing of the old statistics leaks in. Only BatchNorm layers are put
    in train mode: dropout and friends stay in eval mode so the statistics are those the model will
    see at inference. Runs under ``torch.no_grad()``; parameters are never touched. Every module's
    training flag and momentum is restored afterwards, and if ``batches`` turns out empty or a
    forward fails, the previous statistics are restored too.

    Args:
        batches: a DataLoader or any iterable of tensors, ``(inputs, labels)`` pairs, or dicts (with
            ``pixel_values``, or model keyword inputs; label keys are dropped).
        max_batches: stop after this many batches (``None`` = all).

    Returns:
        ``model``, recalibrated in place.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    layers = batchnorm_layers(model)
    if not layers:
        logger.warning("recalibrate_batchnorm: the model has no BatchNorm layer tracking statistics; nothing to do")
        return model
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in layers]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                _forward(model, batch, device)
                seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm got no batches; give at least one batch of training inputs")
    except BaseException:
        for m, (_, buffers) in zip(layers, saved, strict=True):
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
        raise
    finally:
        for m, (momentum, _) in zip(layers, saved, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    logger.info("recalibrated %d BatchNorm layers on %d batches", len(layers), seen)
    return model

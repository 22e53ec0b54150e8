"""Accuracy of an image or text classifier over a ``datasets`` split, timm or transformers alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from .metrics import accuracy

__all__ = ["classification_accuracy", "logits_of"]


def logits_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch: transformers models take the batch as keywords, timm models the image."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hasattr(model, "config"):  # transformers
        return model(**inputs).logits
    return model(inputs["pixel_values"])


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[list], dict[str, torch.Tensor]] = default_data_collator,
) -> float:
    """Top-1 accuracy (:func:`smooth_hf.evaluation.metrics.accuracy`) of ``model`` on ``dataset``.

    Items hold ``labels`` and the model's inputs; ``collate_fn`` batches them (e.g. a padding collator
    for text of varying length). The model is put in eval mode and back.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers):
            batch = {k: v.to(device) for k, v in batch.items()}
            predictions.append(logits_of(model, batch).argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("the evaluation dataset is empty: check the split and --max_eval_samples")
    return accuracy(torch.cat(predictions), torch.cat(labels))

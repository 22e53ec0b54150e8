"""Accuracy of an image or text classifier over a ``datasets`` split, timm or transformers alike."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

__all__ = ["classification_accuracy", "logits_of"]


def logits_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch: transformers models take the batch as keywords, timm models the image."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hasattr(model, "config"):  # transformers
        return model(**inputs).logits
    return model(inputs["pixel_values"])


@torch.no_grad()
def classification_accuracy(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device | None = None,
                            num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (items with ``labels`` and the model's inputs)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator, num_workers=num_workers)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        predictions = logits_of(model, batch).argmax(-1)
        correct += int((predictions == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation dataset is empty")
    return correct / total

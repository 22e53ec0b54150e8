"""Perplexity of a causal language model on held-out sequences: what a compressed LM is scored with.

``exp`` of the mean negative log-likelihood of every next token, over all tokens of all sequences (each sequence's
first token has no prediction), computed from the logits in float32 whatever the model's dtype, so that models of
every dtype and every head are scored the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..core.batches import model_device

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    dataset,
    batch_size: int = 8,
    collate_fn: Callable[[list], dict[str, torch.Tensor]] = default_data_collator,
) -> float:
    """``exp(mean next-token negative log-likelihood)`` of ``model`` on ``dataset`` (``input_ids``, ``attention_mask``;
    padding positions are not scored). The model is put in eval mode and back."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))
            tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("perplexity of zero tokens: the evaluation sequences are empty")
    return math.exp(total / tokens)

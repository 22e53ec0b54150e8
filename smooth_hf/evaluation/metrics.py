"""Classification metrics, computed one way: the fraction of arg-max predictions equal to the labels.

``accuracy_metrics`` is the Trainer's ``compute_metrics``; :func:`smooth_hf.evaluation.classification_accuracy`
runs a model over a dataset and scores it with the same :func:`accuracy`. Nothing here needs the Hub
(``evaluate.load("accuracy")`` fetches its script from it), and no ``evaluate`` module is shipped either: one loaded
by path works offline but imports ``evaluate`` and writes into ``HF_HOME`` for a one-line metric
(docs/integrations.md, "Metrics").
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["accuracy", "accuracy_metrics"]


def accuracy(predictions, references) -> float:
    """Fraction of ``predictions`` equal to ``references`` (arrays, tensors or lists of class ids)."""
    predictions = predictions.cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
    references = references.cpu().numpy() if isinstance(references, torch.Tensor) else np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape} predictions for {references.shape} labels: pass one predicted class id "
                         "per label (the arg-max of the logits)")
    if references.size == 0:
        raise ValueError("accuracy of zero examples: the evaluation dataset is empty")
    return float((predictions == references).mean())


def accuracy_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy of the arg-max of the logits."""
    logits, labels = eval_pred
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": accuracy(np.argmax(logits, axis=-1), labels)}

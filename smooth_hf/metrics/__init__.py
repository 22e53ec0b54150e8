"""Metrics that work offline: ``evaluate`` scripts shipped inside the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["accuracy_metrics", "load_accuracy"]

_ACCURACY_SCRIPT = Path(__file__).parent / "accuracy" / "accuracy.py"


def load_accuracy():
    """``evaluate.load`` of the packaged accuracy script (no Hub access needed)."""
    import evaluate

    return evaluate.load(str(_ACCURACY_SCRIPT))


def accuracy_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy of the arg-max of the logits."""
    logits, labels = eval_pred
    if isinstance(logits, tuple):
        logits = logits[0]
    return load_accuracy().compute(predictions=np.argmax(logits, axis=-1), references=labels)

"""Scoring models: metrics, accuracy over a dataset, and accuracy against parameters removed (the sweep)."""

from .accuracy import classification_accuracy, logits_of
from .metrics import accuracy, accuracy_metrics
from .sweep import budget_sweep, plot_sweep, sweep_markdown

__all__ = ["accuracy", "accuracy_metrics", "budget_sweep", "classification_accuracy", "logits_of", "plot_sweep",
           "sweep_markdown"]

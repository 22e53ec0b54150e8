"""The input statistics whitened rank projection plans with, kept up to date from the training batches, cheaply.

A whitened cut needs each layer's input Gram matrix ``G = sum x x^T``. During training the inputs drift with the
weights, so the statistics are refreshed with the plan: the trainer keeps references to the last few training
batches (:class:`RecentBatches`, no copy), and at each projection :class:`RunningGrams` runs the model on them
(forward passes in eval mode, no gradients: :func:`smooth_hf.lowrank.whitening.collect_input_grams`) and adds the
result to the running sum of the earlier ones, halved at every refresh, so the statistics cover many batches while
the recent ones weigh most. Nothing is collected between projections: the cost is a few forward passes per
projection (``BENCHMARKS.md``, section 9, measures it per step).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ..core.batches import LABEL_KEYS
from ..lowrank.whitening import collect_input_grams

__all__ = ["RecentBatches", "RunningGrams"]

DECAY = 0.5  # the weight of the earlier statistics at each refresh


class RecentBatches:
    """The model inputs of the last ``size`` training batches (labels dropped; the tensors themselves, not copies)."""

    def __init__(self, size: int) -> None:
        self.batches: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, inputs: Mapping[str, Any]) -> None:
        self.batches.append({k: v for k, v in inputs.items() if k not in LABEL_KEYS})

    def __len__(self) -> int:
        return len(self.batches)


class RunningGrams:
    """A running, decayed sum of the input Gram matrices of ``layers`` (``(name, module)`` pairs) over the batches
    :meth:`refresh` is given."""

    def __init__(self, layers: list[tuple[str, nn.Module]],
                 reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
        self.layers = dict(layers)
        self.reduce = reduce  # each refresh's statistics summed over the processes that train together (their batches)
        self.grams: dict[str, Tensor] = {}
        self.batches = 0  # batches summed so far

    def refresh(self, model: nn.Module, batches: RecentBatches) -> dict[str, Tensor]:
        """Add the statistics of ``batches`` (the model run on them, in eval mode) to the halved running sum."""
        if not len(batches):
            raise ValueError("whitened rank projection has no training batch to collect the layers' inputs on yet")
        new = collect_input_grams(model, self.layers, list(batches.batches)).grams
        if self.reduce is not None:
            new = self.reduce(new)
        self.grams = {name: gram + DECAY * self.grams[name] if name in self.grams else gram
                      for name, gram in new.items()}
        self.batches += len(batches)
        return self.grams

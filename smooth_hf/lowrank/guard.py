"""The guard: a marker stored at a factorised layer's dense weight name in transformers checkpoints.

A loader that does not know the low-rank structure (transformers without ``import smooth_hf``)
builds the dense layer and looks for ``<layer>.weight``. Finding a one-byte tensor there, it stops
with a size-mismatch error instead of initialising the layer at random. Loaders that know the
structure skip it (:class:`smooth_hf.lowrank.layers.LowRankLinear` / ``LowRankConv2d`` in
``load_state_dict``, :mod:`smooth_hf.integrations.transformers` in ``from_pretrained``). This module imports
nothing of the package, so every other module can use it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GUARD_SUFFIX", "guard_keys", "guard_tensor", "is_guard"]

GUARD_SUFFIX = "weight"


def guard_tensor() -> torch.Tensor:
    """One byte: a shape no dense layer can take.

    Not empty: empty tensors all report the same storage, and savers that drop tied (shared) tensors
    would keep only one of them.
    """
    return torch.zeros(1, dtype=torch.uint8)


def is_guard(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.shape == (1,) and tensor.dtype == torch.uint8


def guard_keys(layer_names: Any) -> list[str]:
    """The state-dict names of the guards of the factorised layers ``layer_names`` (e.g. ``ranks``)."""
    return [f"{name}.{GUARD_SUFFIX}" for name in layer_names]

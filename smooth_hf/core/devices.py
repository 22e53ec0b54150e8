"""Running on an accelerator a model that stays in CPU memory: one module at a time, or the whole model streamed.

Compressing a model larger than the accelerator's memory (:mod:`smooth_hf.lowrank.streaming`) moves one block at a
time to the device (:func:`on_device`), and runs the whole model there with every module's weights copied in only
for its own forward (:func:`streamed_through`, accelerate's ``cpu_offload``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .batches import model_device

__all__ = ["on_device", "streamed_through"]


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    """``module`` on ``device`` within the block, back where it was after (nothing moves when ``device`` is None)."""
    if device is None:
        yield
        return
    home = model_device(module)
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


@contextlib.contextmanager
def streamed_through(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """Within the block the whole model runs on ``device`` while its weights stay in CPU memory (accelerate's
    ``cpu_offload``: each module's weights are copied to the device for its own forward only); its hooks are removed
    after, the weights back in place. Nothing changes when ``device`` is None."""
    if device is None:
        yield
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_submodules(model)

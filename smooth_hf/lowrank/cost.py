"""Multiply-adds of a model's layers for a given input, counted with forward hooks on one pass.

A layer's compute depends on where it runs: a conv's multiply-adds scale with its output resolution,
a linear layer's with the number of tokens. One forward pass on ``example_inputs`` with hooks on
every multiply-add layer records, per layer, its *output positions* (the output's elements divided
by its output channels / features: ``batch * H_out * W_out`` for a conv, ``batch * tokens`` for a
linear layer; summed over calls when a layer runs more than once) and the shape of its input
(what :mod:`smooth_hf.lowrank.timing` times it on).

What is counted: the multiply-adds of every ``nn.Linear``, ``nn.Conv2d`` (subclasses included) and
transformers ``Conv1D`` called as a module, for the inputs as given (the whole batch):
``weight.numel() * positions``, so a grouped conv counts its ``in / groups`` and a factorised layer
counts its two factors, ``rank * (in*kh*kw + out) * positions``. Not counted: attention's own
products (``Q K^T``, ``A V``), norms, activations, pooling, embedding look-ups, and weights a parent
reads directly instead of calling the layer (``nn.MultiheadAttention``'s projections).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.libraries import is_hf_conv1d

__all__ = ["ExampleInputs", "LayerCall", "count_macs", "describe_inputs", "macs_per_rank", "run_model", "trace_layers"]

# A tensor (one positional argument), a tuple/list of positional arguments, or a mapping of keyword
# arguments (a tokenizer's output, {"pixel_values": ...}).
ExampleInputs = Tensor | Sequence[Any] | Mapping[str, Any]


@dataclass
class LayerCall:
    """What one forward pass showed of a layer: its output positions and multiply-adds, its input shape."""

    positions: int = 0  # summed over calls
    macs: int = 0  # weight.numel() * positions, summed over calls
    input_shape: tuple[int, ...] | None = None  # of the first call
    input_dtype: torch.dtype | None = None


def is_macs_layer(module: nn.Module) -> bool:
    """A layer whose multiply-adds are counted: a Linear, a Conv2d or an HF Conv1D (their subclasses too)."""
    return isinstance(module, nn.Linear | nn.Conv2d) or is_hf_conv1d(module)


def macs_per_rank(shape: tuple[int, int, int, int], positions: int) -> int:
    """Multiply-adds one kept rank costs in a factorised ``(out, in, kh, kw)`` layer: ``(in*kh*kw + out) * positions``."""
    out, inp, kh, kw = shape
    return (inp * kh * kw + out) * positions


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def run_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, ``model(inputs)`` for a tensor.

    Tensors are moved to the device of the model's first parameter.
    """
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "meta":
        example_inputs = _to_device(example_inputs, parameter.device)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, list | tuple):
        return model(*example_inputs)
    return model(example_inputs)


def describe_inputs(example_inputs: ExampleInputs) -> str:
    """The shapes of ``example_inputs``, for the report: ``"(64, 3, 32, 32)"`` or ``"input_ids (1, 64), ..."``."""

    def shape(value: Any) -> str:
        return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__

    if isinstance(example_inputs, Mapping):
        return ", ".join(f"{k} {shape(v)}" for k, v in example_inputs.items())
    if isinstance(example_inputs, list | tuple):
        return ", ".join(shape(v) for v in example_inputs)
    return shape(example_inputs)


def _check_example_inputs(example_inputs: Any) -> None:
    if not isinstance(example_inputs, Tensor | Mapping | list | tuple):
        raise TypeError(
            f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got "
            f"{type(example_inputs).__name__}: pass e.g. torch.randn(1, 3, 32, 32) or tokenizer(texts, return_tensors='pt')"
        )


def trace_layers(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, LayerCall]:
    """One forward pass on ``example_inputs``; a :class:`LayerCall` for every multiply-add layer, called or not.

    Runs in eval mode under ``torch.no_grad()`` and restores every module's train/eval mode, so the
    model is left exactly as it was (no BatchNorm statistic moves, no gradient is recorded).

    Raises:
        TypeError: ``example_inputs`` is not a tensor, tuple/list or mapping.
        RuntimeError: the model's forward failed on ``example_inputs`` (the original error is chained).
    """
    _check_example_inputs(example_inputs)
    calls: dict[str, LayerCall] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            call = calls[name]
            if not isinstance(output, Tensor) or output.dim() == 0:
                return
            features = output.shape[-3] if isinstance(module, nn.Conv2d) and output.dim() >= 3 else output.shape[-1]
            positions = output.numel() // max(features, 1)
            call.positions += positions
            call.macs += module.weight.numel() * positions
            if call.input_shape is None and args and isinstance(args[0], Tensor):
                call.input_shape, call.input_dtype = tuple(args[0].shape), args[0].dtype

        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for name, module in model.named_modules():
            if name and is_macs_layer(module):
                calls[name] = LayerCall()
                hooks.append(module.register_forward_hook(record(name)))
        model.eval()
        with torch.no_grad():
            try:
                run_model(model, example_inputs)
            except Exception as err:
                raise RuntimeError(
                    f"the model's forward pass failed on example_inputs ({describe_inputs(example_inputs)}): {err}. "
                    "Pass inputs the model accepts: a tensor, a tuple of positional arguments, or a dict of keyword "
                    "arguments."
                ) from err
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return calls


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Multiply-adds of ``model``'s Linear / Conv2d / HF Conv1D layers in one forward pass on ``example_inputs``.

    Works on dense and compressed models alike (a factorised layer counts its two factors). See the
    module docstring for exactly what is and is not counted.
    """
    return sum(call.macs for call in trace_layers(model, example_inputs).values())

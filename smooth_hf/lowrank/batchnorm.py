"""Re-estimate BatchNorm running statistics after a change of weights (no training).

Truncating a convolution shifts the mean and variance of its outputs, and the BatchNorm that
follows still normalises with the statistics of the dense layer. A few forward passes over
training images re-estimate them; no weight changes, so this stays "compression without
fine-tuning" (the same trick as ``torch.optim.swa_utils.update_bn``, but model-mode preserving and
with dropout off).

Without training images, :func:`synthesize_batchnorm_inputs` makes them up: it optimises random
inputs until their per-layer statistics in the *dense* model match its running statistics (ZeroQ's
"distilled data", Cai et al. 2020). After the cut, :func:`shift_batchnorm_statistics` moves each
running statistic by the change the cut makes on those inputs. Only the inputs are optimised; no
weight changes either.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.batches import feed_batch, modes_kept

__all__ = [
    "DataFreeRecalibration",
    "batch_statistics",
    "batchnorm_layers",
    "default_input_shape",
    "default_num_samples",
    "recalibrate_batchnorm",
    "shift_batchnorm_statistics",
    "synthesize_batchnorm_inputs",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFreeRecalibration:
    """Settings of the data-free BatchNorm repair: ``compress(..., recalibrate_batchnorm=DataFreeRecalibration())``.

    ``recalibrate_batchnorm="data_free"`` is the same with these defaults. The fields are the keyword
    arguments of :func:`synthesize_batchnorm_inputs`.
    """

    input_shape: tuple[int, ...] | None = field(
        default=None, metadata={"help": "One input without the batch axis, e.g. (3, 32, 32); None = from the model's config."}
    )
    num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Synthetic inputs (one batch). None = sized to the input: as many as fit the pixel budget of "
            "256 images of 32x32 (all 256 for small images, fewer for large ones, at least 16)."
        },
    )
    steps: int = field(default=200, metadata={"help": "Adam steps on the inputs."})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of the starting noise."})

    def prepare(self, dense: nn.Module) -> Callable[[nn.Module], nn.Module]:
        """Synthesise inputs from the **dense** model and measure it on them; returns ``repair(compressed)``.

        ``repair`` moves the compressed model's running statistics by the change the cut makes on the
        synthetic inputs (:func:`shift_batchnorm_statistics`), in place.
        """
        batches = synthesize_batchnorm_inputs(dense, **asdict(self)).split(64)
        reference = batch_statistics(dense, batches)
        return functools.partial(shift_batchnorm_statistics, batches=batches, reference=reference)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (any dimension, timm's ``BatchNormAct2d`` too) that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype if parameter.is_floating_point() else torch.float32


def _copy_buffers(layers: Iterable[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in layers]


def _restore_buffers(layers: Iterable[nn.Module], saved: list[dict[str, torch.Tensor]]) -> None:
    for m, buffers in zip(layers, saved, strict=True):
        for name, value in buffers.items():
            getattr(m, name).copy_(value)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> nn.Module:
    """Replace every BatchNorm's running mean/var by their average over ``batches``.

    Statistics are reset and accumulated as a cumulative average (``momentum=None``), so every
    batch counts equally and nothing of the old statistics leaks in. Only BatchNorm layers are put
    in train mode: dropout and friends stay in eval mode so the statistics are those the model will
    see at inference. Runs under ``torch.no_grad()``; parameters are never touched. Every module's
    training flag and momentum is restored afterwards, and if ``batches`` turns out empty or a
    forward fails, the previous statistics are restored too.

    Args:
        batches: a DataLoader or any iterable of tensors, ``(inputs, labels)`` pairs, or dicts (with
            ``pixel_values``, or model keyword inputs; label keys are dropped).
        max_batches: stop after this many batches (``None`` = all).

    Returns:
        ``model``, recalibrated in place.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    layers = batchnorm_layers(model)
    if not layers:
        logger.warning("recalibrate_batchnorm: the model has no BatchNorm layer tracking statistics; nothing to do")
        return model
    momenta, saved = [m.momentum for m in layers], _copy_buffers(layers)
    device, _ = _device_and_dtype(model)
    seen = 0
    with modes_kept(model):
        try:
            model.eval()
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                for batch in batches:
                    if max_batches is not None and seen >= max_batches:
                        break
                    feed_batch(model, batch, device)
                    seen += 1
            if seen == 0:
                raise ValueError("recalibrate_batchnorm got no batches; give at least one batch of training inputs")
        except BaseException:
            _restore_buffers(layers, saved)
            raise
        finally:
            for m, momentum in zip(layers, momenta, strict=True):
                m.momentum = momentum
    logger.info("recalibrated %d BatchNorm layers on %d batches", len(layers), seen)
    return model


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """``(channels, height, width)`` of one input image, from a timm ``pretrained_cfg`` or a transformers config."""
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return (int(getattr(config, "num_channels", 3)), int(height), int(width))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        # The stem's in_channels beats the config: a 3-channel recipe is often built with in_chans=1.
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = stem.in_channels if stem is not None else cfg["input_size"][0]
        return (int(channels), *(int(v) for v in cfg["input_size"][1:]))
    raise ValueError(
        f"cannot tell the input shape of a {type(model).__name__}: pass input_shape=(channels, height, width)"
    )


# The default synthetic batch holds the pixels of 256 CIFAR-size images: every Adam step costs a forward and
# a backward over the whole batch, so larger images get fewer samples (at least _MIN_SAMPLES, so that batch
# statistics stay meaningful). At 224x224 the full 256 images ran for minutes per repair and several GB on CPU.
_BUDGET_SAMPLES, _BUDGET_PIXELS, _MIN_SAMPLES = 256, 32 * 32, 16


def default_num_samples(input_shape: tuple[int, ...]) -> int:
    """Synthetic inputs for one image of ``input_shape`` ``(channels, height, width)`` (see the budget above)."""
    pixels = math.prod(input_shape[1:]) if len(input_shape) > 1 else 1
    return max(_MIN_SAMPLES, min(_BUDGET_SAMPLES, _BUDGET_SAMPLES * _BUDGET_PIXELS // max(pixels, 1)))


def synthesize_batchnorm_inputs(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    num_samples: int | None = None,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Inputs whose BatchNorm batch statistics in ``model`` match its running statistics (data-free).

    Starting from Gaussian noise, Adam minimises, summed over every BatchNorm layer, the distance
    between the batch mean / standard deviation of the layer's input and its running mean / standard
    deviation (ZeroQ). Call it on the **dense** model, before compressing: its running statistics
    describe the real data. Repairing the compressed model with the result
    (:func:`shift_batchnorm_statistics`, or :meth:`DataFreeRecalibration.prepare`) then needs no
    training data.

    The model is left exactly as it was: parameters, buffers, ``requires_grad`` flags and train/eval
    modes (it runs in eval mode).

    Args:
        input_shape: one input without the batch axis, e.g. ``(3, 32, 32)``; default from the model's
            config (:func:`default_input_shape`).
        num_samples: how many inputs to synthesise (one batch); ``None`` sizes it to the input
            (:func:`default_num_samples`).
        steps: Adam steps. lr: Adam learning rate. seed: seed of the starting noise.

    Returns:
        A ``(num_samples, *input_shape)`` tensor on the model's device and dtype.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer tracking running statistics: there is nothing to match")
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(model)
    num_samples = default_num_samples(shape) if num_samples is None else num_samples
    if num_samples < 2 or steps < 1:
        raise ValueError(f"need num_samples >= 2 (a batch variance) and steps >= 1, got {num_samples} and {steps}")
    device, dtype = _device_and_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((num_samples, *shape), generator=generator).to(device, dtype).requires_grad_(True)

    terms: list[torch.Tensor] = []

    def match(module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        terms.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm((var + module.eps).sqrt() - (module.running_var + module.eps).sqrt())
        )

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_pre_hook(match) for m in layers]
    with modes_kept(model):
        try:
            model.eval()
            for p in flags:
                p.requires_grad_(False)
            optimizer = torch.optim.Adam([inputs], lr=lr)
            with torch.enable_grad():
                for _ in range(steps):
                    terms.clear()
                    optimizer.zero_grad(set_to_none=True)
                    model(inputs)
                    loss = torch.stack(terms).sum()
                    loss.backward()
                    optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
    logger.info("synthesised %d BatchNorm inputs %s in %d steps (statistics distance %.4g)", num_samples, shape,
                steps, float(loss.detach()))
    return inputs.detach()


def batch_statistics(model: nn.Module, batches: Iterable[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{bn name: (mean, var)}`` that :func:`recalibrate_batchnorm` would set on ``batches``; the model is unchanged."""
    tracked = set(batchnorm_layers(model))
    layers = {name: m for name, m in model.named_modules() if m in tracked}
    saved = _copy_buffers(layers.values())
    try:
        recalibrate_batchnorm(model, batches)
        return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    finally:
        _restore_buffers(layers.values(), saved)


def shift_batchnorm_statistics(
    model: nn.Module, batches: Iterable[Any], reference: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> nn.Module:
    """Move running statistics by the change a weight edit made on ``batches``: the data-free repair.

    ``reference`` is :func:`batch_statistics` of the model *before* the edit on the same ``batches``.
    Each BatchNorm's running mean moves by ``mean_after - mean_before`` and its running variance is
    scaled by ``var_after / var_before``, both measured on ``batches``. Anchoring on the real running
    statistics, rather than replacing them by statistics of synthetic inputs, means a cut that changes
    little also changes the statistics little: synthetic inputs are only trusted for the *change*.
    Parameters are never touched.
    """
    after = batch_statistics(model, list(batches))
    names = dict(model.named_modules())
    missing = sorted(set(after) ^ set(reference))
    if missing:
        raise ValueError(f"BatchNorm layers differ from the reference statistics ({', '.join(missing[:5])}); "
                         "measure the reference on the same model before the edit")
    with torch.no_grad():
        for name, (mean, var) in after.items():
            module, (mean0, var0) = names[name], reference[name]
            module.running_mean.add_(mean - mean0)
            module.running_var.mul_(var / var0.clamp_min(module.eps))
    return model

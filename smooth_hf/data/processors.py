"""What an image model expects as input: its image processor (transformers) or its data config (timm).

A pretrained transformers checkpoint comes with an image processor (``AutoImageProcessor``: size, resample,
rescale, mean and std); training, evaluation and ``pipeline(...)`` must all use it, or the model sees inputs it was
never trained on (ImageNet-normalised checkpoints fed inputs normalised otherwise lose accuracy silently). So:

* a checkpoint's own processor is loaded with the model (:func:`image_processor_for` with the checkpoint);
* a transformers model built from a config (no checkpoint) gets a plain processor that resizes to the config's
  ``image_size`` and normalises with mean = std = 0.5 per channel: what it is then trained with, and saved
  with, so that its folders serve exactly what it learnt on;
* a timm model carries its data config (``pretrained_cfg``: mean, std, input size), which timm saves with it.

:func:`image_input_config` gives what :class:`~smooth_hf.data.transforms.ImageTransform` needs for either.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn
from transformers import AutoImageProcessor, ViTImageProcessor

from ..core.libraries import is_transformers_model

__all__ = ["FROM_SCRATCH_MEAN_STD", "default_image_processor", "image_input_config", "image_processor_for"]

logger = logging.getLogger(__name__)

# The normalisation of transformers image models trained from scratch (no processor of their own).
FROM_SCRATCH_MEAN_STD = 0.5


def default_image_processor(model: nn.Module) -> Any:
    """A processor for a transformers image model built from a config: resize to ``config.image_size`` (when it
    has one), scale to [0, 1], normalise with mean = std = :data:`FROM_SCRATCH_MEAN_STD` per channel."""
    config = model.config
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", None)
    height, width = (size, size) if isinstance(size, int) else (tuple(size) if size else (None, None))
    return ViTImageProcessor(
        do_resize=height is not None,
        size={"height": height or 224, "width": width or 224},
        image_mean=[FROM_SCRATCH_MEAN_STD] * channels,
        image_std=[FROM_SCRATCH_MEAN_STD] * channels,
    )


def image_processor_for(model: nn.Module, source: str | os.PathLike | None = None) -> Any:
    """The image processor of a transformers image model (``None`` for timm and plain models).

    ``source`` is the checkpoint the model was loaded from (a Hub id or a folder): its ``preprocessor_config.json``
    is used. Without one (a model built from a config, or a folder saved before smooth_hf saved processors),
    :func:`default_image_processor`, which is what smooth_hf trains such models with.
    """
    if not is_transformers_model(model):
        return None
    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:  # no preprocessor_config.json there
            logger.warning(
                "%s has no image processor (%s): using mean = std = %s and the config's image size, what smooth_hf "
                "trains models built from a config with. If the checkpoint was trained with another normalisation, "
                "save its processor into the folder (AutoImageProcessor.save_pretrained).",
                source, type(err).__name__, FROM_SCRATCH_MEAN_STD,
            )
    return default_image_processor(model)


def image_input_config(model: nn.Module, processor: Any = None) -> dict[str, Any]:
    """Channels, image size, normalisation (and, for transformers models, the processor) a model expects.

    For a transformers model the ``processor`` (default: :func:`default_image_processor`) does the resizing and
    the normalisation; ``mean`` and ``std`` are reported from it. For a timm model they come from its data config.
    """
    if is_transformers_model(model):
        processor = processor if processor is not None else default_image_processor(model)
        channels = getattr(model.config, "num_channels", 3)
        normalise = getattr(processor, "do_normalize", True)
        mean = tuple(getattr(processor, "image_mean", None) or (0.0,)) if normalise else (0.0,)
        std = tuple(getattr(processor, "image_std", None) or (1.0,)) if normalise else (1.0,)
        return {"channels": channels, "image_size": None, "mean": mean, "std": std, "processor": processor}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0]
    mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
    if len(mean) != channels:  # e.g. a 3-channel recipe used with 1-channel images: use the average
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    size = cfg.get("input_size")[1] if cfg.get("fixed_input_size") else None
    return {"channels": channels, "image_size": size, "mean": tuple(mean), "std": tuple(std), "processor": None}

"""``ImageTransform``: a batch of images (PIL or arrays) -> normalised ``pixel_values``, with the standard
CIFAR augmentation for training, vectorised over the batch (it runs on every training step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torchvision.transforms.v2 import functional as TF

__all__ = ["ImageTransform"]


@dataclass
class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: images -> normalised ``pixel_values``.

    Accepts PIL images or arrays (HWC, HW), any channel count: grey images become 3 channels when the
    model takes 3, colour images become grey (luminance) when it takes 1. ``train=True`` adds the
    standard CIFAR augmentation: a random crop of the image padded by ``crop_padding`` pixels (zeros;
    0 = no crop) and a horizontal flip with probability one half, drawn independently for every image.

    Randomness: with ``seed=None`` the crops and flips come from torch's global generator, which
    ``transformers.set_seed`` seeds and every ``DataLoader`` worker re-seeds differently, so runs
    repeat under a seed and workers never repeat each other. With ``seed=s`` the transform owns a
    generator seeded with ``s`` (``s + k`` in ``DataLoader`` worker ``k``).

    ``processor``: a transformers image processor (``AutoImageProcessor``). It then resizes, rescales and
    normalises (``mean``, ``std`` and ``image_size`` are not used), after the augmentation, exactly as it does
    for the checkpoint it belongs to and in ``pipeline(...)``:
    :func:`smooth_hf.data.processors.image_input_config` passes it.
    """

    channels: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    image_size: int | None = None
    train: bool = False
    seed: int | None = None
    crop_padding: int = 4
    processor: Any = None

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) == 1 and len(std) == 1:
            mean, std = mean * self.channels, std * self.channels
        if self.processor is None and (len(mean) != self.channels or len(std) != self.channels):
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {self.channels} channels: give one value "
                             f"per channel, or a single value for all (smooth_hf.data.image_input_config(model) "
                             "gives the model's own)")
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0 (0 = flips only), got {self.crop_padding!r}")
        self._mean, self._std = list(mean), list(std)
        self._generator: torch.Generator | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers and datasets' copies get a fresh generator, seeded where it is used.
        return {**self.__dict__, "_generator": None}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = batch["image"]
        pixels: list[torch.Tensor | None] = [None] * len(images)
        # Images of one shape are transformed together; a folder of mixed sizes makes several groups.
        for indices, stacked in self._stack_by_shape(images):
            for i, x in zip(indices, self._transform(stacked).unbind(0), strict=True):
                pixels[i] = x
        return {"pixel_values": pixels, "labels": list(batch["label"])}

    # ---- steps ------------------------------------------------------------------------------
    def _stack_by_shape(self, images: list) -> list[tuple[list[int], torch.Tensor]]:
        """``(indices, uint8/float tensor N x C x H x W)`` per distinct image shape."""
        if images and not hasattr(images[0], "mode"):  # arrays or nested lists: one conversion for the batch
            try:
                array = np.asarray(images)
            except ValueError:  # ragged: images of several shapes
                array = None
            if array is not None and array.ndim in (3, 4):
                x = torch.from_numpy(np.ascontiguousarray(array))
                return [(list(range(len(images))), x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2))]
        groups: dict[tuple[int, ...], list[int]] = {}
        tensors = [_image_to_chw(image) for image in images]
        for i, x in enumerate(tensors):
            groups.setdefault(tuple(x.shape), []).append(i)
        return [(indices, torch.stack([tensors[i] for i in indices])) for indices in groups.values()]

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0  # pixel values 0..255, whatever the storage type
        x = self._match_channels(x)
        if self.processor is not None:  # the model's own resizing and normalisation, after the augmentation
            x = self._augment(x) if self.train else x
            return self.processor(images=x, do_rescale=False, return_tensors="pt")["pixel_values"]
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        if self.train:
            x = self._augment(x)
        return TF.normalize(x, self._mean, self._std)

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        have = x.shape[1]
        if have == 4:  # RGBA / CMYK-like arrays: drop the fourth channel
            x, have = x[:, :3], 3
        if have == self.channels:
            return x
        if have == 3 and self.channels == 1:
            return TF.rgb_to_grayscale(x)
        if have == 1 and self.channels == 3:
            return TF.grayscale_to_rgb(x)
        raise ValueError(f"images with {have} channels cannot feed a model that takes {self.channels}: convert the "
                         f"images to grey or RGB, or build the model with {have} input channels")

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded image + random horizontal flip, independently per image.

        torchvision's ``RandomCrop`` / ``RandomHorizontalFlip`` draw one set of parameters per call (a
        batch would share one crop), so the per-image offsets are drawn here and applied in one gather;
        the flip reverses the column order of the crop.
        """
        n, c, h, w = x.shape
        p = self.crop_padding
        padded = TF.pad(x, [p, p, p, p], fill=0.0)
        generator = self._rng()
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        rows = top[:, None] + torch.arange(h)
        cols = left[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        return padded[
            torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
            rows[:, None, :, None], cols[:, None, None, :],
        ]

    def _rng(self) -> torch.Generator | None:
        if self.seed is None:
            return None  # torch's global generator (seeded by set_seed, re-seeded per DataLoader worker)
        if self._generator is None:
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
        return self._generator


def _image_to_chw(image: Any) -> torch.Tensor:
    """One PIL image or array (HW, HWC) as a ``C x H x W`` tensor of its stored values."""
    if hasattr(image, "mode"):  # PIL
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return TF.pil_to_tensor(image)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(image)))
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim == 3:
        return x.permute(2, 0, 1)
    raise ValueError(f"an image array has shape {tuple(x.shape)}: expected height x width (grey) or "
                     "height x width x channels")

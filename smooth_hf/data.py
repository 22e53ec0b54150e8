"""Image-classification data through ``datasets``: the Hub, a local image folder, a saved dataset, or
Fashion-MNIST from the Debian package's idx files when they are installed (no Hub needed).

Every source ends as a ``DatasetDict`` with ``train`` and ``test`` splits and the columns ``image``
and ``label``; :class:`ImageTransform` turns a batch into ``pixel_values`` and ``labels``, the names
both timm models (through ``SmoothTrainer``) and transformers image models take.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.utils.data
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "ImageTransform",
    "load_fashion_mnist_local",
    "load_image_classification",
    "read_idx",
]

FASHION_MNIST_DIR = Path(os.environ.get("SMOOTH_HF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Short names users type -> Hub ids (the Hub's canonical names moved under organisations).
HUB_ALIASES = {
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
}
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip or plain): the format of the MNIST / Fashion-MNIST distribution."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (the MNIST / Fashion-MNIST format, e.g. "
                         "train-images-idx3-ubyte.gz): point at the original files, or re-download them")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: its header says {dims}, it holds {array.size} values. Re-download "
                         "or reinstall it (Debian: apt-get install --reinstall dataset-fashion-mnist)")
    return array.reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    """``stem`` gzipped (as distributed) or already unpacked."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{directory} has no {stem}.gz (nor {stem}): install the Debian package dataset-fashion-mnist, or set "
        "SMOOTH_HF_FASHION_MNIST_DIR to a folder holding the four Fashion-MNIST idx files"
    )


def load_fashion_mnist_local(directory: str | os.PathLike = FASHION_MNIST_DIR) -> DatasetDict:
    """All 70,000 Fashion-MNIST images from the idx files (Debian package ``dataset-fashion-mnist``).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not, from ``directory``.
    """
    directory = Path(directory)
    features = Features({"image": Array2D((28, 28), "uint8"), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(f"{directory}: {prefix} images {images.shape} and labels {labels.shape} are not "
                             "Fashion-MNIST's N x 28 x 28 images with N labels; check the files")
        splits[split] = Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)
    return DatasetDict(splits)


def _find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{flag} {wanted!r} is not a column of the dataset; its columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"the dataset has no {what} column (looked for {list(candidates)}; it has {columns}). "
                     f"Name it with {flag}.")


def load_image_classification(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    eval_split_ratio: float = 0.1,
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load any image-classification dataset as ``DatasetDict(train, test)`` with ``image``/``label``.

    ``dataset_name`` is one of: ``fashion_mnist`` (local Debian files when present, else the Hub); a
    Hub id or alias (``cifar10``); a folder written by ``save_to_disk``; a folder of images
    (``imagefolder``: one sub-folder per class). A dataset without a test or validation split gets a
    seeded ``eval_split_ratio`` split of its train split.
    """
    path = Path(dataset_name)
    if dataset_name in ("fashion_mnist", HUB_ALIASES["fashion_mnist"]) and FASHION_MNIST_DIR.is_dir():
        data = load_fashion_mnist_local(FASHION_MNIST_DIR)
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        data = load_from_disk(str(path))
    elif path.is_dir():
        data = load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    else:
        data = load_dataset(HUB_ALIASES.get(dataset_name, dataset_name), dataset_config_name, cache_dir=cache_dir)
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    if "train" not in data:
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split (it has {list(data)}): save it as "
                         "DatasetDict({'train': ..., 'test': ...}), or rename its training split to 'train'")
    if "test" not in data:
        if "validation" in data:
            data["test"] = data.pop("validation")
        else:
            split = data["train"].train_test_split(test_size=eval_split_ratio, seed=seed)
            data = DatasetDict({"train": split["train"], "test": split["test"]})

    columns = data["train"].column_names
    image = _find_column(columns, image_column, IMAGE_COLUMNS, "image", "--image_column_name")
    label = _find_column(columns, label_column, LABEL_COLUMNS, "label", "--label_column_name")
    data = data.select_columns([image, label])
    if image != "image":
        data = data.rename_column(image, "image")
    if label != "label":
        data = data.rename_column(label, "label")
    return data


def label_names(dataset: Dataset) -> list[str]:
    """Class names from a ``ClassLabel`` feature, else the sorted distinct label values."""
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset["label"]))]


@dataclass
class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: images -> normalised ``pixel_values``.

    Accepts PIL images or arrays (HWC, HW), any channel count: grey images become 3 channels when the
    model takes 3, colour images become grey (luminance) when it takes 1. ``train=True`` adds the
    standard CIFAR augmentation: a random crop of the image padded by ``CROP_PADDING`` pixels (zeros)
    and a horizontal flip with probability one half, drawn independently for every image.

    Randomness: with ``seed=None`` the crops and flips come from torch's global generator, which
    ``transformers.set_seed`` seeds and every ``DataLoader`` worker re-seeds differently, so runs
    repeat under a seed and workers never repeat each other. With ``seed=s`` the transform owns a
    generator seeded with ``s`` (``s + k`` in ``DataLoader`` worker ``k``).
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    train: bool = False
    seed: int | None = None

    CROP_PADDING: ClassVar[int] = 4

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) == 1 and len(std) == 1:
            mean, std = mean * self.channels, std * self.channels
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {self.channels} channels: give one value "
                             f"per channel, or a single value for all (smooth_hf.modeling.image_input_config(model) "
                             "gives the model's own)")
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
        p = self.CROP_PADDING
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

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

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk

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
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {array.size} values")
    return array.reshape(dims)


def load_fashion_mnist_local(directory: str | os.PathLike = FASHION_MNIST_DIR) -> DatasetDict:
    """All 70,000 Fashion-MNIST images from the idx files (Debian package ``dataset-fashion-mnist``)."""
    directory = Path(directory)
    features = Features({"image": Array2D((28, 28), "uint8"), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
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
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split (splits: {list(data)})")
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

    Accepts PIL images or arrays (HWC, HW), any channel count: grey images are repeated to 3
    channels when the model takes 3, colour images are averaged when it takes 1. ``train=True``
    adds the standard CIFAR augmentation (random crop with 4-pixel padding, horizontal flip).
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    train: bool = False

    def __post_init__(self) -> None:
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if mean.numel() == 1:
            mean, std = mean.expand(self.channels), std.expand(self.channels)
        if mean.numel() != self.channels:
            raise ValueError(f"mean/std have {mean.numel()} values for {self.channels} channels")
        self._mean, self._std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def _to_tensor(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "mode") and image.mode not in ("L", "RGB") else image)
        x = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)) / 255.0
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x[:1].expand(self.channels, -1, -1)
        if self.image_size is not None and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False).squeeze(0)
        return x

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:]
        padded = F.pad(x, (4, 4, 4, 4))
        top, left = np.random.randint(0, 9, size=2)
        x = padded[:, top : top + h, left : left + w]
        return x.flip(2) if np.random.rand() < 0.5 else x

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixels = []
        for image in batch["image"]:
            x = self._to_tensor(image)
            if self.train:
                x = self._augment(x)
            pixels.append((x - self._mean) / self._std)
        return {"pixel_values": pixels, "labels": list(batch["label"])}

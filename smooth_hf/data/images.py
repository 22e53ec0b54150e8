"""Image-classification data through ``datasets``: the Hub, a local image folder, a saved dataset, or
Fashion-MNIST from the Debian package's idx files when they are installed (no Hub needed).

Every source ends as a ``DatasetDict`` with ``train`` and ``test`` splits and the columns ``image``
and ``label``; :func:`prepare_image_splits` picks the subsets (one rule, shared with text:
:func:`smooth_hf.data.splits.select_subset`) and
attaches :class:`~smooth_hf.data.transforms.ImageTransform`, which turns a batch into ``pixel_values`` and
``labels``, the names both timm models (through ``SmoothTrainer``) and transformers image models take.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_dataset, load_from_disk

from .splits import LABEL_COLUMNS, find_column, select_subset, train_test_splits
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "TensorExamples",
    "dataset_card_fields",
    "dataset_display_name",
    "dataset_identity",
    "fashion_mnist_arrays",
    "held_as_tensors",
    "image_channels",
    "label_names",
    "load_fashion_mnist_local",
    "load_image_classification",
    "prepare_image_splits",
    "read_idx",
    "select_subset",
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
# Names for model cards (the Hub's model-index shows them).
PRETTY_NAMES = {
    "zalando-datasets/fashion_mnist": "Fashion-MNIST",
    "uoft-cs/cifar10": "CIFAR-10",
    "uoft-cs/cifar100": "CIFAR-100",
    "ylecun/mnist": "MNIST",
}
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")


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


def fashion_mnist_arrays(directory: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": ...}``: the Fashion-MNIST idx files as ``N x 28 x 28`` uint8 images and
    int64 labels (Debian package ``dataset-fashion-mnist``; ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
    gzipped or not, in ``directory``, by default :data:`FASHION_MNIST_DIR`)."""
    directory = Path(FASHION_MNIST_DIR if directory is None else directory)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(f"{directory}: {prefix} images {images.shape} and labels {labels.shape} are not "
                             "Fashion-MNIST's N x 28 x 28 images with N labels; check the files")
        arrays[split] = images, labels.astype(np.int64)
    return arrays


def load_fashion_mnist_local(directory: str | os.PathLike = FASHION_MNIST_DIR) -> DatasetDict:
    """All 70,000 Fashion-MNIST images from the idx files (:func:`fashion_mnist_arrays`) as a ``DatasetDict``."""
    # Nested lists rather than Array2D: the Trainer fetches 128 random rows per step, and reading Array2D rows back
    # costs an extension-type decode per row, several times slower per batch.
    features = Features({"image": List(List(Value("uint8"))), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    return DatasetDict({
        split: Dataset.from_dict({"image": images, "label": labels}, features=features)
        for split, (images, labels) in fashion_mnist_arrays(directory).items()
    })


def _is_local_folder(dataset_name: str) -> bool:
    """Whether :func:`load_image_classification` reads ``dataset_name`` from a folder so named (else the Debian
    files or the Hub)."""
    fashion = dataset_name in ("fashion_mnist", HUB_ALIASES["fashion_mnist"]) and FASHION_MNIST_DIR.is_dir()
    return not fashion and Path(dataset_name).is_dir()


def dataset_identity(dataset_name: str) -> str:
    """``dataset_name`` as it loads the same data from any working directory: a local folder or file by its absolute
    path."""
    local = _is_local_folder(dataset_name) or Path(dataset_name).is_file()
    return str(Path(dataset_name).resolve()) if local else dataset_name


def load_image_classification(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    eval_split_ratio: float | None = None,
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load any image-classification dataset as ``DatasetDict(train, test)`` with ``image``/``label``.

    ``dataset_name`` is one of: ``fashion_mnist`` (local Debian files when present, else the Hub); a
    Hub id or alias (``cifar10``); a folder written by ``save_to_disk``; a folder of images
    (``imagefolder``: one sub-folder per class). A dataset without a test or validation split gets a
    seeded ``eval_split_ratio`` split of its train split (default ``DEFAULT_EVAL_SPLIT_RATIO``).
    """
    path = Path(dataset_name)
    if _is_local_folder(dataset_name):
        saved = (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()  # by save_to_disk
        data = load_from_disk(str(path)) if saved else load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    elif dataset_name in ("fashion_mnist", HUB_ALIASES["fashion_mnist"]) and FASHION_MNIST_DIR.is_dir():
        data = load_fashion_mnist_local(FASHION_MNIST_DIR)
    else:
        data = load_dataset(HUB_ALIASES.get(dataset_name, dataset_name), dataset_config_name, cache_dir=cache_dir)
    data = train_test_splits(data, dataset_name, eval_split_ratio, seed)
    columns = data["train"].column_names
    image = find_column(columns, image_column, IMAGE_COLUMNS, "image", "--image_column_name")
    label = find_column(columns, label_column, LABEL_COLUMNS, "label", "--label_column_name")
    data = data.select_columns([image, label])
    if image != "image":
        data = data.rename_column(image, "image")
    if label != "label":
        data = data.rename_column(label, "label")
    return data


class TensorExamples(torch.utils.data.Dataset):
    """A transformed image split held as tensors, decoded once: for data read many times (a budget sweep)."""

    def __init__(self, dataset):
        items = dataset[:]
        self.pixel_values, self.labels = torch.stack(list(items["pixel_values"])), torch.as_tensor(items["labels"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}

    def batches(self, size: int) -> list[torch.Tensor]:
        return list(self.pixel_values.split(size))


def held_as_tensors(dataset, max_bytes: int = 2**30):
    """``dataset`` as :class:`TensorExamples` when its images fit in ``max_bytes`` (float32), else as it is.

    Every evaluation of a sweep would otherwise run the transform over the whole split again.
    """
    if len(dataset) == 0:
        return dataset
    size = dataset[0]["pixel_values"].numel() * 4 * len(dataset)
    return TensorExamples(dataset) if size <= max_bytes else dataset


def prepare_image_splits(
    data: str | DatasetDict,
    input_spec: dict[str, Any] | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    augment: bool = False,
    crop_padding: int = 4,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    eval_split_ratio: float | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load -> seeded subsets -> transforms: the ``train`` and ``test`` splits a recipe trains and scores on.

    ``data`` is a dataset name (loaded with :func:`load_image_classification` and the loading arguments)
    or splits already loaded. Subsets follow :func:`select_subset`. With ``input_spec`` (channels, mean,
    std, image_size, processor: :func:`smooth_hf.data.processors.image_input_config` of the model) the splits yield
    ``pixel_values``/``labels`` through :class:`ImageTransform`, the training split augmented when
    ``augment``; without it they keep the raw ``image``/``label`` columns, e.g. to read the label names
    and channels a model is built for, then to be passed back in with that model's spec::

        raw = prepare_image_splits("cifar10", max_eval_samples=1000)
        model = build_model("resnet18_cifar", num_labels=len(label_names(raw["train"])))
        splits = prepare_image_splits(raw, image_input_config(model), augment=True)
    """
    if isinstance(data, str):
        data = load_image_classification(data, dataset_config_name, image_column, label_column, eval_split_ratio,
                                         seed=seed, cache_dir=cache_dir)
    splits = DatasetDict({
        "train": select_subset(data["train"], max_train_samples, seed),
        "test": select_subset(data["test"], max_eval_samples, seed),
    })
    if input_spec is None:
        return splits
    spec = {k: input_spec.get(k) for k in ("channels", "mean", "std", "image_size", "processor")}
    splits["train"] = splits["train"].with_transform(ImageTransform(**spec, train=augment, crop_padding=crop_padding))
    splits["test"] = splits["test"].with_transform(ImageTransform(**spec))
    return splits


def image_channels(dataset: Dataset) -> int:
    """Channels :class:`ImageTransform` reads from the first image of ``dataset`` (1 for grey images)."""
    image = dataset[0]["image"]
    if hasattr(image, "mode"):  # PIL: ImageTransform reads "L" as grey and converts every other mode to RGB
        return 1 if image.mode == "L" else 3
    array = np.asarray(image)
    if array.ndim == 2:
        return 1
    return 3 if array.shape[-1] == 4 else int(array.shape[-1])  # ImageTransform drops a fourth channel


def dataset_display_name(dataset_name: str) -> str:
    """How a card or a saved config names the data: a local folder by its own name (never the user's path)."""
    return Path(dataset_name).name if Path(dataset_name).exists() else dataset_name


def dataset_card_fields(dataset_name: str) -> dict[str, Any]:
    """``ModelCardInfo`` fields that name a dataset: the Hub id (short names resolved, e.g. ``fashion_mnist``
    to ``zalando-datasets/fashion_mnist``) and a readable name. A local folder has no Hub id: the card
    names the folder."""
    if Path(dataset_name).exists():
        return {"datasets": [], "dataset_pretty_name": dataset_display_name(dataset_name)}
    hub_id = HUB_ALIASES.get(dataset_name, dataset_name)
    return {"datasets": [hub_id], "dataset_pretty_name": PRETTY_NAMES.get(hub_id)}


def label_names(dataset: Dataset) -> list[str]:
    """Class names from a ``ClassLabel`` feature, else the sorted distinct label values (of the ``label`` column, or of
    ``labels`` in a tokenised text split)."""
    column = "label" if "label" in dataset.features else "labels"
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[column]))]

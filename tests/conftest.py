"""Shared tiny models and data for the test suite (no network, a few hundred samples at most)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child interpreter that must import *this* checkout's ``smooth_hf``.

    A script run as ``python recipes/x.py`` puts ``recipes/`` first on ``sys.path``, not the working
    directory, so without ``PYTHONPATH`` it would import whichever ``smooth_hf`` is installed.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class TinyConvNet(nn.Module):
    """A plain nn.Module image classifier without batch norm (BN makes GA=1 != GA=2 by design)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3))
        return self.head(torch.relu(self.proj(x)))


def tiny_vit(num_labels: int = 3, image_size: int = 8, channels: int = 1):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def image_dataset(n: int = 16, channels: int = 1, size: int = 8, num_labels: int = 3, seed: int = 1):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "pixel_values": torch.randn(n, channels, size, size, generator=g).tolist(),
        "labels": torch.randint(0, num_labels, (n,), generator=g).tolist(),
    }).with_format("torch")


def easy_image_dataset(n: int = 96, channels: int = 1, size: int = 8, num_labels: int = 3, seed: int = 1):
    """A task a tiny model learns in a few steps: the class sets the mean brightness (-1, 0, +1) under noise."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_labels
    offsets = torch.linspace(-1.0, 1.0, num_labels)[labels].view(n, 1, 1, 1)
    pixels = offsets + 0.3 * torch.randn(n, channels, size, size, generator=g)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()}).with_format("torch")


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts import ``_common`` from their own folder)."""
    import importlib.util
    import sys

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_fmnist(path: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> str:
    """A ``save_to_disk`` dataset in the Fashion-MNIST format: 12x12 grey images, 3 classes, where the
    brightness of the top-left quadrant (and of the one below it) sets the class. Default: 64 train / 32 test."""
    import numpy as np
    from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 12, 12)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[: 6 * (label > 0) + 6, :6] += 150 if label else 0
        return {"image": images, "label": labels}

    features = Features({"image": Array2D((12, 12), "uint8"), "label": ClassLabel(names=["a", "b", "c"])})
    sizes = sizes or {"train": 64, "test": 32}
    DatasetDict({s: Dataset.from_dict(split(n), features=features) for s, n in sizes.items()}).save_to_disk(path)
    return str(path)


def text_dataset(n: int = 16, length: int = 6, num_labels: int = 3, seed: int = 1):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "input_ids": torch.randint(0, 50, (n, length), generator=g).tolist(),
        "labels": torch.randint(0, num_labels, (n,), generator=g).tolist(),
    })


@pytest.fixture
def tiny_conv():
    torch.manual_seed(0)
    return TinyConvNet()

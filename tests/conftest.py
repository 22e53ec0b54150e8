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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes SVDs 20x slower.
    Modules of small linear algebra use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    """torch's global RNG seeded to 0 before each test of a module that uses it."""
    torch.manual_seed(0)


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


def three_conv_net(seed: int = 0) -> nn.Sequential:
    """Three convs and a head on 10x10 grey images: the penalised middle layers can lose a real share of the model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 3))


def tiny_resnet14(**kwargs) -> nn.Module:
    """timm's ``resnet14_cifar`` (registered by smooth_hf), one input channel, 10 classes, in eval mode."""
    import timm

    import smooth_hf.models.resnet_cifar  # noqa: F401  (registers resnet14_cifar with timm)

    torch.manual_seed(0)
    return timm.create_model("resnet14_cifar", **{"in_chans": 1, "num_classes": 10, **kwargs}).eval()


# ---------------------------------------------------------------------------------------------- compressed models
# One compressed model per library, with inputs that exercise it; built once per session (compression is the
# slow part) by compressed_model(name). Tests must not modify them: deep-copy first.


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so that a buffer that fails to load changes the logits."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)


def _compressed_timm() -> tuple[nn.Module, dict]:
    from smooth_hf.lowrank import LowRankConfig, compress

    model = tiny_resnet14()
    _randomise_batchnorm(model)
    compress(model, LowRankConfig(rank_ratio=0.5))
    return model, {"x": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))}


def _compressed_vit() -> tuple[nn.Module, dict]:
    from transformers import ViTConfig, ViTForImageClassification

    from smooth_hf.lowrank import LowRankConfig, compress

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config).eval()
    # ViTModel.forward reads patch_embeddings.projection.weight.dtype, so that conv must stay dense.
    compress(model, LowRankConfig(param_reduction=0.2, exclude_modules=["projection"]))
    return model, {"pixel_values": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))}


def _compressed_bert() -> tuple[nn.Module, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    from smooth_hf.lowrank import LowRankConfig, compress

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    compress(model, LowRankConfig(rank_ratio=0.5))
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {
        "input_ids": torch.randint(0, 100, (2, 8), generator=g),
        "attention_mask": mask,
        "token_type_ids": (torch.arange(8) >= 4).long().expand(2, 8),
    }


def _compressed_gpt2() -> tuple[nn.Module, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from smooth_hf.lowrank import LowRankConfig, compress

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    compress(model, LowRankConfig(rank_ratio=0.5))
    return model, {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))}


_COMPRESSED_BUILDERS = {
    "timm-resnet14_cifar": _compressed_timm,
    "vit": _compressed_vit,
    "bert": _compressed_bert,
    "gpt2": _compressed_gpt2,
}
COMPRESSED_MODELS = list(_COMPRESSED_BUILDERS)
_COMPRESSED_CACHE: dict[str, tuple[nn.Module, dict]] = {}


def compressed_model(name: str) -> tuple[nn.Module, dict]:
    """``(model, inputs)`` for one of COMPRESSED_MODELS, compressed once per session; do not modify it."""
    if name not in _COMPRESSED_CACHE:
        _COMPRESSED_CACHE[name] = _COMPRESSED_BUILDERS[name]()
    return _COMPRESSED_CACHE[name]


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The output of a model from compressed_model, whatever its library."""
    with torch.no_grad():
        if "x" in inputs:
            return model(inputs["x"])
        return model(**inputs).logits

"""smooth_hf.data: the batch image transform (eval and training augmentation) and the local Fashion-MNIST reader."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from smooth_hf.data.images import FASHION_MNIST_LABELS, ImageTransform, load_fashion_mnist_local, read_idx

MEAN, STD = (0.25,), (0.5,)
PAD = 4  # ImageTransform.crop_padding default


def ramp_images(n: int = 6, size: int = 8) -> np.ndarray:
    """Grey images with no symmetry (distinct values), so every crop and flip gives a different image."""
    base = np.arange(size * size, dtype=np.uint8).reshape(size, size) * 3
    return np.stack([base + i for i in range(n)])


def batch(images) -> dict[str, list]:
    return {"image": list(images), "label": list(range(len(images)))}


def stacked(out: dict[str, list]) -> torch.Tensor:
    return torch.stack(out["pixel_values"])


def crops_and_flips(image: torch.Tensor) -> list[torch.Tensor]:
    """Every image the augmentation may produce from ``image`` (C x H x W, before normalisation)."""
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (PAD, PAD, PAD, PAD))
    out = []
    for top, left in itertools.product(range(2 * PAD + 1), repeat=2):
        crop = padded[:, top : top + h, left : left + w]
        out += [crop, crop.flip(-1)]
    return out


def test_eval_transform_scales_normalises_and_keeps_labels():
    images = ramp_images()
    out = ImageTransform(channels=1, mean=MEAN, std=STD)(batch(images))
    x = stacked(out)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    expected = (torch.from_numpy(images).float().unsqueeze(1) / 255 - MEAN[0]) / STD[0]
    torch.testing.assert_close(x, expected)
    assert out["labels"] == list(range(6))


def test_grey_to_rgb_resize_and_per_channel_statistics():
    grey = np.full((12, 12), 255, dtype=np.uint8)
    out = ImageTransform(channels=3, mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 2.0), image_size=16)(batch([grey]))
    (x,) = out["pixel_values"]
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 16, 16))


def test_pil_images_of_mixed_modes_and_sizes_in_one_batch():
    rgb = Image.fromarray(np.full((10, 10, 3), (255, 0, 0), dtype=np.uint8))
    grey = Image.fromarray(np.full((6, 6), 255, dtype=np.uint8))
    palette = grey.convert("P")
    transform = ImageTransform(channels=1, mean=(0.0,), std=(1.0,))
    out = transform(batch([rgb, grey, palette]))
    shapes = [tuple(x.shape) for x in out["pixel_values"]]
    assert shapes == [(1, 10, 10), (1, 6, 6), (1, 6, 6)]  # order kept across the shape groups
    red_luma = 0.2989  # torchvision's (and PIL's) luminance weight of red
    assert out["pixel_values"][0].mean().item() == pytest.approx(red_luma, abs=1e-3)
    assert torch.allclose(out["pixel_values"][1], torch.ones(1, 6, 6))


def test_bad_statistics_and_channel_counts_say_what_to_do():
    with pytest.raises(ValueError, match="one value per channel"):
        ImageTransform(channels=3, mean=(0.5, 0.5), std=(0.5, 0.5))
    two_channels = np.zeros((2, 4, 4, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="build the model with 2 input channels"):
        ImageTransform(channels=3, mean=(0.5,), std=(0.5,))(batch(two_channels))


def test_training_augmentation_is_a_crop_and_flip_of_each_image():
    images = ramp_images(n=32)
    plain = stacked(ImageTransform(channels=1, mean=(0.0,), std=(1.0,))(batch(images)))
    augmented = stacked(ImageTransform(channels=1, mean=(0.0,), std=(1.0,), train=True, seed=0)(batch(images)))
    assert augmented.shape == plain.shape and augmented.dtype == torch.float32
    changed = [not torch.equal(a, p) for a, p in zip(augmented, plain, strict=True)]
    assert sum(changed) >= 28  # 1 in 162 outcomes is the identity
    for a, p in zip(augmented, plain, strict=True):
        assert any(torch.equal(a, candidate) for candidate in crops_and_flips(p))
    flipped = [any(torch.equal(a, c) for c in crops_and_flips(p)[1::2]) for a, p in zip(augmented, plain, strict=True)]
    assert 4 <= sum(flipped) <= 28  # flips are drawn per image, about half


def test_augmentation_is_drawn_per_image_and_reproducible_under_a_seed():
    same = np.repeat(ramp_images(n=1), 16, axis=0)

    def run(**kwargs):
        return stacked(ImageTransform(channels=1, mean=MEAN, std=STD, train=True, **kwargs)(batch(same)))

    first = run(seed=3)
    assert len({x.numpy().tobytes() for x in first}) > 8  # identical inputs, different crops
    assert torch.equal(first, run(seed=3))
    assert not torch.equal(first, run(seed=4))
    torch.manual_seed(7)
    global_rng = run()
    torch.manual_seed(7)
    assert torch.equal(global_rng, run())  # seed=None: transformers.set_seed makes runs repeat


def test_dataloader_workers_draw_different_augmentations():
    dataset = Dataset.from_dict({"image": list(np.repeat(ramp_images(n=1), 8, axis=0)), "label": [0] * 8})
    dataset = dataset.with_transform(ImageTransform(channels=1, mean=MEAN, std=STD, train=True, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         collate_fn=lambda items: torch.stack([i["pixel_values"] for i in items]))
    first, second = list(loader)  # one batch from each worker
    assert not torch.equal(first, second)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)), "train-labels-idx1-ubyte": np.arange(5),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)), "t10k-labels-idx1-ubyte": np.array([9, 0, 4])}
    folder.mkdir()
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_local_fashion_mnist_reader(tmp_path, gz):
    arrays = fake_fashion_mnist(tmp_path / "fmnist", gz)
    data = load_fashion_mnist_local(tmp_path / "fmnist")
    assert {k: len(v) for k, v in data.items()} == {"train": 5, "test": 3}
    assert data["train"].features["label"].names == FASHION_MNIST_LABELS
    np.testing.assert_array_equal(np.asarray(data["train"]["image"]), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(np.asarray(data["test"]["image"]), arrays["t10k-images-idx3-ubyte"])
    assert data["test"]["label"] == [9, 0, 4]
    x = ImageTransform(channels=1, mean=MEAN, std=STD)(data["test"][:3])["pixel_values"][0]
    assert x.shape == (1, 28, 28)


def test_local_fashion_mnist_reader_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*SMOOTH_HF_FASHION_MNIST_DIR"):
        load_fashion_mnist_local(tmp_path)
    path = tmp_path / "cut-idx1-ubyte"
    write_idx(path, np.arange(10))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated.*Re-download"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(path)


def test_a_split_ratio_for_a_dataset_with_its_own_test_split_is_said_to_be_unused(tmp_path, caplog):
    from datasets import DatasetDict

    from smooth_hf.data.images import load_image_classification

    images = [np.zeros((4, 4), dtype=np.uint8)] * 6
    split = Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]})
    DatasetDict({"train": split, "test": split.select(range(3))}).save_to_disk(tmp_path / "d")
    with caplog.at_level("WARNING", logger="smooth_hf.data.images"):
        data = load_image_classification(str(tmp_path / "d"), eval_split_ratio=0.5)
    assert (len(data["train"]), len(data["test"])) == (6, 3)
    assert "has its own test split" in caplog.text and "not used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="smooth_hf.data.images"):
        load_image_classification(str(tmp_path / "d"))
    assert not caplog.text

"""Transformers image models read their images through their own image processor: in training, evaluation, the
compression recipe and pipeline(...). (Issue: every transformers model was normalised with mean = std = 0.5, so an
ImageNet-normalised checkpoint was fine-tuned and scored on inputs it was never trained for.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny_fmnist, tiny_vit
from transformers import AutoImageProcessor, ViTImageProcessor, pipeline

import smooth_hf
from smooth_hf.data import image_input_config, image_processor_for, prepare_image_splits
from smooth_hf.scripts import compress as compress_recipe
from smooth_hf.scripts import train as train_recipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    return save_tiny_fmnist(tmp_path_factory.mktemp("data") / "fmnist")


@pytest.fixture
def imagenet_checkpoint(tmp_path):
    """A pretrained-style RGB checkpoint at 16x16 whose processor normalises as ImageNet checkpoints do."""
    folder = tmp_path / "pretrained"
    tiny_vit(num_labels=3, image_size=16, channels=3).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                      resample=3).save_pretrained(folder)
    return folder


def test_a_checkpoints_images_are_what_its_processor_makes_of_them(tiny_fmnist, imagenet_checkpoint):
    """Grey 12x12 images, an RGB 16x16 ImageNet-normalised checkpoint: the pixels the recipes feed it are its
    processor's output on the images made RGB, not a 0.5 normalisation."""
    model = smooth_hf.checkpoint.build.build_model(str(imagenet_checkpoint), num_labels=3)
    processor = image_processor_for(model, imagenet_checkpoint)
    assert tuple(processor.image_mean) == pytest.approx(IMAGENET_MEAN)
    spec = image_input_config(model, processor)
    assert spec["mean"] == pytest.approx(IMAGENET_MEAN) and spec["std"] == pytest.approx(IMAGENET_STD)
    test = prepare_image_splits(tiny_fmnist, spec)["test"]
    raw = prepare_image_splits(tiny_fmnist)["test"]
    grey = torch.tensor(np.asarray(raw[:4]["image"]), dtype=torch.float32) / 255
    expected = processor(images=grey[:, None].expand(-1, 3, -1, -1), do_rescale=False, return_tensors="pt")["pixel_values"]
    got = torch.stack(test[:4]["pixel_values"])
    assert got.shape == (4, 3, 16, 16)
    torch.testing.assert_close(got, expected)
    # what the old 0.5 normalisation gave is far from it: the test would see the silent error
    half = (torch.nn.functional.interpolate(grey[:, None], size=16, mode="bilinear") - 0.5) / 0.5
    assert (got - half.expand(-1, 3, -1, -1)).abs().max() > 0.3


def test_a_folder_without_a_processor_warns_and_uses_what_from_scratch_models_train_with(tmp_path, caplog):
    folder = tmp_path / "bare"
    tiny_vit(num_labels=3, image_size=8).save_pretrained(folder)
    model = smooth_hf.checkpoint.dense.load_dense(folder)
    with caplog.at_level("WARNING", logger="smooth_hf.data.processors"):
        processor = image_processor_for(model, folder)
    assert "has no image processor" in caplog.text
    assert tuple(processor.image_mean) == (0.5,) and processor.size["height"] == 8
    assert image_processor_for(torch.nn.Linear(2, 2)) is None  # a plain module has none


def test_train_and_compress_save_the_processor_and_pipeline_reads_both_folders(tiny_fmnist, imagenet_checkpoint,
                                                                                tmp_path):
    """The README's promise: pipeline("image-classification", model=folder) on what the recipes write, unchanged."""
    dense, cut = tmp_path / "ft", tmp_path / "ft-lowrank"
    train_recipe.main([
        "--model_name_or_path", str(imagenet_checkpoint), "--dataset_name", tiny_fmnist, "--output_dir", str(dense),
        "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "8", "--report_to", "none",
        "--use_cpu", "--save_strategy", "no",
    ])
    saved = AutoImageProcessor.from_pretrained(dense)
    assert tuple(saved.image_mean) == pytest.approx(IMAGENET_MEAN) and saved.size["height"] == 16
    compress_recipe.main(["--model_name_or_path", str(dense), "--param_reduction", "0.3", "--output_dir", str(cut)])
    assert AutoImageProcessor.from_pretrained(cut).to_dict() == saved.to_dict()

    image = np.asarray(prepare_image_splits(tiny_fmnist)["test"][0]["image"], dtype=np.uint8)
    from PIL import Image

    picture = Image.fromarray(image).convert("RGB")
    for folder in (dense, cut):
        classifier = pipeline("image-classification", model=str(folder), device="cpu")
        scores = classifier(picture, top_k=3)
        assert len(scores) == 3 and {s["label"] for s in scores} == {"a", "b", "c"}
    # the pipeline on the compressed folder computes what the compressed model does on the processor's pixels
    model = smooth_hf.from_pretrained(cut)
    pixels = saved(images=picture, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels).logits.softmax(-1)[0]
    best = pipeline("image-classification", model=str(cut), device="cpu")(picture, top_k=1)[0]
    assert best["score"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_a_model_built_from_a_config_is_saved_with_the_processor_it_trained_with(tiny_fmnist, tmp_path):
    out = tmp_path / "vit"
    train_recipe.main([
        "--model_type", "vit", "--config_overrides",
        "image_size=12,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--dataset_name", tiny_fmnist, "--output_dir", str(out), "--do_train", "--max_steps", "1",
        "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    ])
    processor = AutoImageProcessor.from_pretrained(out)
    assert tuple(processor.image_mean) == (0.5, 0.5, 0.5) and processor.size["height"] == 12

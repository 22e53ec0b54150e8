"""The deployment paths of a compressed model, from the saved checkpoint as a user would load it:
``torch.compile`` and ONNX export + ONNX Runtime, for a timm CNN and a transformers encoder.

docs/deployment.md shows these same calls.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import _randomise_batchnorm, compressed_model, logits, tiny_resnet14

import smooth_hf
from smooth_hf.lowrank import LowRankConfig, compress

MODELS = ["timm-cnn", "bert"]


def compressed_cnn():
    """A one-block-per-stage resnet14_cifar: a timm CNN small enough to compile in seconds."""
    model = tiny_resnet14(channels=(8, 16, 32), layers=(1, 1, 1), num_classes=3)
    _randomise_batchnorm(model)
    compress(model, LowRankConfig(param_reduction=0.5))
    return model, {"x": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))}


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """name -> (model reloaded from disk, its inputs); each compressed model is saved and loaded once."""
    models = {}
    for name in MODELS:
        model, inputs = compressed_cnn() if name == "timm-cnn" else compressed_model(name)
        folder = smooth_hf.save_pretrained(model, tmp_path_factory.mktemp(name) / "ckpt")
        models[name] = (smooth_hf.from_pretrained(folder), inputs)
    return models


def onnx_export(model, inputs: dict, path) -> list[str]:
    """``torch.onnx.export`` through the torch.export-based exporter (``dynamo=True``, torch's default) with a
    dynamic batch (and sequence) axis; returns the input names."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if "x" in inputs:  # a timm model takes the image positionally
        args, kwargs, names = (inputs["x"],), {}, ["pixel_values"]
        shapes = ({0: batch},)
    else:
        args, kwargs, names = (), inputs, list(inputs)
        shapes = {name: {0: batch, 1: sequence} for name in names}
    torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names, output_names=["logits"],
                      dynamic_shapes=shapes, dynamo=True, verbose=False)
    return names


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runtime_matches_pytorch(reloaded, tmp_path, name):
    model, inputs = reloaded[name]
    names = onnx_export(model, inputs, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    # At the export batch, and at another batch (and sequence) size through the dynamic axes.
    other = {k: torch.cat([v, v.flip(0), v], dim=0) for k, v in inputs.items()}
    if name == "bert":
        other = {k: v[:, :6] for k, v in other.items()}
    for feed in (inputs, other):
        (got,) = session.run(["logits"], {n: v.numpy() for n, v in zip(names, feed.values(), strict=True)})
        expected = logits(model, feed).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_matches_eager(reloaded, name):
    model, inputs = reloaded[name]
    compiled = torch.compile(model)
    torch.testing.assert_close(logits(compiled, inputs), logits(model, inputs), atol=1e-4, rtol=0)

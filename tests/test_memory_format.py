"""Evaluating a model in channels_last: the same outputs, the model back in the usual layout after, and nothing
switched where the installed torch computes a layer wrong in it."""

from __future__ import annotations

import copy

import timm
import torch

import smooth_hf  # noqa: F401  (registers the CIFAR ResNets)
from smooth_hf import LowRankConfig, compress
from smooth_hf.core.memory_format import channels_last_inference


def _model(channels=(8, 8, 16)) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=channels, layers=(1, 1, 1)).eval()


def _in_channels_last(model: torch.nn.Module) -> bool:
    """Every 3x3 convolution's weight in channels_last and so not in the usual layout (with one input channel, as
    in the stem, the two layouts are the same)."""
    weights = [m.weight for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                 for w in weights)


def test_channels_last_inference_gives_the_same_outputs_and_restores_the_layout():
    model = _model()
    compressed = copy.deepcopy(model)
    compress(compressed, LowRankConfig(param_reduction=0.5))  # factorised convs too
    x = torch.randn(5, 1, 12, 12)
    for m in (model, compressed):
        with torch.inference_mode():  # as evaluation runs it: the probe of the layers needs gradients all the same
            expected = m(x)
            with channels_last_inference(m) as switched:
                assert switched and _in_channels_last(m)
                got = m(x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert all(p.is_contiguous() for p in m.parameters())  # saved, compressed, exported as usual


def test_channels_last_inference_leaves_models_it_should_not_touch():
    faulty = _model(channels=(4, 8, 8))  # a 4-channel strided 1x1 shortcut: computed wrong in channels_last here
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))  # no convolution at all
    already = _model().to(memory_format=torch.channels_last)  # the user's own layout
    for m in (faulty, linear, already):
        before = [p.stride() for p in m.parameters()]
        with channels_last_inference(m) as switched:
            assert not switched
        assert [p.stride() for p in m.parameters()] == before
    assert _in_channels_last(already)

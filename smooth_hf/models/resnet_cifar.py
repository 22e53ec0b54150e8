"""The paper's model, a CIFAR-style ResNet, registered with timm.

After ``import smooth_hf``, ``timm.create_model("resnet18_cifar", in_chans=1, num_classes=10)`` works
like any timm model (and so does ``--model_name_or_path resnet18_cifar`` in the recipes). The CIFAR
stem is a 3x3 stride-1 convolution with no max-pool, so 28x28 and 32x32 inputs keep their resolution
through the first stage. (timm's own ``ResNet`` hard-codes a 64-channel 7x7 stem, hence this small
class; it follows timm's model interface, so classifier reset and config export work unchanged.)

| name | blocks | widths | parameters (10 classes, 3 channels) |
|---|---|---|---|
| ``resnet18_cifar`` | 2-2-2-2 | 64-128-256-512 | 11.17M (the paper's ResNet-18) |
| ``resnet14_cifar`` | 2-2-2 | 32-64-128 | 0.70M (CPU-scale stand-in, same design) |
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd), nn.BatchNorm2d(out_chs, **dd)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(x)) + shortcut)


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, stride 1, no max-pool); stages double width, halve size.

    Follows timm's model interface (``num_classes``, ``num_features``, ``forward_features``,
    ``forward_head``, ``get_classifier``, ``reset_classifier``), so timm's factory, config export and
    the Trainer treat it as any other timm model.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        channels: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(layers) != len(channels):
            raise ValueError(f"layers {layers} and channels {channels} must have the same length")
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(channels[0], **dd)
        stages, in_chs = [], channels[0]
        for i, (depth, width) in enumerate(zip(layers, channels, strict=True)):
            blocks = [BasicBlock(in_chs if j == 0 else width, width, 2 if i > 0 and j == 0 else 1, **dd)
                      for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = global_pool
        self.fc = nn.Linear(in_chs, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.feature_info = [{"num_chs": c, "reduction": 2**i, "module": f"stages.{i}"} for i, c in enumerate(channels)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(torch.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"resnet18_cifar.untrained": _cfg(), "resnet14_cifar.untrained": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 with a CIFAR stem (the paper's model)."""
    return _create("resnet18_cifar", pretrained, **{"layers": (2, 2, 2, 2), "channels": (64, 128, 256, 512), **kwargs})


@register_model
def resnet14_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Three-stage ResNet-14 with widths 32-64-128 and a CIFAR stem: the CPU-scale model."""
    return _create("resnet14_cifar", pretrained, **{"layers": (2, 2, 2), "channels": (32, 64, 128), **kwargs})

"""Training in channels_last memory format, guarded against convolutions the installed torch gets wrong in it.

channels_last (NHWC) lets oneDNN on CPUs, and tensor cores on GPUs, run convolutions faster; it changes the memory
layout only, so a model trained in it is the same model. It is not always computed correctly: torch 2.14's CPU
kernels return a wrong *weight gradient* for a strided 1x1 convolution with few input channels in channels_last
(a 4-channel stride-2 shortcut on 8x8 maps: off by more than half its size), silently, and with one thread the
same kernel corrupts the heap (glibc aborts the process). So before training in it,
:func:`channels_last_mismatches` refuses that kind of layer outright (strided 1x1 with fewer than 8 input channels:
2 and 4 failed, 8 to 16 did not) and runs every other distinct convolution of the model forward and backward on
random inputs in both layouts, comparing the gradients; :class:`~smooth_hf.SmoothTrainer` uses channels_last only
if every one agrees. :func:`channels_last_inference` uses the same check to evaluate a model in channels_last.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["channels_last_inference", "channels_last_mismatches"]

# Map sizes probed: the faulty kernels depend on the spatial size, and these caught every case found.
_PROBE_SIZES = (8, 10, 16)
_TOLERANCE = 1e-3  # relative to the largest gradient entry; float32 round-off is ~1e-6


def _gradients(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, channels_last: bool) -> list[torch.Tensor]:
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(True)
    if channels_last:
        weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.clone().requires_grad_(True)
    out = conv._conv_forward(x, weight, bias)
    grads = torch.autograd.grad(out, [x, weight] + ([bias] if bias is not None else []), grad_out)
    return [t.contiguous() for t in (out.detach(), *grads)]


def _agrees(conv: nn.Conv2d, device: torch.device, generator: torch.Generator) -> bool:
    """Whether a fresh layer configured like ``conv`` gives the same output and gradients in both layouts on random
    maps."""
    dtype = conv.weight.dtype
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
                      bias=conv.bias is not None, device=device, dtype=dtype)
    span = [conv.dilation[i] * (conv.kernel_size[i] - 1) + 1 for i in range(2)]
    for size in _PROBE_SIZES:
        if isinstance(conv.padding, tuple) and any(size + 2 * conv.padding[i] < span[i] for i in range(2)):
            continue  # too small a map for this kernel
        x = torch.randn(4, conv.in_channels, size, size, generator=generator).to(device, dtype)
        with torch.no_grad():
            shape = probe(x).shape
        grad_out = torch.randn(shape, generator=generator).to(device, dtype)
        usual = _gradients(probe, x, grad_out, channels_last=False)
        fast = _gradients(probe, x, grad_out, channels_last=True)
        for a, b in zip(usual, fast, strict=True):
            if (a - b).abs().max() > _TOLERANCE * a.abs().max().clamp_min(1e-12):
                return False
    return True


def _known_faulty(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and max(conv.stride) > 1 and conv.in_channels < 8


def channels_last_mismatches(model: nn.Module, device: torch.device | str | None = None) -> list[str]:
    """Names of the ``Conv2d`` layers whose output, input gradient or weight gradient differs between channels_last
    and the usual layout on ``device`` (default: the model's), or that are of the kind known to fail. One probe per distinct
    configuration, on small random maps; the model itself is not touched."""
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(0)
    verdicts: dict[tuple, bool] = {}
    broken = []
    with torch.inference_mode(False), torch.enable_grad():  # the probes need gradients, even inside no_grad blocks
        for name, conv in model.named_modules():
            if isinstance(conv, nn.Conv2d) and not _probe(conv, device, generator, verdicts):
                broken.append(name)
    return broken


def _probe(conv: nn.Conv2d, device: torch.device, generator: torch.Generator, verdicts: dict[tuple, bool]) -> bool:
    """Whether ``conv`` computes correctly in channels_last; one probe per distinct configuration (``verdicts``)."""
    key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
           conv.groups, conv.padding_mode, conv.bias is not None, conv.weight.dtype)
    if key not in verdicts:
        # the known faulty kind is never run: its kernel writes out of bounds
        verdicts[key] = not _known_faulty(conv) and _agrees(conv, device, generator)
    return verdicts[key]


@contextmanager
def channels_last_inference(model: nn.Module) -> Iterator[bool]:
    """Run ``model`` in channels_last inside the block, and in the usual layout again after it; yields whether it
    switched. Convolutions run faster in it (oneDNN's CPU kernels, tensor cores), with the same results. Models
    without ``Conv2d`` layers, or with one that :func:`channels_last_mismatches` finds wrong here, are left as they
    are, and so is a model that is not in the usual layout to begin with. For evaluation: a model is saved,
    compressed or exported in the usual layout."""
    usual = all(p.is_contiguous() for p in model.parameters())
    if not usual or not any(isinstance(m, nn.Conv2d) for m in model.modules()) or channels_last_mismatches(model):
        yield False
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        model.to(memory_format=torch.contiguous_format)

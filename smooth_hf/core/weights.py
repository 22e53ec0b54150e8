"""Weights as matrices: the one place that knows each layer's layout.

Every computation on a weight (penalties, spectra, projection, factorisation, whitening) sees it as the
``(out, in * kh * kw)`` matrix ``M`` whose rows are output channels. transformers' ``Conv1D`` (GPT-2) stores its
weight transposed, ``(in, out)``; an ``nn.Embedding`` table ``(vocab, dim)`` is the map from one-hot tokens,
``(dim, vocab)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .libraries import is_hf_conv1d

__all__ = ["check_real_weight", "out_in_weight", "singular_values", "weight_matrix"]


def out_in_weight(module: nn.Module) -> Tensor:
    """The weight of ``module`` in ``(out, in, *kernel)`` layout (a view, gradients flow)."""
    weight = module.weight
    if is_hf_conv1d(module):  # stores (in, out)
        return weight.t()
    return weight


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight of a Linear / HF Conv1D / Conv2d as the ``(out, in*kh*kw)`` matrix whose SVD is taken (of an
    embedding, ``(dim, vocab)``: the map from one-hot tokens)."""
    if isinstance(module, nn.Embedding):
        return module.weight.t()
    weight = out_in_weight(module)
    return weight.reshape(weight.shape[0], -1)


def check_real_weight(name: str, weight: Tensor, action: str) -> None:
    """Refuse a weight that cannot be decomposed: still on the meta device, or holding NaN / Inf.

    ``action`` says what would have happened (``"compressed"``, ``"pruned"``): nothing was, and the message says so.
    """
    if weight.device.type == "meta":
        raise ValueError(f"layer {name!r} is on the meta device: load real weights before it is {action}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r} has NaN or Inf weights; nothing was {action}. Fix or exclude the layer "
                         "(exclude_modules).")


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D ``matrix``, descending, in float64 (LAPACK's ``svdvals``, exact to the smallest).

    Taken of the tall orientation: LAPACK is several times slower on wide matrices, and conv weights
    (``out x in*kh*kw``) are wide.
    """
    matrix = matrix.detach().double()
    return torch.linalg.svdvals(matrix if matrix.shape[0] >= matrix.shape[1] else matrix.t())

"""Smoothness penalties on weight tensors: pure ``Tensor -> scalar Tensor`` functions.

Definitions (plain sums, no normalisation; see docs/training.md, "The penalties, exactly"). For a weight ``W`` laid out as
``(out, in, *kernel)`` -- a Linear ``(out, in)``, a Conv2d ``(out, in, kh, kw)`` -- and
``M = W.reshape(out, -1)``:

* nuclear norm:  ``sum(svdvals(M))``
* first order:   ``sum_i ||W[i+1] - W[i]||^2`` along axis 0, plus the same along axis 1
* second order:  ``sum_i ||W[i+1] - 2 W[i] + W[i-1]||^2`` along axis 0, plus the same along axis 1

Spatial kernel axes are never differenced: a 3x3 kernel is too short for a derivative to mean much.
An axis shorter than the stencil contributes zero. HF ``Conv1D`` stores its weight as ``(in, out)``;
pass it through :func:`out_in_weight` first.

Nothing here imports the Trainer: these are the functions a researcher swaps or extends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.weights import out_in_weight

__all__ = [
    "first_order",
    "nuclear_norm",
    "nuclear_norm_surrogate",
    "out_in_weight",
    "second_order",
    "spectral_direction",
]


def _as_matrix(weight: Tensor) -> Tensor:
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def nuclear_norm(weight: Tensor) -> Tensor:
    """``sum(svdvals(W.reshape(out, -1)))``: the exact nuclear norm (an SVD; see the surrogate)."""
    return torch.linalg.svdvals(_as_matrix(weight)).sum()


def spectral_direction(weight: Tensor, rtol: float = 1e-6, skip: int = 0) -> Tensor:
    """``U V^T`` of the thin SVD of ``W.reshape(out, -1)``, detached, in ``weight``'s shape.

    It is the gradient of the nuclear norm at ``W`` and ``<W, U V^T> == ||W||_*``. Where ``W`` is
    (numerically) rank-deficient the gradient is not unique; singular directions below ``rtol`` times
    the largest are dropped, which is still a subgradient. ``skip`` leaves out the ``skip`` largest
    singular directions: the result is then the gradient of the *tail* ``sum_{i > skip} s_i``, the part of
    the spectrum a rank-``skip`` truncation removes.

    Computed from the eigen-decomposition of the small Gram matrix ``M M^T`` (or ``M^T M``) in float64:
    ``U V^T = U S^{-1} U^T M``. On ResNet-18's convolutions that is faster than a float64 SVD, and less
    sensitive to a loaded machine (``benchmarks/step_overhead.py`` times both), and as exact on the
    directions that matter: float64 keeps singular values down to ~1e-8 of the
    largest, and ``rtol`` stays well above that.
    """
    with torch.no_grad():
        matrix = _as_matrix(weight).double()
        tall = matrix.shape[0] > matrix.shape[1]
        if tall:  # work on the wide orientation: the Gram matrix is then the small one
            matrix = matrix.t()
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix @ matrix.t())
        singular = eigenvalues.clamp_min(0).sqrt()  # ascending
        keep = singular > rtol * singular.max().clamp_min(torch.finfo(torch.float64).tiny)
        keep[max(len(singular) - skip, 0) :] = False  # the largest ``skip`` come last
        u = eigenvectors[:, keep]
        direction = u @ ((u.t() @ matrix) / singular[keep, None])
        if tall:
            direction = direction.t()
        return direction.to(weight.dtype).reshape(weight.shape)


def nuclear_norm_surrogate(weight: Tensor, direction: Tensor) -> Tensor:
    """``<W, D>`` for a detached ``D = spectral_direction(W_0)`` computed at a recent ``W_0``.

    Equals ``||W||_*`` with its exact gradient when ``W == W_0``, and is a lower bound on it otherwise
    (``||W||_* = max_{||Z||_2 <= 1} <W, Z>``). Costs one multiply-add instead of an SVD per step;
    weights move slowly, so a direction refreshed every few steps steers almost exactly like the
    exact norm. See ``SmoothTrainingArguments.nuclear_norm_every``.
    """
    if direction.shape != weight.shape:
        raise ValueError(f"direction shape {tuple(direction.shape)} != weight shape {tuple(weight.shape)}")
    return (weight * direction).sum()


def _sum_sq_diff(weight: Tensor, dim: int, order: int) -> Tensor:
    """Sum of squared ``order``-th finite differences of ``weight`` along ``dim`` (0 if too short)."""
    if weight.shape[dim] <= order:
        return weight.new_zeros(())
    return torch.diff(weight, n=order, dim=dim).pow(2).sum()


def first_order(weight: Tensor) -> Tensor:
    """``sum ||W[i+1] - W[i]||^2`` along the output-channel axis plus the input-channel axis."""
    _as_matrix(weight)  # validates the rank
    return _sum_sq_diff(weight, 0, 1) + _sum_sq_diff(weight, 1, 1)


def second_order(weight: Tensor) -> Tensor:
    """``sum ||W[i+1] - 2 W[i] + W[i-1]||^2`` along the output-channel axis plus the input axis."""
    _as_matrix(weight)
    return _sum_sq_diff(weight, 0, 2) + _sum_sq_diff(weight, 1, 2)


"""Low-rank replacements for ``nn.Linear``, HF ``Conv1D`` and ``nn.Conv2d``.

A weight ``W`` (``out x in*kh*kw``) is replaced by two plain layers, ``up(down(x))``, holding
``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T``: the best rank-``r`` approximation of ``W`` (Eckart-Young).
The singular values are split evenly between the factors so both have the same scale, which keeps
them well conditioned for half-precision inference or later fine-tuning. The factors are ordinary
``nn.Linear`` / ``nn.Conv2d`` modules, so the state dict holds plain tensors (``down.weight``,
``up.weight``, ``up.bias``) that any loader understands, and ``is_low_rank = True`` tells
:mod:`smooth_hf.targeting` never to penalise or factorise them again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..targeting import layer_kind
from .guard import GUARD_SUFFIX, is_guard

__all__ = ["LowRankConv2d", "LowRankLinear", "singular_values", "truncated_svd_factors"]


def _svd_float64(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float64, always of the tall orientation (``M^T = V S U^T``).

    LAPACK is several times slower on wide matrices, and conv weights (``out x in*kh*kw``) are wide.
    """
    matrix = matrix.detach().double()
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.t(), full_matrices=False)
    return uh.t(), s, v.t()


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D ``matrix``, descending, in float64 (tall orientation: see ``_svd_float64``)."""
    matrix = matrix.detach().double()
    return torch.linalg.svdvals(matrix if matrix.shape[0] >= matrix.shape[1] else matrix.t())


def truncated_svd_factors(matrix: Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``matrix``.

    The SVD runs in float64 whatever the weight dtype: float32 SVDs of ill-conditioned smooth weights
    lose the small singular directions we are about to keep, and a half-precision SVD is not even
    available on every device. The factors are returned in ``dtype`` (default: the matrix's dtype).
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    full_rank = min(matrix.shape)
    if not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be in [1, {full_rank}] for a {tuple(matrix.shape)} matrix, got {rank}")
    with torch.no_grad():
        u, s, vh = _svd_float64(matrix)
        root = s[:rank].sqrt()
        up = u[:, :rank] * root
        down = root[:, None] * vh[:rank]
    dtype = dtype or matrix.dtype
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def _check_rank(rank: int, full_rank: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an integer in [1, {full_rank}] for {what}, got {rank!r}")


class _LowRank(nn.Module):
    """Shared by both low-rank layers: ``up(down(x))``, and the dense view other code may read."""

    is_low_rank = True
    down: nn.Module
    up: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # transformers checkpoints carry a guard at the dense weight's name (smooth_hf.lowrank.guard); it has
        # no place in this layer, so a strict load_state_dict skips it instead of calling it unexpected.
        if is_guard(state_dict.get(prefix + GUARD_SUFFIX)):
            del state_dict[prefix + GUARD_SUFFIX]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dense_weight(self) -> Tensor:
        raise NotImplementedError

    # Code that reads ``layer.weight`` / ``layer.bias`` directly (ViTModel reads
    # ``patch_embeddings.projection.weight.dtype``) gets the exact dense equivalent, built on demand;
    # the forward pass never builds it.
    @property
    def weight(self) -> Tensor:
        return self.dense_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias


class LowRankLinear(_LowRank):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: ``rank * (in + out)`` weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, min(in_features, out_features), f"a {out_features}x{in_features} linear layer")
        dd = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **dd)
        self.up = nn.Linear(rank, out_features, bias=bias, **dd)

    @classmethod
    def from_dense(cls, module: nn.Module, rank: int) -> LowRankLinear:
        """Truncated SVD of an ``nn.Linear`` or HF ``Conv1D`` (whose ``(in, out)`` weight is transposed first)."""
        kind = layer_kind(module)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"LowRankLinear.from_dense needs nn.Linear or transformers Conv1D, got {type(module)}")
        weight = module.weight.t() if kind == "conv1d" else module.weight
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, rank, bias=module.bias is not None, device="meta")
        up, down = truncated_svd_factors(weight, rank)
        new.down.weight = nn.Parameter(down, requires_grad=module.weight.requires_grad)
        new.up.weight = nn.Parameter(up, requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            new.up.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return new

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` product of the factors (for inspection; the forward never builds it)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


class LowRankConv2d(_LowRank):
    """``Conv2d(in, rank, k, stride, padding, dilation)`` then a 1x1 ``Conv2d(rank, out)``.

    All the spatial work happens in the first factor, so the output grid (and padding mode) is the
    dense layer's; the second factor only mixes channels. Grouped convolutions are not supported:
    their weight is block diagonal and a single SVD would mix the groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kernel_size = _pair(kernel_size)
        full_rank = min(out_channels, in_channels * kernel_size[0] * kernel_size[1])
        _check_rank(rank, full_rank, f"a conv with {in_channels}->{out_channels} channels and kernel {kernel_size}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size = kernel_size
        self.down = nn.Conv2d(
            in_channels,
            rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=1,
            bias=False,
            padding_mode=padding_mode,
            **dd,
        )
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias, **dd)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        """Truncated SVD of ``module.weight`` reshaped to ``(out, in*kh*kw)``."""
        if layer_kind(module) != "conv2d":
            raise TypeError(f"LowRankConv2d.from_dense needs nn.Conv2d, got {type(module)}")
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) cannot be factorised; keep them dense")
        weight = module.weight
        out_channels, in_channels, kh, kw = weight.shape
        new = cls(
            in_channels,
            out_channels,
            (kh, kw),
            rank,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
        )
        up, down = truncated_svd_factors(weight.reshape(out_channels, -1), rank)
        new.down.weight = nn.Parameter(down.reshape(rank, in_channels, kh, kw), requires_grad=weight.requires_grad)
        new.up.weight = nn.Parameter(up.reshape(out_channels, rank, 1, 1), requires_grad=weight.requires_grad)
        if module.bias is not None:
            new.up.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return new

    @property
    def stride(self) -> tuple[int, ...]:
        return self.down.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.down.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.down.dilation

    def dense_weight(self) -> Tensor:
        """The ``(out, in, kh, kw)`` product of the factors (for inspection; the forward never builds it)."""
        up = self.up.weight.reshape(self.out_channels, self.rank)
        return (up @ self.down.weight.reshape(self.rank, -1)).reshape(
            self.out_channels, self.in_channels, *self.kernel_size
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.up.bias is not None}"
        )

"""Low-rank replacements for ``nn.Linear``, HF ``Conv1D``, ``nn.Conv2d`` and (on request) ``nn.Embedding``.

A weight ``W`` (``out x in*kh*kw``) is replaced by two plain layers, ``up(down(x))``, holding
``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T``: the best rank-``r`` approximation of ``W`` (Eckart-Young).
The singular values are split evenly between the factors so both have the same scale, which keeps
them well conditioned for half-precision inference or later fine-tuning. The factors are ordinary
``nn.Linear`` / ``nn.Conv2d`` modules, so the state dict holds plain tensors (``down.weight``,
``up.weight``, ``up.bias``) that any loader understands. An embedding table (``vocab x dim``) is the linear map
from one-hot tokens, ``W = E^T`` (``dim x vocab``): a lookup into ``rank`` columns, then a Linear to ``dim``.
Every low-rank layer subclasses
:class:`~smooth_hf.lowrank.base.LowRankLayer`, which tells :mod:`smooth_hf.lowrank.targeting` never to
penalise or factorise them again.

Every low-rank layer is built by one constructor, :func:`low_rank_layer_like` (the geometry of a
dense layer, uninitialised): :func:`factorise` then fills the factors from the truncated SVD (what
``compress`` does), and ``apply_ranks`` leaves them for ``load_state_dict`` (what a reload does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..core.weights import out_in_weight, singular_values, weight_matrix
from .base import LowRankLayer
from .decomposition import Decomposition, factors_from
from .targeting import is_plain_embedding, layer_kind

__all__ = [
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLayer",
    "LowRankLinear",
    "dense_layer_shape",
    "factorise",
    "low_rank_layer_like",
    "singular_values",
    "truncated_svd_factors",
    "weight_matrix",
]


def dense_layer_shape(module: nn.Module, kind: str) -> tuple[int, int, int, int]:
    """``(out, in, kh, kw)`` of a supported dense layer of ``kind`` (``layer_kind``); ``kh = kw = 1`` but for convs."""
    if kind == "conv2d":
        return tuple(out_in_weight(module).shape)  # type: ignore[return-value]
    weight = weight_matrix(module)
    return (weight.shape[0], weight.shape[1], 1, 1)


def truncated_svd_factors(matrix: Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``matrix``.

    Computed in float64 whatever the weight dtype (:mod:`~smooth_hf.lowrank.decomposition`): float32
    decompositions of ill-conditioned smooth weights lose the small singular directions we are about
    to keep, and half precision is not even available on every device. The factors are returned in
    ``dtype`` (default: the matrix's dtype).
    """
    if matrix.dim() != 2:
        raise ValueError(
            f"expected a 2-D matrix, got shape {tuple(matrix.shape)}: reshape the weight to (out, in*kh*kw) first "
            "(weight_matrix(module) does)"
        )
    return factors_from(matrix, None, rank, dtype)


def _float(weight: Tensor) -> Tensor:
    """A factor's weight as a plain tensor: a quantized one (torchao's tensor subclasses) implements no product, so
    it is dequantized to its original dtype; a plain tensor is returned as it is (torch's own ``dequantize()`` of a
    plain tensor would turn it into float32)."""
    return weight if type(weight) in (Tensor, nn.Parameter) else weight.dequantize()


def _check_rank(rank: int, full_rank: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(
            f"rank must be an integer in [1, {full_rank}] for {what}, got {rank!r}: pass an integer in that range"
        )


class LowRankLinear(LowRankLayer):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: ``rank * (in + out)`` weights."""

    kind = "linear"

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
        return factorise(module, rank, expect=cls)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        return (self.out_features, self.in_features, 1, 1)

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` product of the factors (in float when they are quantized: :func:`_float`)."""
        return _float(self.up.weight) @ _float(self.down.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


class LowRankConv2d(LowRankLayer):
    """``Conv2d(in, rank, k, stride, padding, dilation)`` then a 1x1 ``Conv2d(rank, out)``.

    All the spatial work happens in the first factor, so the output grid (and padding mode) is the
    dense layer's; the second factor only mixes channels. Grouped convolutions are not supported:
    their weight is block diagonal and a single SVD would mix the groups.
    """

    kind = "conv2d"

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
        return factorise(module, rank, expect=cls)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

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
        """The ``(out, in, kh, kw)`` product of the factors."""
        up = _float(self.up.weight).reshape(self.out_channels, self.rank)
        return (up @ _float(self.down.weight).reshape(self.rank, -1)).reshape(
            self.out_channels, self.in_channels, *self.kernel_size
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.up.bias is not None}"
        )


class LowRankEmbedding(LowRankLayer):
    """``Embedding(vocab, rank)`` then ``Linear(rank, dim, bias=False)``: ``rank * (vocab + dim)`` weights.

    ``padding_idx`` is kept on the lookup (its row gets no gradient), as in the dense table.
    """

    kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, min(num_embeddings, embedding_dim), f"a {num_embeddings}x{embedding_dim} embedding")
        dd = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.down = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, **dd)
        self.up = nn.Linear(rank, embedding_dim, bias=False, **dd)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        return (self.embedding_dim, self.num_embeddings, 1, 1)

    def dense_weight(self) -> Tensor:
        """The ``(vocab, dim)`` table the factors stand for."""
        return _float(self.down.weight) @ _float(self.up.weight).t()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"


def low_rank_layer_like(
    dense: nn.Module,
    rank: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankLayer:
    """An uninitialised rank-``rank`` layer with the geometry of ``dense`` (Linear, HF Conv1D or Conv2d).

    The one constructor of low-rank layers: :func:`factorise` fills its factors from the SVD of the
    dense weight, :func:`smooth_hf.lowrank.apply_ranks` leaves them for ``load_state_dict``.
    ``device`` and ``dtype`` default to those of ``dense``'s weight; on the ``"meta"`` device nothing
    is allocated, elsewhere the parameters hold uninitialised memory (``torch.empty``).

    Raises:
        TypeError: ``dense`` is not a layer that can be factorised.
        ValueError: a grouped convolution, or ``rank`` not in ``[1, full rank]``.
    """
    kind = layer_kind(dense, embeddings=True)
    if kind is None:
        raise TypeError(
            f"cannot factorise a {type(dense).__name__}: only nn.Linear, nn.Conv2d, transformers' Conv1D and plain "
            "nn.Embedding layers can be low-rank. Leave it out of target_modules (or add it to exclude_modules)."
        )
    weight = dense.weight
    device = weight.device if device is None else torch.device(device)
    dtype = weight.dtype if dtype is None else dtype
    if kind == "embedding":
        new = LowRankEmbedding(dense.num_embeddings, dense.embedding_dim, rank, dense.padding_idx, device="meta",
                               dtype=dtype)
        return new if device.type == "meta" else new.to_empty(device=device)
    bias = dense.bias is not None
    # Built on the meta device first: no random initialisation of factors that are about to be overwritten.
    if kind == "conv2d":
        if dense.groups != 1:
            raise ValueError(
                f"grouped convolutions (groups={dense.groups}) cannot be factorised (their weight is block diagonal); "
                "keep them dense: add them to exclude_modules."
            )
        out, inp, kh, kw = weight.shape
        new: LowRankLayer = LowRankConv2d(
            inp,
            out,
            (kh, kw),
            rank,
            stride=dense.stride,
            padding=dense.padding,
            dilation=dense.dilation,
            bias=bias,
            padding_mode=dense.padding_mode,
            device="meta",
            dtype=dtype,
        )
    else:
        out, inp = out_in_weight(dense).shape
        new = LowRankLinear(inp, out, rank, bias=bias, device="meta", dtype=dtype)
    return new if device.type == "meta" else new.to_empty(device=device)


def factorise(
    dense: nn.Module,
    rank: int,
    *,
    expect: type[LowRankLayer] = LowRankLayer,
    factors: tuple[Tensor, Tensor] | None = None,
    decomposition: Decomposition | None = None,
) -> LowRankLayer:
    """The best rank-``rank`` replacement of ``dense`` (truncated SVD), in ``dense``'s dtype and on its device.

    ``expect`` narrows the accepted layers (``LowRankConv2d.from_dense`` passes ``LowRankConv2d``).
    ``factors`` are ``(up, down)`` computed elsewhere (``(out, rank)`` and ``(rank, in*kh*kw)``, e.g. the
    whitened truncation of :mod:`smooth_hf.lowrank.whitening`) to use instead of the SVD of the weight.
    ``decomposition`` is ``decompose(weight_matrix(dense))`` when the caller already has it (``compress``
    does: it reuses the decomposition that gave the spectrum instead of running a second one).
    """
    new = low_rank_layer_like(dense, rank, device="meta")
    if not isinstance(new, expect):
        raise TypeError(
            f"{expect.__name__}.from_dense cannot replace a {type(dense).__name__}; call "
            "smooth_hf.lowrank.layers.factorise(module, rank), which picks the matching low-rank layer."
        )
    if factors is None:
        up, down = factors_from(weight_matrix(dense), decomposition, rank)
    else:
        up, down = factors
        out, inp = weight_matrix(dense).shape
        if tuple(up.shape) != (out, rank) or tuple(down.shape) != (rank, inp):
            raise ValueError(
                f"factors of shapes {tuple(up.shape)} and {tuple(down.shape)} do not make a rank-{rank} "
                f"{out}x{inp} weight: pass up as ({out}, {rank}) and down as ({rank}, {inp})"
            )
        up, down = up.to(dense.weight.dtype), down.to(dense.weight.dtype)
    trainable = dense.weight.requires_grad
    if is_plain_embedding(dense):  # the lookup table holds the (rank, vocab) factor as its (vocab, rank) rows
        down = down.t().contiguous()
    new.down.weight = nn.Parameter(down.reshape(new.down.weight.shape), requires_grad=trainable)
    new.up.weight = nn.Parameter(up.reshape(new.up.weight.shape), requires_grad=trainable)
    if getattr(dense, "bias", None) is not None:
        new.up.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
    return new

"""What each process holds of a weight that FSDP2 split, and the communication between those pieces.

``torch.distributed.fsdp.fully_shard`` (FSDP2: Accelerate's ``fsdp_version: 2``) keeps every parameter as a ``DTensor``
split along its first stored dimension (``Shard(0)``): each process holds a block of it, and the whole weight exists
only during the forward and backward of the module that owns it. The penalties and rank projection never gather a
weight whole outside those passes; they compute on the block each process holds (:class:`Held`) and combine the blocks
with a few collectives, each over the processes that split the weight:

* sums (a squared Frobenius norm, finite differences, the nuclear norm's surrogate) add each block's share: one
  all-reduce of a few numbers per layer, every layer in the same call (:func:`sum_over_blocks`);
* finite differences across the split need the one or two slices just beyond each block (:func:`edge_slices`);
* Gram matrices of the unsplit axis are sums of the blocks' Grams (:func:`all_reduce`, in buckets);
* a whole tensor is gathered only where that moves fewer bytes than a Gram would (:func:`gather`).

Seen in :func:`~smooth_hf.core.weights.out_in_weight`'s ``(out, in, *kernel)`` layout, the split axis is the output
channels of a Linear or Conv2d (axis 0), and the input features of transformers' ``Conv1D``, which stores its weight
``(in, out)``; an embedding, seen as its ``(dim, vocab)`` matrix (:func:`~smooth_hf.core.weights.weight_matrix`), is
split along the vocabulary (axis 1).

A weight held whole -- a plain tensor: no FSDP, or a root module's parameters between its forward and its backward --
has no :class:`Split` and needs no communication. A DTensor split any other way (tensor parallelism, a custom
``shard_placement_fn``) is refused with an error that says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..core.libraries import is_hf_conv1d
from ..lowrank.targeting import is_plain_embedding

__all__ = [
    "BUCKET_BYTES",
    "Held",
    "Split",
    "all_reduce",
    "any_split",
    "broadcast_buffers",
    "edge_slices",
    "gather",
    "held",
    "is_split",
    "sum_over_blocks",
    "sum_over_processes",
    "whole_weights",
]

# Tensors summed in one all-reduce: large enough that a model's small Grams travel together, small enough that the
# flattened copy of a bucket stays a modest fraction of the memory the Grams themselves take.
BUCKET_BYTES = 1 << 26


@dataclass(frozen=True)
class Split:
    """How a weight is split: along ``axis`` of its ``(out, in, *kernel)`` view, in blocks of ``sizes`` over ``group``."""

    axis: int
    group: dist.ProcessGroup
    index: int  # this process's block
    sizes: tuple[int, ...]  # the length of each process's block along ``axis``, in the group's order

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.index])

    @property
    def length(self) -> int:
        return self.sizes[self.index]

    def block_of(self, whole: Tensor) -> Tensor:
        """This process's block of a tensor shaped like the whole weight."""
        return whole.narrow(self.axis, self.offset, self.length)


@dataclass
class Held:
    """What this process holds of one layer's weight, in ``(out, in, *kernel)`` layout (an embedding: ``(dim, vocab)``)."""

    weight: Tensor  # a view of the parameter (gradients flow, in-place writes reach it): the whole weight, or a block
    shape: torch.Size  # the whole weight's
    split: Split | None  # None: held whole

    @property
    def matrix(self) -> Tensor:
        """The ``(out, in*kh*kw)`` matrix whose spectrum is taken (this process's rows or columns of it)."""
        return self.weight.reshape(self.weight.shape[0], math.prod(self.weight.shape[1:]))  # a block may be empty

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])


def _split_of(param: Tensor, name: str) -> tuple[Tensor, Split | None]:
    """The local tensor of ``param`` and how it is split along its first stored dimension (None: held whole)."""
    if not isinstance(param, DTensor):
        return param, None
    mesh, placements = param.device_mesh, param.placements
    split_dims = [d for d, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(split_dims) != 1 or type(placements[split_dims[0]]) is not Shard or placements[split_dims[0]].dim != 0:
        raise ValueError(
            f"{name}'s weight is distributed as {placements} over a device mesh of shape {tuple(mesh.shape)}: smoothness "
            "penalties and rank projection work on FSDP2's row blocks (fully_shard's default Shard(0), with Replicate "
            "on any other mesh dimension, as HSDP does) and on whole weights. Train without tensor or context "
            "parallelism and without a custom shard_placement_fn, or turn the penalties and rank projection off."
        )
    dim = split_dims[0]
    local = param.to_local()
    length, parts = param.shape[0], mesh.size(dim)
    chunk = -(-length // parts)  # torch.chunk's blocks, which DTensor's Shard uses: the last ones may be short or empty
    sizes = tuple(max(0, min(length, (i + 1) * chunk) - i * chunk) for i in range(parts))
    index = mesh.get_local_rank(dim)
    if local.shape[0] != sizes[index]:
        raise RuntimeError(f"{name}: this process holds {local.shape[0]} of {length} rows where torch.chunk's split "
                           f"gives {sizes[index]}; smooth_hf cannot place its block")
    return local, Split(0, mesh.get_group(dim), index, sizes)


def held(module: nn.Module, name: str = "layer") -> Held:
    """What this process holds of ``module``'s weight: ``out_in_weight``'s layout, or an embedding's ``(dim, vocab)``
    matrix (the view rank projection acts on), as a view of the parameter or of its local block."""
    param = module.weight
    local, split = _split_of(param, name)
    transposed = is_plain_embedding(module) or is_hf_conv1d(module)  # stored (vocab, dim) or (in, out)
    if transposed:
        local = local.t()
        shape = torch.Size((param.shape[1], param.shape[0]))
        if split is not None:
            split = Split(1, split.group, split.index, split.sizes)
    else:
        shape = param.shape
    return Held(local, shape, split)


def is_split(module: nn.Module) -> bool:
    """Whether ``module``'s weight is split across processes (FSDP2) right now."""
    return isinstance(module.weight, DTensor)


def any_split(layers: Sequence[tuple[str, nn.Module]]) -> bool:
    """Whether any of ``layers``' weights is split across processes (FSDP2) right now."""
    return any(is_split(module) for _, module in layers)


# ---------------------------------------------------------------------------------------------- collectives
def _buckets(tensors: Sequence[Tensor], limit: int) -> Iterator[list[int]]:
    """Indices of ``tensors`` grouped into runs of one dtype and at most ``limit`` bytes (a larger tensor alone)."""
    bucket: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or t.dtype != tensors[bucket[0]].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None,
               limit: int = BUCKET_BYTES) -> list[Tensor]:
    """The sums of ``tensors`` over the processes of ``group``: new tensors, flattened together into one call per bucket
    of at most ``limit`` bytes."""
    out: list[Tensor] = [t for t in tensors]
    for bucket in _buckets(tensors, limit):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
        dist.all_reduce(flat, group=group)
        for i, piece in zip(bucket, flat.split([tensors[i].numel() for i in bucket]), strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out


def sum_over_processes(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor summed over every process that trains (the statistics of the whole global batch); unchanged in a
    single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(tensors)
    return dict(zip(tensors, all_reduce(list(tensors.values())), strict=True))


def _by_group(splits: Sequence[Split | None]) -> dict[dist.ProcessGroup, list[int]]:
    groups: dict[dist.ProcessGroup, list[int]] = {}
    for i, split in enumerate(splits):
        if split is not None:
            groups.setdefault(split.group, []).append(i)
    return groups


def sum_over_blocks(values: Sequence[Tensor], grads: Sequence[Tensor], splits: Sequence[Split | None]) -> list[Tensor]:
    """Scalars that are sums over the blocks of split weights: ``values[i]`` is this block's share of quantity ``i``, and
    ``grads[i]`` a local expression whose gradient on this block is the whole quantity's (the two differ where a sum
    reaches across the split: :func:`edge_slices`). Returns each quantity's total over ``splits[i].group``, carrying
    ``grads[i]``'s gradient: ``total + (grads[i] - grads[i].detach())``. One all-reduce per group for all of them, in
    float64; a quantity whose split is None is returned as ``grads[i]``."""
    out = list(grads)
    for group, indices in _by_group(splits).items():
        (totals,) = all_reduce([torch.stack([values[i].detach().double().reshape(()) for i in indices])], group)
        for i, total in zip(indices, totals, strict=True):
            out[i] = total.to(grads[i].dtype) + (grads[i] - grads[i].detach())
    return out


def _edges(block: Tensor, width: int) -> Tensor:
    """The first and the last ``width`` slices of ``block`` along its first axis, zero-padded when it is shorter."""
    edges = block.new_zeros((2, width, *block.shape[1:]))
    n = min(width, block.shape[0])
    if n:
        edges[0, :n], edges[1, width - n:] = block[:n], block[block.shape[0] - n:]
    return edges


def edge_slices(blocks: Sequence[Tensor], splits: Sequence[Split], width: int) -> list[tuple[Tensor, Tensor]]:
    """For each block, the ``width`` slices of the whole weight just before it and just after it along its split axis
    (fewer at the ends of the weight), detached. One all-gather per group, for all blocks."""
    out: list[tuple[Tensor, Tensor]] = [None] * len(blocks)  # type: ignore[list-item]
    for group, indices in _by_group(splits).items():
        moved = [blocks[i].detach().movedim(splits[i].axis, 0) for i in indices]
        dtype = moved[0].dtype
        for m in moved[1:]:
            dtype = torch.promote_types(dtype, m.dtype)
        mine = torch.cat([_edges(m, width).to(dtype).reshape(-1) for m in moved])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        start = 0
        for i, m in zip(indices, moved, strict=True):
            split, shape = splits[i], (2, width, *m.shape[1:])
            numel = math.prod(shape)
            edges = [e[start:start + numel].view(shape).to(m.dtype) for e in everyone]
            start += numel
            counts = [min(width, n) for n in split.sizes]
            before = torch.cat([edges[j][1][width - counts[j]:] for j in range(split.index)] + [m[:0]])[-width:]
            after = torch.cat([m[:0]] + [edges[j][0][:counts[j]] for j in range(split.index + 1, len(split.sizes))])
            out[i] = (before.movedim(0, split.axis), after[:width].movedim(0, split.axis))
    return out


def gather(block: Tensor, split: Split) -> Tensor:
    """The whole tensor from every process's block along ``split.axis`` (detached; every process gets it)."""
    moved = block.detach().movedim(split.axis, 0)
    padded = moved.new_zeros((max(split.sizes), *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    everyone = [torch.empty_like(padded) for _ in split.sizes]
    dist.all_gather(everyone, padded, group=split.group)
    return torch.cat([e[:n] for e, n in zip(everyone, split.sizes, strict=True)]).movedim(0, split.axis)


def broadcast_buffers(model: nn.Module) -> None:
    """Every process's buffers (BatchNorm statistics) set to rank 0's, as DDP sets them before each forward: FSDP2
    leaves each process's buffers its own, updated by its own batches only. One broadcast per dtype."""
    buffers = [b for b in model.buffers() if b.numel()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order in every process
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        dist.broadcast(flat, src=0)
        for b, piece in zip(same, flat.split([b.numel() for b in same]), strict=True):
            b.copy_(piece.view_as(b))


# ---------------------------------------------------------------------------------------------- saving
@contextmanager
def whole_weights(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its split parameters replaced, on the main process, by whole copies (in CPU memory) while inside,
    so that a writer of plain checkpoints (``save_dense``, ``save_pretrained``) writes the same files as from a model
    trained without FSDP; restored on exit. Every process must enter (the gathering is collective); only the main
    process (rank 0) holds the whole weights. A model without split parameters is yielded as it is."""
    params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    if not any(isinstance(p, DTensor) for p in params.values()):
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    if dist.get_rank() == 0:
        wholes: dict[int, nn.Parameter] = {}  # tied parameters stay tied: one whole copy per split parameter
        for module_name, module in model.named_modules(remove_duplicate=False):
            for param_name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    key = f"{module_name}.{param_name}" if module_name else param_name
                    if id(param) not in wholes:  # a tensor of its own (the gathered ones can share storage)
                        wholes[id(param)] = nn.Parameter(state.pop(key).clone(), requires_grad=param.requires_grad)
                    module._parameters[param_name] = wholes[id(param)]
                    swapped.append((module, param_name, param))
    try:
        yield model
    finally:
        for module, param_name, param in swapped:
            module._parameters[param_name] = param

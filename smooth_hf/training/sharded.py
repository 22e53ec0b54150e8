"""The penalties' sums and the spectra behind the nuclear norm and rank projection, for weights held whole or in blocks.

On a weight held whole these are the plain computations (:mod:`smooth_hf.training.penalties`,
:mod:`smooth_hf.lowrank.decomposition`, :mod:`smooth_hf.lowrank.whitening`). On a weight that FSDP2 split across
processes (:mod:`smooth_hf.training.shards`) each process computes on its own block and the blocks exchange only what
the result needs, never the weight in the penalty's step:

* **sums** -- ``||W||_F^2``, first and second differences, the nuclear norm's surrogate ``<W, D>`` -- are each block's
  share plus, for differences along the split axis, the terms that reach into the one or two slices beyond the block
  (:func:`layer_sums`). Every process gets the whole value, and its block gets the whole gradient.
* **spectra** come from the Gram matrix of the matrix's short side (as for a whole weight), ``U Σ² Uᵀ``. Where the short
  side is the unsplit axis -- the input features of a tall Linear split by rows -- the Gram is the sum of the blocks'
  Grams: one all-reduce of ``in x in`` numbers, batched over layers (:func:`spectra`). Where the short side is the split
  axis -- a wide Linear or a convolution (``out < in*kh*kw``), split by rows -- the ``out x out`` Gram needs every row
  with every other, and its ``in x in`` alternative would be larger than the weight: the layer's matrix is gathered once
  instead (fewer bytes than that Gram, and the same small eigen-problem a whole weight has).
* **directions and projections** apply ``U f(Σ) Uᵀ`` to the block from the side of the basis: the nuclear norm's
  gradient ``M_i V Σ⁻¹ Vᵀ`` and the rank-``r`` projection ``M_i V_r V_rᵀ`` of block ``i`` are local
  (:func:`direction`, :func:`project_block_`).
* **whitened projection** (:func:`whitened_spectra`) needs, besides the layer's input Gram ``G``, the weight's Gram of
  the input side, ``Wᵀ W``: for a layer split by rows both are ``in x in``, and the block's projection is
  ``W_i S V_r V_rᵀ S⁻¹`` with ``S Sᵀ = G + λI``. An embedding, split along its vocabulary, has a diagonal ``G`` and
  needs ``W diag(G + λ) Wᵀ`` (``dim x dim``). transformers' ``Conv1D`` is split along its input features, where a full
  ``G`` couples every block with every other: refused, with what to do.

The results equal the whole-weight computations up to float round-off (``tests/test_fsdp.py`` checks them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lowrank.decomposition import BASIS_CACHE_BYTES, decompose
from ..lowrank.whitening import damped, whitened_decomposition
from .penalties import first_order, nuclear_norm_surrogate, second_order
from .shards import BUCKET_BYTES, Held, Split, all_reduce, edge_slices, gather, sum_over_blocks

__all__ = ["SUMS", "Spectrum", "WhitenedSpectrum", "direction", "layer_sums", "project_block_", "project_whitened_block_",
           "spectra", "split_inputs_error", "whitened_spectra"]

SUMS = ("sq_norm", "first_order", "second_order", "nuclear_norm")  # what layer_sums computes, by name
_ORDERS = {"first_order": 1, "second_order": 2}


# ---------------------------------------------------------------------------------------------- penalty sums
def _sq_diff(x: Tensor, dim: int, order: int) -> Tensor:
    return torch.diff(x, n=order, dim=dim).pow(2).sum() if x.shape[dim] > order else x.new_zeros(())


def _whole_sum(name: str, weight: Tensor, direction: Tensor | None) -> Tensor:
    if name == "sq_norm":
        return weight.pow(2).sum()
    if name == "nuclear_norm":
        return nuclear_norm_surrogate(weight, direction)
    return first_order(weight) if name == "first_order" else second_order(weight)


def _direction_for(direction: Tensor, held: Held, is_block: bool) -> Tensor:
    """A cached direction as ``held`` holds the weight now: whole (computed on a whole weight, or loaded from a
    checkpoint) and cut to this process's block, or already this process's block of a split weight."""
    if not is_block:
        return direction if held.split is None else held.split.block_of(direction)
    if held.split is None:
        raise ValueError("a nuclear-norm direction was cached as a block of a weight split across processes, and the "
                         "weight is now held whole: call the penalty's invalidate() after changing how weights are split")
    return direction


def layer_sums(helds: Sequence[Held], wanted: Sequence[str], directions: Sequence[Tensor] | None = None,
               blocks: Sequence[bool] | None = None) -> list[dict[str, Tensor]]:
    """For each layer, the sums in ``wanted`` (names from :data:`SUMS`) over its whole weight, differentiable:
    ``sq_norm`` = ``||W||_F^2``, ``first_order`` / ``second_order`` as :mod:`~smooth_hf.training.penalties` defines
    them, ``nuclear_norm`` = the surrogate ``<W, D>`` with ``directions[i]``, whole or (``blocks[i]``) this process's
    block of it. A weight held in
    blocks gets each sum's whole value and, on its block, the whole sum's gradient; one all-gather of edge slices (for
    the differences) and one all-reduce of scalars serve every layer."""
    out: list[dict[str, Tensor]] = []
    split_terms: list[tuple[int, str, Tensor, Tensor]] = []  # (layer, name, this block's share, local gradient term)
    widths = [_ORDERS[name] for name in wanted if name in _ORDERS]
    split_layers = [i for i, h in enumerate(helds) if h.split is not None]
    edges = dict(zip(split_layers, edge_slices([helds[i].weight for i in split_layers],
                                               [helds[i].split for i in split_layers], max(widths)), strict=True)) \
        if widths and split_layers else {}
    for i, h in enumerate(helds):
        w = h.weight
        d = None
        if "nuclear_norm" in wanted:
            d = _direction_for(directions[i].to(w.device, w.dtype), h, bool(blocks and blocks[i]))
        if h.split is None:  # the plain functions, as for any whole weight
            out.append({name: _whole_sum(name, w, d) for name in wanted})
            continue
        out.append({})
        for name in wanted:
            if name == "sq_norm":
                share = gradient = w.pow(2).sum()
            elif name == "nuclear_norm":
                share = gradient = (w * d).sum()
            else:
                share, gradient = _split_differences(w, h.split, h.shape, _ORDERS[name], edges[i])
            split_terms.append((i, name, share, gradient))
    totals = sum_over_blocks([t[2] for t in split_terms], [t[3] for t in split_terms],
                             [helds[t[0]].split for t in split_terms])
    for (i, name, _, _), total in zip(split_terms, totals, strict=True):
        out[i][name] = total
    return out


def _split_differences(block: Tensor, split: Split, shape: torch.Size, order: int,
                       edges: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(This block's share, a term with the whole sum's gradient on the block) of the squared ``order``-th differences
    along the output and input axes. Along the unsplit axis both are the block's own differences. Along the split axis
    the block's share is the differences that start in it (reaching ``order`` slices into the next block); the
    gradient term is every difference that touches the block, the slices beyond it held constant."""
    other = 1 - split.axis
    share = gradient = _sq_diff(block, other, order)
    if shape[split.axis] > order and block.shape[split.axis] > 0:
        before, after = (e.to(block.dtype) for e in edges)
        before = before.narrow(split.axis, max(0, before.shape[split.axis] - order), min(order, before.shape[split.axis]))
        after = after.narrow(split.axis, 0, min(order, after.shape[split.axis]))
        starting_here = _sq_diff(torch.cat([block, after], split.axis), split.axis, order)
        touching = _sq_diff(torch.cat([before, block, after], split.axis), split.axis, order)
        share, gradient = share + starting_here.detach(), gradient + touching
    return share, gradient


# ---------------------------------------------------------------------------------------------- spectra
@dataclass
class Spectrum:
    """The singular values of one layer's matrix and the singular vectors of one side, ready to act on ``held``."""

    held: Held
    values: Tensor  # float64, descending
    basis: Tensor | None  # columns: singular vectors of ``side``, in the order of ``values``; None: dropped (memory)
    side: int  # 0: left singular vectors (out x out), 1: right ones (in*kh*kw x in*kh*kw)
    whole: Tensor | None = None  # the gathered matrix (float64), kept with the basis when ``side`` is the split axis


def _short_side(held: Held) -> int:
    out, n = held.matrix_shape
    return 0 if out <= n else 1


def _gram(matrix: Tensor, side: int) -> Tensor:
    m = matrix.detach().double()
    return m @ m.t() if side == 0 else m.t() @ m


def _eigen(gram: Tensor) -> tuple[Tensor, Tensor]:
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    return eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1)


def _reduced(helds: Sequence[Held], local: Sequence[Tensor | None], limit: int = BUCKET_BYTES
             ) -> Iterator[tuple[int, Tensor]]:
    """``(i, local[i] summed over helds[i].split.group)`` for every ``local[i]`` that is not None, all-reduced in buckets
    (in order, so every process makes the same calls); memory holds one bucket of them at a time."""
    pending: list[int] = []
    size = 0
    for i, t in enumerate(local):
        if t is None:
            continue
        group = helds[i].split.group
        if pending and (size + t.numel() * t.element_size() > limit or helds[pending[0]].split.group is not group):
            yield from zip(pending, all_reduce([local[j] for j in pending], helds[pending[0]].split.group), strict=True)
            pending, size = [], 0
        pending.append(i)
        size += t.numel() * t.element_size()
    if pending:
        yield from zip(pending, all_reduce([local[j] for j in pending], helds[pending[0]].split.group), strict=True)


@torch.no_grad()
def spectra(helds: Sequence[Held], keep_bytes: int = BASIS_CACHE_BYTES) -> list[Spectrum]:
    """The spectrum of each layer's matrix (the whole matrix's, whichever way it is held) and the singular vectors of its
    short side, kept while their bytes fit ``keep_bytes`` (beyond, :func:`direction` and :func:`project_block_` decompose
    those layers again). Grams of the unsplit side are summed in batched all-reduces; a matrix whose short side is the
    split axis is gathered (see the module doc). Every process that shares a split must call this together."""
    out: list[Spectrum | None] = [None] * len(helds)
    kept = 0

    def keep(nbytes: int) -> bool:
        nonlocal kept
        if kept + nbytes > keep_bytes:
            return False
        kept += nbytes
        return True

    for i, h in enumerate(helds):  # whole weights and gathered ones first: nothing to batch
        side = _short_side(h)
        if h.split is None:
            d = decompose(h.matrix, keep_basis=keep(min(h.matrix_shape) ** 2 * 8))
            out[i] = Spectrum(h, d.singular_values, d.basis, 0 if d.left else 1)
        elif h.split.axis == side:
            whole = gather(h.matrix, h.split).double()
            values, basis = _eigen(_gram(whole, side))
            stored = keep(basis.numel() * 8 + whole.numel() * 8)
            out[i] = Spectrum(h, values, basis if stored else None, side, whole if stored else None)
    local = [_gram(h.matrix, _short_side(h)) if out[i] is None else None for i, h in enumerate(helds)]
    for i, gram in _reduced(helds, local):
        local[i] = None  # the local Gram is freed as its bucket is summed
        values, basis = _eigen(gram)
        out[i] = Spectrum(helds[i], values, basis if keep(basis.numel() * 8) else None, _short_side(helds[i]))
    return out  # type: ignore[return-value]


def _apply(spectrum: Spectrum, weights: Tensor) -> Tensor:
    """This process's block (or the whole) of ``B diag(weights) Bᵀ M`` (left basis) or ``M B diag(weights) Bᵀ`` (right),
    float64, ``M`` the layer's matrix and ``B`` the basis: only the columns with a nonzero weight are used."""
    if spectrum.basis is None:  # dropped to save memory: decomposed again (collective for a split weight)
        (spectrum,) = spectra([spectrum.held], keep_bytes=1 << 62)
    h, side, nonzero = spectrum.held, spectrum.side, weights != 0
    basis, weights = spectrum.basis[:, nonzero], weights[nonzero]
    split = h.split
    if split is None or split.axis != side:  # the basis acts on an axis this process holds whole: local
        m = h.matrix.detach().double()
        return (basis * weights) @ (basis.t() @ m) if side == 0 else (m @ basis) @ (basis * weights).t()
    whole = spectrum.whole if spectrum.whole is not None else gather(h.matrix, split).double()
    mine = basis.narrow(0, split.offset, split.length)  # this block's rows of the basis
    return (mine * weights) @ (basis.t() @ whole) if side == 0 else (whole @ basis) @ (mine * weights).t()


def direction(spectrum: Spectrum, skip: int = 0, rtol: float = 1e-6) -> Tensor:
    """The nuclear norm's gradient ``U Vᵀ`` (of the tail beyond the ``skip`` largest singular directions) on this
    process's block, in the held weight's shape and dtype; singular values below ``rtol`` times the largest are left out
    (:func:`~smooth_hf.training.penalties.spectral_direction`'s rule)."""
    values = spectrum.values
    keep = values > rtol * values.max().clamp_min(torch.finfo(torch.float64).tiny)
    keep[:skip] = False
    weights = torch.where(keep, 1.0 / torch.where(keep, values, 1.0), 0.0)
    w = spectrum.held.weight
    return _apply(spectrum, weights).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def project_block_(spectrum: Spectrum, rank: int) -> None:
    """Replace this process's block of the weight by its block of the best rank-``rank`` approximation, in place."""
    if rank >= len(spectrum.values):
        return
    weights = torch.zeros_like(spectrum.values)
    weights[:rank] = 1.0
    w = spectrum.held.weight
    w.copy_(_apply(spectrum, weights).reshape(w.shape).to(w.dtype))


# ---------------------------------------------------------------------------------------------- whitened
@dataclass
class WhitenedSpectrum:
    """A layer's whitened spectrum (the singular values of ``W S``) and what its projection needs."""

    held: Held
    values: Tensor
    left: Tensor  # whole: U Σ (out x k); split by rows: S V (d x d); split by columns: U (dim x dim)
    right: Tensor  # whole: R (k x d), the rows of whitened_decomposition; split by rows: Vᵀ S⁻¹; by columns: Uᵀ


def split_inputs_error(names: Sequence[str]) -> ValueError:
    """The refusal of whitened rank projection on layers FSDP2 splits along their input features (HF ``Conv1D``)."""
    return ValueError(
        f"whitened rank projection cannot act on {', '.join(names[:5])}{', ...' if len(names) > 5 else ''} under FSDP2: "
        "transformers' Conv1D stores its weight (in, out), so FSDP2 splits it along the input features, where the "
        "input Gram couples every block with every other. Drop --rank_projection_method whitened (rank projection "
        "with 'svd' works on these layers), leave these layers out (--penalty_exclude_modules), or train with DDP."
    )


@torch.no_grad()
def whitened_spectra(helds: Sequence[Held], grams: Sequence[Tensor], damping: float,
                     names: Sequence[str] | None = None) -> list[WhitenedSpectrum]:
    """Each layer's whitened spectrum for its input Gram (``grams[i]``, summed over every process's batches; an
    embedding's token counts) and the factors of its projection, computed on the blocks (see the module doc): the same
    values and projections as :func:`~smooth_hf.lowrank.whitening.whitened_decomposition` of the whole weight."""
    names = names or [f"layer {i}" for i in range(len(helds))]
    refused = [name for h, g, name in zip(helds, grams, names, strict=True)
               if h.split is not None and (h.split.axis == 1) != (g.dim() == 1)]
    if refused:
        raise split_inputs_error(refused)
    local: list[Tensor | None] = []
    roots: list[Tensor | None] = []  # split by columns (an embedding): sqrt(counts + λ) of this block's columns
    for h, g in zip(helds, grams, strict=True):
        m, root = h.matrix.detach().double(), None
        if h.split is None:
            local.append(None)
        elif h.split.axis == 0:  # Wᵀ W, in x in
            local.append(m.t() @ m)
        else:  # W diag(counts + λ) Wᵀ, dim x dim
            counts = g.to(m.device).double()
            scale = float(counts.mean())
            root = h.split.block_of((counts + (damping * scale if scale > 0 else damping)).sqrt()[None])[0]
            local.append((m * root) @ (m * root).t())
        roots.append(root)
    reduced = dict(_reduced(helds, local))
    out = []
    for i, (h, g) in enumerate(zip(helds, grams, strict=True)):
        if h.split is None:
            u, s, rows = whitened_decomposition(h.matrix, g, damping)
            out.append(WhitenedSpectrum(h, s, u * s, rows))
        elif h.split.axis == 0:
            gd, lam = damped(g.to(reduced[i].device), damping)
            eigenvalues, q = torch.linalg.eigh(gd)
            scale = eigenvalues.clamp_min(lam).sqrt()  # S = Q Λ^{1/2}: any square root gives the same projection
            root = q * scale
            s, v = _eigen(root.t() @ reduced[i] @ root)
            out.append(WhitenedSpectrum(h, s, root @ v, (v.t() / scale) @ q.t()))
        else:
            s, u = _eigen(reduced[i])
            out.append(WhitenedSpectrum(h, s, u, u.t()))
        reduced.pop(i, None)
    return out


@torch.no_grad()
def project_whitened_block_(spectrum: WhitenedSpectrum, rank: int) -> None:
    """Replace this process's block of the weight by its block of the best rank-``rank`` approximation for the inputs."""
    if rank >= len(spectrum.values):
        return
    h, left, right = spectrum.held, spectrum.left[:, :rank], spectrum.right[:rank]
    m = h.matrix.detach().double()
    if h.split is None:
        new = left @ right
    elif h.split.axis == 0:
        new = (m @ left) @ right
    else:
        new = left @ (right @ m)
    h.weight.copy_(new.reshape(h.weight.shape).to(h.weight.dtype))

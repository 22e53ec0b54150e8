"""One eigen-decomposition per layer gives both its spectrum and its truncated-SVD factors.

``compress`` needs every candidate's singular values (to choose ranks) and then the top singular
vectors of the layers it factorises. Two LAPACK SVDs per layer (``svdvals``, then ``svd``) cost
most of the compression time, and both are slow on the wide ``out x in*kh*kw`` matrices of
convolutions. Instead we take, in float64, the eigen-decomposition of the small Gram matrix
``G = M M^T`` (or ``M^T M`` when ``M`` is tall): its eigenvalues are the squared singular values
and its eigenvectors are ``M``'s left (right) singular vectors. The factors of any rank ``r`` then
cost one product ``U_r^T M``; no second decomposition is run.

Exactness. ``up @ down`` is ``U_r U_r^T M``, the projection of ``M`` on the span of its top ``r``
singular vectors: the best rank-``r`` approximation (Eckart-Young). Squaring loses what lies below
float64's resolution of ``s_max^2``, so singular values below ``sqrt(eps) * s_max`` (``eps`` of
float64) are only resolved to that level; they carry less than ``eps`` of the layer's energy, far
below the float32 resolution of the weights, and never change a rank choice. Each factor pair is scaled by the norm of
``U_r^T M``'s rows (the singular values, computed without squaring), so both factors carry
``sqrt(s_i)`` and a (numerically) zero direction gives zero factors rather than a division by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BASIS_CACHE_BYTES", "Decomposition", "decompose", "decompose_within", "factors_from"]

# Callers that decompose many layers before building factors (compress, rank projection) keep the singular
# vectors from the decomposition that gave the spectra, so the factors need no second one; beyond this many
# bytes of kept vectors they are dropped, and the layers past the cap are decomposed again when factorised.
BASIS_CACHE_BYTES = 1 << 30


@dataclass
class Decomposition:
    """The spectrum of a ``(out, n)`` matrix, and optionally the singular vectors of its short side.

    ``basis`` holds, as columns in the order of ``singular_values``, the left singular vectors
    (``out x out``) when ``out <= n`` and the right ones (``n x n``) otherwise; it is dropped
    (``None``) when memory is short, and :func:`factors_from` then decomposes again.
    """

    singular_values: Tensor  # float64, descending, length min(out, n)
    basis: Tensor | None
    left: bool  # basis holds left singular vectors (the matrix is wide or square)

    @property
    def basis_bytes(self) -> int:
        return 0 if self.basis is None else self.basis.numel() * self.basis.element_size()


def decompose(matrix: Tensor, keep_basis: bool = True) -> Decomposition:
    """Singular values (and the short side's singular vectors) of a 2-D ``matrix``, in float64."""
    if matrix.dim() != 2:
        raise ValueError(
            f"expected a 2-D matrix, got shape {tuple(matrix.shape)}: reshape the weight to (out, in*kh*kw) first "
            "(weight_matrix(module) does)"
        )
    with torch.no_grad():
        m = matrix.detach().double()
        left = m.shape[0] <= m.shape[1]
        gram = m @ m.t() if left else m.t() @ m
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        singular = eigenvalues.flip(0).clamp_min(0).sqrt()
        basis = eigenvectors.flip(1) if keep_basis else None
    return Decomposition(singular, basis, left)


def decompose_within(matrix: Tensor, cached_bytes: int) -> Decomposition:
    """:func:`decompose`, keeping the basis only if ``cached_bytes`` (bases already kept) plus it fit
    :data:`BASIS_CACHE_BYTES`; add the result's ``basis_bytes`` to the running total."""
    return decompose(matrix, keep_basis=cached_bytes + min(matrix.shape) ** 2 * 8 <= BASIS_CACHE_BYTES)


def factors_from(
    matrix: Tensor, decomposition: Decomposition | None, rank: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(up, down)``, ``up @ down`` the best rank-``rank`` approximation of ``matrix``, both carrying ``sqrt(s)``.

    ``decomposition`` is :func:`decompose` of this same ``matrix`` (``None``, or one without its basis,
    decomposes again). The factors are returned in ``dtype`` (default: the matrix's dtype).
    """
    full_rank = min(matrix.shape)
    if not 1 <= rank <= full_rank:
        raise ValueError(
            f"rank must be in [1, {full_rank}] for a {tuple(matrix.shape)} matrix, got {rank}: pass a rank in that range"
        )
    if decomposition is None or decomposition.basis is None:
        decomposition = decompose(matrix)
    with torch.no_grad():
        m = matrix.detach().double()
        vectors = decomposition.basis[:, :rank].to(m.device)
        # The other side's vectors times s: rows of U_r^T M (left) or columns of M V_r (right).
        projected = vectors.t() @ m if decomposition.left else (m @ vectors).t()  # (rank, other side)
        norms = projected.norm(dim=1)  # the singular values, without the squaring's loss of precision
        root = norms.sqrt()
        scaled = projected / torch.where(root > 0, root, 1.0)[:, None]  # a zero direction stays zero
        if decomposition.left:
            up, down = vectors * root, scaled
        else:
            up, down = scaled.t(), root[:, None] * vectors.t()
    dtype = dtype or matrix.dtype
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()

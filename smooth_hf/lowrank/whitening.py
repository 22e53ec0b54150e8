"""Whitened (activation-aware) truncation: the best rank-``r`` cut of a layer *for the inputs it sees*.

Plain truncated SVD minimises ``||W - W'||_F``; what matters is the error on the layer's inputs,
``||(W - W') X||_F``. Following SVD-LLM (truncation-aware data whitening):

1. forward hooks collect, for every targeted layer, the Gram matrix ``G = sum x x^T`` of its inputs
   over a few calibration batches (:func:`collect_input_grams`): the input features of a Linear / HF
   ``Conv1D``, the unfolded ``in*kh*kw`` patches of a Conv2d (``F.unfold`` with the layer's own
   stride, padding and dilation, so that ``W.reshape(out, -1) @ patch`` is exactly the conv output).
   Summed in float64, streaming: one ``d x d`` matrix per layer, never the activations;
2. ``G = S S^T``; SVD ``W S = U Σ V^T``; the rank-``r`` factors are ``up = U_r Σ_r^{1/2}`` and
   ``down = Σ_r^{1/2} V_r^T S^{-1}`` (:func:`whitened_decomposition`). Then
   ``||(W - up down) X||_F^2 = tr((W - W') G (W - W')^T) = ||W S - U_r Σ_r V_r^T||_F^2`` is exactly
   the tail ``sum_{i > r} Σ_i^2``: the singular values of ``W S`` are the output error on the
   calibration data, which is what the global budget then allocates on.

The global budget uses the same allocator as plain SVD, fed these spectra: it drops first the
components with the least *relative* output energy (``Σ_i^2 / sum_j Σ_j^2``) per parameter saved.
The absolute error (``Σ_i^2`` per parameter) was measured too, on all-MiniLM-L6-v2's sentence
embeddings, and kept less of them at the same budget: raw output energies are not comparable across
layers (a layer feeding a LayerNorm, a softmax or a residual stream matters on a different scale from
its own output's), while a relative error is at least free of each layer's scale. What a layer's error does to
the *model's* output is measured instead with ``rank_allocation="sensitivity"``
(:mod:`smooth_hf.lowrank.sensitivity`), which allocates better at the price of a few forward passes per layer.

Rank-deficient and ill-conditioned Grams (fewer samples than features, dead ReLU channels, constant
padding features) are the rule, not the exception, so ``G`` is always damped, ``G + λ I`` with
``λ = damping * mean(diag G)``. That matrix is positive definite, so its Cholesky factor exists and is
used (``S = L``); where round-off still defeats it (a tiny damping), a symmetric eigen-decomposition,
``S = Q Λ^{1/2}``, takes over. Any square root gives the same ``W'``. The damped factorisation is *exactly* the
minimiser of ``||(W - W') X||_F^2 + λ ||W - W'||_F^2`` over rank-``r`` ``W'`` (``G + λ I`` is the
Gram matrix of ``[X, sqrt(λ) I]``): the data decide every direction they excite, and in directions
they never excite only the ``λ`` term acts, which keeps ``W'`` close to ``W`` as plain SVD would. Larger
``damping`` moves the method towards plain SVD; ``damping -> 0`` towards the pure data optimum.

The factors are plain weights of the usual low-rank layers, so a whitened model saves, reloads and
renders its card like any other; no calibration data is needed to reload it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batches import batch_size, feed_batch, model_device, modes_kept
from .layers import factorise
from .sensitivity import marginal_losses, measure_sensitivity, probe_ranks
from .targeting import find_layers, layer_kind

if TYPE_CHECKING:
    from .config import LowRankConfig

__all__ = [
    "GramHook",
    "InputGrams",
    "Whitening",
    "calibrate",
    "collect_input_grams",
    "output_error",
    "refuse_unreached",
    "WhitenedDecomposition",
    "whiten",
    "whitened_decomposition",
    "whitened_factors",
]

# Input vectors multiplied at once (per chunk): bounds the extra memory of a conv hook
# (a large batch of large images unfolds into far more values than the activations themselves).
_CHUNK_VALUES = 1 << 24


# ---------------------------------------------------------------------------------------------- the math


def damping_of(gram: Tensor, damping: float) -> float:
    """``λ = damping * mean(diag G)``: relative to the mean diagonal so that the same ``damping`` means the same thing
    for every layer, whatever the scale of its inputs. A layer whose inputs were all zero gets ``λ = damping``, so
    that it falls back to plain SVD instead of dividing by zero."""
    scale = float(gram.diagonal().double().mean()) if gram.dim() == 2 else float(gram.double().mean())
    return damping * scale if scale > 0 else damping


def damped(gram: Tensor, damping: float) -> tuple[Tensor, float]:
    """``(G + λ I, λ)`` (symmetrised, float64; one new matrix), ``λ`` from :func:`damping_of`."""
    lam = damping_of(gram, damping)
    g = gram.double() + gram.double().t()
    g.mul_(0.5).diagonal().add_(lam)
    return g, lam


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD; LAPACK is much slower on wide matrices, so a wide one is decomposed through its transpose."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.t(), full_matrices=False)
    return uh.t(), s, v.t()


def _damped_root(g: Tensor, lam: float) -> tuple[Tensor, Tensor | None]:
    """A square root ``S`` of the damped Gram ``g`` (``S S^T = g``): ``(L, None)`` with ``L`` its Cholesky factor, or,
    where round-off defeats Cholesky (a tiny damping on a singular G), ``(Q Λ^{1/2}, Λ^{1/2})`` from a symmetric
    eigensolver (``g >= λI`` exactly; round-off can push the smallest eigenvalues of a singular G a little below λ)."""
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:  # lower triangular: an order of magnitude faster than an eigen-decomposition
        return chol, None
    eigenvalues, q = torch.linalg.eigh(g)
    root = eigenvalues.clamp_min(lam).sqrt()
    return q * root, root


def _small_side_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(singular values, vectors)`` of a matrix ``M`` from the symmetric Gram of its short side (``M M^T`` or
    ``M^T M``), descending: the eigenvalues are the squared singular values (as :mod:`~smooth_hf.lowrank.decomposition`
    takes them, for the same reasons: a symmetric eigensolver is several times faster than an SVD)."""
    eigenvalues, vectors = torch.linalg.eigh((gram + gram.t()) / 2)  # ascending
    return eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1)


def _inverse(s: Tensor) -> Tensor:
    """``1 / s``, a zero singular value giving zero (its direction then contributes nothing) instead of infinity."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)


def _gram_of_columns(weight: Tensor) -> Tensor:
    """``W^T W`` in float64, summed over row chunks: no float64 copy of a tall weight (an LM head) is ever whole."""
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for chunk in weight.split(max(1, _CHUNK_VALUES // max(1, weight.shape[1]))):
        chunk = chunk.double()
        gram.addmm_(chunk.t(), chunk)
    return gram


@dataclass
class WhitenedDecomposition:
    """``W = U diag(Σ) R``, ``Σ`` the singular values of ``W S`` (``S S^T = G + λ I``), in float64.

    ``U`` and ``R`` are kept up to ``max_rank`` (all a cut can use). A tall layer (``out > in``: an LM head, an MLP's
    up projection) keeps ``U = W P`` as ``P`` (``in x r``, much smaller than ``U``'s ``out x r``), which
    :meth:`left` multiplies out on demand, from the layer's weight.
    """

    singular_values: Tensor  # whole, descending
    rows: Tensor  # R[:max_rank]
    u: Tensor | None = None  # U[:, :max_rank]: wide or square layers, embeddings
    p: Tensor | None = None  # tall layers: U = W P

    def left(self, matrix: Tensor, rank: int) -> Tensor:
        """``U_r`` (float64); ``matrix`` is the layer's ``(out, in)`` weight, read when ``U`` is kept as ``P``."""
        if self.u is not None:
            return self.u[:, :rank]
        return matrix.detach().to(self.p.device).double() @ self.p[:, :rank]

    def factors(self, matrix: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(up, down) = (U_r Σ_r^{1/2}, Σ_r^{1/2} R_r)``: singular values split evenly, as for plain SVD."""
        return whitened_factors(self.left(matrix, rank), self.singular_values, self.rows, rank, dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The parts, by name, as :meth:`from_tensors` reads them back (to set aside on disk)."""
        kept = {"s": self.singular_values, "rows": self.rows}
        return {**kept, "u": self.u} if self.u is not None else {**kept, "p": self.p}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> WhitenedDecomposition:
        return cls(tensors["s"], tensors["rows"], tensors.get("u"), tensors.get("p"))


def whiten(matrix: Tensor, gram: Tensor, damping: float, max_rank: int | None = None) -> WhitenedDecomposition:
    """The whitened decomposition of the ``(out, d)`` weight ``matrix`` for inputs of Gram matrix ``gram`` (``(d, d)``;
    of an embedding, the ``(vocab,)`` token counts), damped by ``damping`` (``> 0``, relative to its mean diagonal).

    No SVD of ``W S`` is run: its spectrum comes from the eigen-decomposition of its short side's Gram. A wide or square
    weight (``out <= d``: attention projections, an MLP's down projection) needs no square root of ``G`` at all:
    ``(W S)(W S)^T = W G W^T + λ W W^T``, its eigenvectors are ``U``, and ``R = Σ^{-1} U^T W`` (then ``U_r U_r^T W`` is
    the best rank-``r`` cut). A tall one uses ``S``'s Cholesky factor ``L``: ``(W S)^T (W S) = L^T (W^T W) L = V Σ^2
    V^T``, ``R = V^T L^{-1}`` and ``U = W P`` with ``P = L V Σ^{-1}``, so that ``U`` is never built whole.
    ``max_rank`` keeps ``U`` (or ``P``) and ``R`` only up to that rank; the spectrum stays whole.
    """
    if not damping > 0:
        raise ValueError(
            f"damping must be > 0, got {damping!r}: it keeps the whitening invertible when the calibration inputs "
            "do not span every input direction (e.g. whitening_damping=0.01)"
        )
    if gram.dim() == 1:  # an embedding: one-hot inputs, a diagonal Gram (token counts), S = diag(sqrt(count + λ))
        if gram.shape != (matrix.shape[1],):
            raise ValueError(f"the token counts cover {len(gram)} tokens but the table has {matrix.shape[1]}: collect "
                             "them on the same layer (collect_input_grams)")
        counts = gram.to(matrix.device).double()
        root = (counts + damping_of(counts, damping)).sqrt()
        u, s, vh = _svd(matrix.detach().double() * root)
        return WhitenedDecomposition(s, vh[:max_rank] / root, u=u[:, :max_rank])
    if gram.shape != (matrix.shape[1], matrix.shape[1]):
        raise ValueError(
            f"the Gram matrix is {tuple(gram.shape)} but the weight has {matrix.shape[1]} input features: collect it "
            "on the same layer (collect_input_grams)"
        )
    gram = gram.to(matrix.device)
    out, features = matrix.shape
    if out <= features:
        weight = matrix.detach().double()
        lam = damping_of(gram, damping)
        s, u = _small_side_eigh(weight @ gram.double() @ weight.t() + lam * (weight @ weight.t()))
        u = u[:, :max_rank]
        return WhitenedDecomposition(s, (u.t() @ weight) * _inverse(s[: u.shape[1]])[:, None], u=u)
    g, lam = damped(gram, damping)
    root, scale = _damped_root(g, lam)
    del g
    s, v = _small_side_eigh(root.t() @ _gram_of_columns(matrix.detach()) @ root)
    v = v[:, :max_rank]
    if scale is None:  # S = L: R = V^T L^{-1}
        rows = torch.linalg.solve_triangular(root, v.t(), upper=False, left=False)
    else:  # S = Q Λ^{1/2}: R = V^T Λ^{-1/2} Q^T
        rows = (v.t() / scale) @ (root / scale).t()
    return WhitenedDecomposition(s, rows, p=(root @ v) * _inverse(s[: v.shape[1]]))


def whitened_decomposition(
    matrix: Tensor, gram: Tensor, damping: float, max_rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, Σ, R)`` with ``matrix = U diag(Σ) R`` (``U`` and ``R`` up to ``max_rank``): :func:`whiten`, with ``U``
    built whole.

    ``R = V^T S^{-1}``, so the best rank-``r`` replacement for the inputs is ``U_r diag(Σ_r) R_r``
    (``up = U_r Σ_r^{1/2}``, ``down = Σ_r^{1/2} R_r``), and its error on them is ``sum_{i > r} Σ_i^2``
    (plus ``λ ||W - W'||_F^2``: see the module docstring). Everything in float64.
    """
    decomposition = whiten(matrix, gram, damping, max_rank)
    return decomposition.left(matrix, len(decomposition.rows)), decomposition.singular_values, decomposition.rows


def whitened_factors(u: Tensor, s: Tensor, rows: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(up, down) = (U_r Σ_r^{1/2}, Σ_r^{1/2} R_r)``: singular values split evenly, as for plain SVD."""
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(dtype).contiguous(), (root[:, None] * rows[:rank]).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------- collecting


@dataclass
class InputGrams:
    """Per-layer Gram matrices of the inputs seen on a calibration set, and what that set was.

    Computed once (:func:`collect_input_grams`), it can be passed to :func:`smooth_hf.compress` as
    ``calibration_data`` any number of times, e.g. for several budgets on copies of the same model
    (layers are matched by module name).
    """

    grams: dict[str, Tensor]  # module name -> (d, d) float64 sum of x x^T (an embedding: (vocab,) token counts)
    rows: dict[str, int]  # module name -> number of input vectors (tokens, patches) summed
    samples: int  # calibration samples (first dimension of each batch)
    batches: int
    unreached: list[str] = field(default_factory=list)  # layers no batch called (an error only if they are cut)
    # rank_allocation="sensitivity": the first calibration samples, kept to measure each layer's effect on the
    # model's output, and the loss curves measured on them (filled on first use, reused for later budgets).
    kept_batches: list[Any] = field(default_factory=list)
    sensitivity: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    sensitivity_damping: float | None = None  # the whitening_damping the curves were measured with


def _input_chunks(module: nn.Module, x: Tensor) -> Iterator[Tensor]:
    """The ``(n, d)`` input vectors whose product with ``weight_matrix(module)^T`` is the layer's output, in chunks
    of at most about ``_CHUNK_VALUES`` values (a conv's patches are unfolded a few images at a time)."""
    if layer_kind(module) != "conv2d":
        vectors = x.reshape(-1, x.shape[-1])
        yield from vectors.split(max(1, _CHUNK_VALUES // vectors.shape[1]))
        return
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        # Pad exactly as Conv2d.forward does for non-zero modes and for "same" (possibly asymmetric), then unfold
        # with no padding: the patches are then the ones the convolution multiplies.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    positions = 1
    for size, pad, k, stride, dilation in zip(
        x.shape[-2:], padding, module.kernel_size, module.stride, module.dilation, strict=True
    ):
        positions *= (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    per_image = max(1, positions * x.shape[1] * module.kernel_size[0] * module.kernel_size[1])
    for images in x.split(max(1, _CHUNK_VALUES // per_image)):
        patches = F.unfold(images, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        yield patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N * L, in*kh*kw), channel-major like W


class GramHook:
    """A forward pre-hook summing ``x x^T`` of one layer's inputs into a float64 matrix (of an embedding's one-hot
    inputs, the diagonal only: the token counts)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.gram: Tensor | None = None
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, nn.Embedding):
            ids = args[0].detach().reshape(-1)
            counts = torch.bincount(ids, minlength=module.num_embeddings).double()
            self.gram = counts if self.gram is None else self.gram + counts
            self.rows += ids.numel()
            return
        for chunk in _input_chunks(module, args[0].detach()):
            if self.gram is None:
                self.gram = torch.zeros(chunk.shape[1], chunk.shape[1], dtype=torch.float64, device=chunk.device)
            # Each chunk's product in the activations' precision (at least float32: much faster than float64 on
            # CPUs, and its rounding sits far below the damping), summed over chunks and batches in float64.
            chunk = chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()
            self.gram.add_(chunk.t() @ chunk)  # in place, promoted: no float64 copy of the product
            self.rows += chunk.shape[0]


def _check_finite_batch(batch: Any, index: int) -> None:
    values = batch.items() if isinstance(batch, Mapping) else enumerate(batch if isinstance(batch, list | tuple) else [batch])
    for key, value in values:
        if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"calibration batch {index} has NaN or Inf values in {key!r}; nothing was compressed. Remove or "
                "fix those samples."
            )


def _first_samples(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (every tensor whose first dimension is the batch's size is sliced)."""
    size = batch_size(batch)
    if size <= n:
        return batch

    def cut(value: Any) -> Any:
        return value[:n] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size else value

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def collect_input_grams(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    keep_samples: int = 0,
    device: torch.device | None = None,
) -> InputGrams:
    """Run ``model`` on ``batches`` (eval mode, no gradients) and sum ``x x^T`` of every layer's inputs.

    Args:
        layers: module name -> Linear / HF Conv1D / Conv2d of ``model``.
        batches: tensors, ``(inputs, labels)`` pairs, ``{"pixel_values": ...}`` dicts (timm and HF vision
            models) or dicts of keyword inputs (``model(**batch)``; label keys are dropped), as a DataLoader
            yields them for training.

    The model's weights, buffers and train/eval flags are the same afterwards, error or not. The first
    ``keep_samples`` samples are also kept, as given, in ``kept_batches`` (for the sensitivity allocation). Batches
    go to ``device`` (default: where the model's first parameter is).

    Layers that no batch reached (not called by the forward, or whose weight the parent reads directly,
    like ``nn.MultiheadAttention.out_proj``) are listed in ``unreached``; cutting one of them is an error.

    Raises:
        ValueError: no batches, a batch the model cannot take, or NaN/Inf in a batch or in a layer's inputs.
    """
    hooks = {layer_name: GramHook(module) for layer_name, module in layers.items()}
    handles = [module.register_forward_pre_hook(hooks[n]) for n, module in layers.items()]
    device = model_device(model) if device is None else device
    samples = count = 0
    kept: list[Any] = []
    try:
        # Eval mode: no dropout, BatchNorm statistics untouched; every module's flag is restored after.
        with modes_kept(model), torch.no_grad():
            model.eval()
            for count, batch in enumerate(batches, start=1):  # noqa: B007  (count is read after the loop)
                _check_finite_batch(batch, count - 1)
                try:
                    feed_batch(model, batch, device)
                except Exception as err:
                    raise ValueError(
                        f"the model could not run on calibration batch {count - 1} ({type(err).__name__}: {err}). "
                        "Give batches as the model takes them: dicts of keyword inputs for transformers models "
                        "(input_ids, attention_mask, ... as model(**batch) takes them), {'pixel_values': images} or "
                        "image tensors for image models."
                    ) from err
                if samples < keep_samples:
                    kept.append(_first_samples(batch, keep_samples - samples))
                samples += batch_size(batch)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError(
            "calibration_data gave no batches: pass a few hundred training samples (e.g. a DataLoader over a "
            "slice of the training split)"
        )
    reached = {n: hook for n, hook in hooks.items() if hook.gram is not None and hook.rows > 0}
    bad = [n for n, hook in reached.items() if not torch.isfinite(hook.gram).all()]
    if bad:
        raise ValueError(
            f"the inputs of layer(s) {', '.join(bad[:5])} became NaN or Inf on the calibration data (overflow in "
            "the model?); nothing was compressed. Check the model on these batches, or use method='svd'."
        )
    return InputGrams(
        grams={n: hook.gram for n, hook in reached.items()},
        rows={n: hook.rows for n, hook in reached.items()},
        samples=samples,
        batches=count,
        unreached=[n for n in hooks if n not in reached],
        kept_batches=kept,
    )


# ---------------------------------------------------------------------------------------------- for compress


def calibrate(model: nn.Module, config: LowRankConfig, batches: Iterable[Any]) -> InputGrams:
    """The input Gram matrices of the layers ``config`` targets (a :class:`LowRankConfig`), over ``batches``.

    Compute them once and pass the result as ``compress(..., calibration_data=grams)`` to compress several
    copies of the model (e.g. at several budgets) without running the calibration forward passes again.
    """
    layers = {
        name: module
        for name, module in find_layers(model, config.target_modules, config.exclude_modules, config.skip_first_last,
                                        config.factorise_embeddings)
        if getattr(module, "groups", 1) == 1  # grouped convs stay dense: no statistics needed
    }
    keep = config.sensitivity_samples if config.rank_allocation == "sensitivity" else 0
    return collect_input_grams(model, layers, batches, keep_samples=keep)


class Whitening:
    """What ``compress`` asks of the whitened method: each layer's spectrum, then its factors at a rank.

    A layer's decomposition is computed once and kept until :meth:`release` (``compress`` calls it once every
    factor is built; ``keep_slower_dense`` may build a layer at several ranks), so the spectrum that allocates the
    ranks and the factors come from the same SVD.
    """

    def __init__(self, grams: InputGrams, damping: float) -> None:
        self.grams = grams
        self.damping = damping
        self._decompositions: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def prepare(
        cls, model: nn.Module, config: LowRankConfig, calibration_data: Iterable[Any] | InputGrams | None
    ) -> Whitening | None:
        """``None`` for ``method="svd"``; for ``"whitened"``, the statistics (collected here unless given)."""
        cls.check_data(config, calibration_data)
        if config.method != "whitened":
            return None
        grams = calibration_data if isinstance(calibration_data, InputGrams) else calibrate(model, config, calibration_data)
        return cls(grams, config.whitening_damping)

    @staticmethod
    def check_data(config: LowRankConfig, calibration_data: Iterable[Any] | InputGrams | None) -> None:
        """Calibration data given exactly when the method uses them, or a clear error."""
        if config.method != "whitened":
            if calibration_data is not None:
                raise ValueError(
                    f"calibration_data is only used by method='whitened', but the config has method={config.method!r}: "
                    "set LowRankConfig(method='whitened', ...) to use it, or drop calibration_data."
                )
            return
        if calibration_data is None:
            raise ValueError(
                "method='whitened' needs calibration data: pass compress(model, config, calibration_data=batches) with "
                "a few hundred training samples in the batches the trainer uses (dicts for model(**batch), "
                "{'pixel_values': ...} or image tensors), or use method='svd' (no data)."
            )

    def spectrum(self, name: str, matrix: Tensor) -> Tensor:
        """Singular values of ``W S`` (float64, descending, on the CPU): the layer's output error profile."""
        if name in self.grams.unreached:
            refuse_unreached(self.grams.unreached)
        if name not in self.grams.grams:
            raise ValueError(
                f"the calibration statistics have no layer {name!r}: they were collected on another model or with "
                "other targets. Collect them on this model with these targets (or pass the batches themselves)."
            )
        decomposition = whitened_decomposition(matrix, self.grams.grams[name], self.damping)
        self._decompositions[name] = decomposition
        return decomposition[1].cpu()

    def sensitivity(self, model: nn.Module, layers: Mapping[str, tuple[nn.Module, int, int]]) -> dict[str, np.ndarray]:
        """Per layer, the model-output loss added by dropping each whitened component (after :meth:`spectrum`).

        ``layers``: name -> ``(module, cost_per_rank, dense_params)``. Loss curves are measured on the kept
        calibration samples (:func:`smooth_hf.lowrank.sensitivity.measure_sensitivity`) for the layers the
        statistics have none for yet, and kept in them, so compressing copies at other budgets reuses them.
        """
        grams = self.grams
        if not grams.kept_batches:
            raise ValueError(
                "rank_allocation='sensitivity' needs calibration samples kept to measure each layer's effect, and "
                "these statistics have none: collect them with calibrate(model, config, batches) where config has "
                "rank_allocation='sensitivity', or pass the batches themselves as calibration_data."
            )
        if grams.sensitivity_damping != self.damping:  # curves of another whitening are not these layers' curves
            grams.sensitivity, grams.sensitivity_damping = {}, self.damping
        ranks = {}
        for name, (_, cost, dense) in layers.items():
            if name not in grams.sensitivity:
                ranks[name] = probe_ranks(len(self._decompositions[name][1]), cost, dense)

        def truncated(name: str, rank: int) -> nn.Module:
            u, s, rows = self._decompositions[name]
            module = layers[name][0]
            return factorise(module, rank, factors=whitened_factors(u, s, rows, rank, module.weight.dtype))

        todo = {name: layers[name][0] for name in ranks}
        grams.sensitivity.update(measure_sensitivity(model, todo, truncated, ranks, grams.kept_batches))
        return {
            name: marginal_losses(grams.sensitivity[name], len(spectrum), spectrum.cpu().numpy())
            for name in layers
            for spectrum in [self._decompositions[name][1]]
        }

    def factors(self, name: str, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(up, down)`` of the rank-``rank`` whitened truncation of layer ``name`` (after :meth:`spectrum`)."""
        u, s, rows = self._decompositions[name]
        return whitened_factors(u, s, rows, rank, dtype)

    def release(self) -> None:
        """Free every layer's decomposition (float64, the size of the dense weights): no factor is built after."""
        self._decompositions.clear()


def output_error(matrix: Tensor, approximation: Tensor, gram: Tensor) -> float:
    """``||(W - W') X||_F^2`` computed from the Gram matrix ``X X^T`` alone (for reports and tests; a 1-D ``gram``
    is the diagonal of an embedding's, the token counts)."""
    diff = (matrix - approximation).detach().double()
    if gram.dim() == 1:
        return float((diff**2 * gram.double()).sum())
    return float(torch.einsum("ij,jk,ik->", diff, gram.double(), diff))


def refuse_unreached(names: list[str]) -> None:
    """Refuse the targeted layers ``names`` that no calibration input reached (nothing to whiten them with)."""
    if names:
        raise ValueError(
            f"no calibration input reached {len(names)} targeted layer(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): the model's forward does not use them on these batches. "
            "Exclude them (exclude_modules) or compress with method='svd'."
        )

"""Why parameters cannot be factorised: the advice of compress()'s errors and warnings.

A parameter budget that cannot be reached has different causes that call for different fixes:
layers left out by ``target_modules`` (widen it), the rank floor (lower ``min_rank``), or weights
that no Linear / Conv2d / Conv1D layer holds -- embedding tables, mixture-of-experts weights fused
into 3-D tensors (Mixtral's ``MixtralExperts``), ``nn.Linear`` subclasses whose forward is not a
plain linear map. Only the first two can be fixed with options; the advice says which applies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from .base import LowRankLayer
from .targeting import is_plain_embedding, layer_kind

__all__ = ["budget_advice", "describe", "unfactorisable_weights"]

_TOP = 3


def _reason(module: nn.Module, ndim: int) -> str:
    if is_plain_embedding(module):
        return "embedding tables: factorised only with LowRankConfig(factorise_embeddings=True)"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding tables that rescale or pool their rows: not a plain lookup"
    if isinstance(module, nn.Linear):
        weight = getattr(module, "weight", None)
        if weight is not None and not weight.is_floating_point():
            return "quantised nn.Linear (integer weights)"
        return "nn.Linear subclass whose forward is not a plain x @ W.T + b"
    if ndim >= 3 and not isinstance(module, nn.modules.conv._ConvNd):
        return f"{ndim}-D fused tensors such as mixture-of-experts weights, not Linear layers"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "convolutions other than nn.Conv2d"
    return "not a Linear, Conv2d or Conv1D layer"


def unfactorisable_weights(model: nn.Module, embeddings: bool = False) -> list[tuple[str, str, int]]:
    """``(module class, reason, parameters)`` of the weight tensors no supported layer holds, largest first.

    Only tensors with two or more dimensions count (matrices that a user may expect to be cut); biases
    and norm scales are small and never factorised anywhere. Low-rank layers are skipped.
    """
    totals: dict[tuple[str, str], int] = defaultdict(int)
    seen: set[int] = set()
    inside_low_rank: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLayer):
            inside_low_rank.update(f"{name}.{c}" if name else c for c, _ in module.named_modules() if c)
            continue
        if name in inside_low_rank or layer_kind(module, embeddings) is not None:
            continue
        for param in module.parameters(recurse=False):
            if param.dim() < 2 or id(param) in seen:
                continue
            seen.add(id(param))
            totals[(type(module).__name__, _reason(module, param.dim()))] += param.numel()
    return sorted(((cls, reason, n) for (cls, reason), n in totals.items()), key=lambda row: -row[2])


def budget_advice(
    model: nn.Module, untargeted_params: int, untargeted_layers: int, min_rank: int, rank_multiple: int,
    embeddings: bool = False,
) -> str:
    """Sentences saying what can raise the reachable reduction and what cannot (``""`` when nothing applies)."""
    params = sum(p.numel() for p in model.parameters())
    hints: list[str] = []
    if untargeted_layers:
        hints.append(
            f"Or widen target_modules / exclude fewer modules: {untargeted_layers} factorisable layers holding "
            f"{untargeted_params:,} parameters are not targeted."
        )
    if min_rank > 1 or rank_multiple > 1:
        hints.append(f"Or lower min_rank ({min_rank}) or rank_multiple ({rank_multiple}).")
    blocked = unfactorisable_weights(model, embeddings)
    if blocked:
        total = sum(n for _, _, n in blocked)
        hints.append(
            f"{total:,} parameters ({total / params:.1%} of the model) are in weights smooth_hf cannot factorise: "
            f"{describe(blocked[:_TOP])}{'; ...' if len(blocked) > _TOP else ''}."
        )
    return " ".join(hints)


def describe(rows: Iterable[tuple[str, str, int]]) -> str:
    """One line per (class, reason, parameters) row, for a warning."""
    return "; ".join(f"{cls}: {n:,} parameters ({reason})" for cls, reason, n in rows)

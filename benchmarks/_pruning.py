"""Pruning baselines without fine-tuning, with the same budget semantics as low-rank compression.

The paper compares its smooth low-rank compression with standard pruning (and reports that pruning
also works better on smooth models). These are those baselines, measured the same way:

* the **budget** is a fraction of *all* the model's parameters, counted by
  :func:`smooth_hf.lowrank.count_parameters`, as for compression (unique parameters: weights, biases,
  norm scales; buffers do not count). ``fraction=0.7`` removes at least 70% of that count -- exactly
  ``ceil(0.7 * total)`` parameters for magnitude pruning, the fewest whole filters that reach it
  for filter pruning;
* "removed" means **set to zero** (the tensors keep their shapes; a sparse or physically slimmed
  model is a storage question, not an accuracy one);
* the **layers** are those compression targets (:func:`smooth_hf.lowrank.targeting.find_layers`, same
  ``target_modules`` / ``exclude_modules`` / ``skip_first_last``), each weight read in
  ``(out, in, *kernel)`` layout (:func:`smooth_hf.core.weights.out_in_weight`, so HF ``Conv1D`` works);
  a tied weight (GPT-2's ``lm_head``) is left alone, as compression leaves it dense.

Two methods, both in place under ``torch.no_grad()``, both returning a report dict:

* :func:`magnitude_prune` -- global unstructured magnitude pruning: the ``n`` weights with the
  smallest ``|w|`` across all targeted layers are zeroed (ties broken by layer order, then position,
  so the result is deterministic). Biases are not pruned.
* :func:`filter_prune` -- L1-norm filter pruning (Li et al., 2017, "Pruning Filters for Efficient
  ConvNets"): whole output filters (rows of ``W.reshape(out, -1)``) with the smallest L1 norm are
  zeroed, together with their bias entry, so the layer's output channel is exactly zero.
  ``scope="global"`` (the default, used by the benchmarks) ranks every filter of every targeted layer
  together by its L1 norm *divided by the filter size* (``in*kh*kw``: the mean ``|w|``), so filters of
  layers with different fan-in compare fairly, like the global low-rank allocation spreads the cut
  over layers. ``scope="layer"`` is Li et al.'s uniform variant: every layer loses the same fraction
  of its filters (its smallest-L1 ones), the smallest fraction that reaches the budget.
  ``min_filters`` (default 1) filters are always kept in every layer, so no layer is wiped out.

  Zeroing a filter is not quite Li et al.'s physical removal when a BatchNorm follows: the zero
  channel becomes the constant ``beta - gamma * mean / sqrt(var + eps)`` after it, rather than
  vanishing. Nothing else in the network is changed (no folding, no recalibration): it is the
  plain no-fine-tuning baseline.

Both raise ``ValueError`` (and leave the model untouched) when the budget cannot be reached with the
targeted layers, when a fraction is outside ``[0, 1)``, or when a targeted weight has NaN/Inf.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from smooth_hf.core.weights import check_real_weight, out_in_weight
from smooth_hf.lowrank.report import count_parameters
from smooth_hf.lowrank.targeting import PatternSpec, find_layers

__all__ = ["FILTER_SCOPES", "filter_prune", "magnitude_prune", "sparsity"]

FILTER_SCOPES = ("global", "layer")


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be a number in [0, 1) (0.7 = 70% fewer parameters), got {fraction!r}")
    return float(fraction)


def _target_weights(
    model: nn.Module, target_modules: PatternSpec, exclude_modules: PatternSpec, skip_first_last: bool
) -> list[tuple[str, nn.Module, Tensor]]:
    """``(name, module, weight in (out, in, ...) layout)`` for every targeted, untied, finite weight."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = {pid for pid, n in counts.items() if n > 1}
    layers = []
    for name, module in find_layers(model, target_modules, exclude_modules, skip_first_last):
        if any(id(p) in tied for p in module.parameters()):
            continue
        weight = out_in_weight(module)
        check_real_weight(name, weight, "pruned")
        layers.append((name, module, weight))
    return layers


def _budget(method: str, fraction: float, total: int, most: int, detail: str) -> int:
    """Parameters to zero for ``fraction`` of ``total``; an error, before any change, if above ``most``."""
    # At least the budget, immune to float noise (0.7 * 1000 is 700.0000000000001).
    needed = max(0, math.ceil(fraction * total - 1e-9))
    if needed > most:
        raise ValueError(
            f"{method}: fraction={fraction} asks to zero {needed:,} of the model's {total:,} parameters, but the "
            f"targeted layers can give at most {most:,} ({most / total:.1%} of the model; {detail}). Lower the "
            "fraction, or widen target_modules / exclude fewer modules."
        )
    return needed


def sparsity(model: nn.Module) -> float:
    """Fraction of the model's parameters (``count_parameters`` rule) that are exactly zero."""
    total = count_parameters(model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return zeros / total if total else 0.0


def _report(method: str, fraction: float, model: nn.Module, total: int, rows: list[dict[str, Any]], **extra) -> dict:
    removed = sum(r["removed"] for r in rows)
    return {
        "method": method,
        "fraction": fraction,
        "params_total": total,
        "params_removed": removed,
        "reduction": removed / total if total else 0.0,
        "zero_fraction": sparsity(model),
        **extra,
        "layers": rows,
    }


@torch.no_grad()
def magnitude_prune(
    model: nn.Module,
    fraction: float,
    target_modules: PatternSpec = None,
    exclude_modules: PatternSpec = None,
    skip_first_last: bool = False,
) -> dict[str, Any]:
    """Zero the ``ceil(fraction * count_parameters(model))`` smallest-``|w|`` targeted weights, globally.

    Returns a report: ``params_total``, ``params_removed`` (entries set to zero by this call, weights
    that were already zero included when they are among the smallest), ``reduction``
    (= removed / total), ``zero_fraction`` (zeros in the whole model afterwards) and one row per
    layer (``name``, ``shape``, ``numel``, ``removed``).

    Raises:
        ValueError: ``fraction`` not in ``[0, 1)``; the targeted weights hold fewer entries than the
            budget; a targeted weight has NaN/Inf. The model is untouched in every case.
    """
    fraction = _check_fraction(fraction)
    layers = _target_weights(model, target_modules, exclude_modules, skip_first_last)
    total = count_parameters(model)
    needed = _budget("magnitude_prune", fraction, total, sum(w.numel() for _, _, w in layers), "all their weights")
    rows = [{"name": n, "shape": list(w.shape), "numel": w.numel(), "removed": 0} for n, _, w in layers]
    if needed:
        scores = torch.cat([w.detach().abs().flatten().to("cpu", torch.float64) for _, _, w in layers])
        order = torch.sort(scores, stable=True).indices[:needed]  # stable: ties go in layer/position order
        offsets = torch.tensor([0] + [w.numel() for _, _, w in layers]).cumsum(0)
        layer_of = torch.searchsorted(offsets, order, right=True) - 1
        for i, (_, _, weight) in enumerate(layers):
            local = order[layer_of == i] - offsets[i]
            if local.numel():
                # reshape() of the (out, in, ...) view: a view for Conv/Linear and for Conv1D's .t(), so
                # index_fill_ writes through to the parameter.
                flat = weight.reshape(-1) if weight.is_contiguous() else None
                if flat is not None:
                    flat.index_fill_(0, local.to(weight.device), 0.0)
                else:
                    mask = torch.zeros(weight.numel(), dtype=torch.bool)
                    mask[local] = True
                    weight.masked_fill_(mask.view(weight.shape).to(weight.device), 0.0)
                rows[i]["removed"] = int(local.numel())
    return _report("magnitude", fraction, model, total, rows)


def _filter_plan_global(sizes, norms, counts_out, needed, min_filters) -> list[int]:
    """How many filters each layer loses: global ranking by L1 norm / filter size."""
    candidates = []  # (normalised L1, layer, filter) for every filter that may go
    for i, (size, norm) in enumerate(zip(sizes, norms, strict=True)):
        keep = torch.argsort(norm, descending=True, stable=True)[:min_filters]
        removable = torch.ones(len(norm), dtype=torch.bool)
        removable[keep] = False
        for j in torch.nonzero(removable).flatten().tolist():
            candidates.append((float(norm[j]) / size, i, j))
    candidates.sort()
    plan = [[] for _ in sizes]
    removed = 0
    for _, i, j in candidates:
        if removed >= needed:
            break
        plan[i].append(j)
        removed += sizes[i] + counts_out[i]
    return plan


def _filter_plan_layer(sizes, norms, counts_out, needed, min_filters) -> list[int]:
    """Every layer loses the same fraction ``q`` of its filters (floor), the smallest ``q`` that reaches the budget."""
    outs = [len(n) for n in norms]

    def counts(q: float) -> list[int]:
        return [min(math.floor(q * out + 1e-9), out - min_filters) for out in outs]

    def removed(k: list[int]) -> int:
        return sum(kk * (s + b) for kk, s, b in zip(k, sizes, counts_out, strict=True))

    # The removed count only changes at q = j / out: try those in increasing order.
    for q in sorted({j / out for out in outs for j in range(out + 1)}):
        k = counts(q)
        if removed(k) >= needed:
            break
    return [torch.argsort(norm, stable=True)[:kk].tolist() for norm, kk in zip(norms, k, strict=True)]


@torch.no_grad()
def filter_prune(
    model: nn.Module,
    fraction: float,
    target_modules: PatternSpec = None,
    exclude_modules: PatternSpec = None,
    skip_first_last: bool = False,
    scope: str = "global",
    min_filters: int = 1,
) -> dict[str, Any]:
    """Zero whole output filters (and their bias) with the smallest L1 norm until ``fraction`` is reached.

    ``scope="global"``: one ranking of all filters by L1 norm / filter size; ``scope="layer"``: the
    same fraction of filters in every layer (see the module doc). Whole filters are removed, so the
    reduction reached is the smallest one ``>= fraction`` (reported as ``reduction``). Every layer
    keeps at least ``min_filters`` filters.

    Returns the report of :func:`magnitude_prune` plus ``scope`` and, per layer, ``filters`` and
    ``filters_removed``.

    Raises:
        ValueError: bad ``fraction`` / ``scope`` / ``min_filters``; the budget needs more than all
            removable filters; a targeted weight has NaN/Inf. The model is untouched in every case.
    """
    fraction = _check_fraction(fraction)
    if scope not in FILTER_SCOPES:
        raise ValueError(f"scope must be one of {FILTER_SCOPES}, got {scope!r}")
    if isinstance(min_filters, bool) or not isinstance(min_filters, int) or min_filters < 0:
        raise ValueError(f"min_filters must be an integer >= 0, got {min_filters!r}")
    layers = _target_weights(model, target_modules, exclude_modules, skip_first_last)
    total = count_parameters(model)
    sizes = [w[0].numel() for _, _, w in layers]  # weights per filter: in * kh * kw
    bias_per_filter = [1 if getattr(m, "bias", None) is not None else 0 for _, m, _ in layers]
    most = sum(max(0, w.shape[0] - min_filters) * (s + b) for (_, _, w), s, b in zip(layers, sizes, bias_per_filter, strict=True))
    needed = _budget("filter_prune", fraction, total, most, f"every filter but {min_filters} per layer")
    norms = [w.detach().reshape(w.shape[0], -1).abs().sum(1).to("cpu", torch.float64) for _, _, w in layers]
    plan_fn = _filter_plan_global if scope == "global" else _filter_plan_layer
    plan = plan_fn(sizes, norms, bias_per_filter, needed, min_filters) if needed else [[] for _ in layers]
    rows = []
    for (name, module, weight), filters, size, b in zip(layers, plan, sizes, bias_per_filter, strict=True):
        if filters:
            index = torch.tensor(filters, device=weight.device)
            weight.index_fill_(0, index, 0.0)  # dim 0 of the (out, in, ...) view: writes through for Conv1D too
            if b:
                module.bias.index_fill_(0, index, 0.0)
        rows.append({"name": name, "shape": list(weight.shape), "numel": weight.numel(),
                     "filters": weight.shape[0], "filters_removed": len(filters), "removed": len(filters) * (size + b)})
    return _report("filter_l1", fraction, model, total, rows, scope=scope)

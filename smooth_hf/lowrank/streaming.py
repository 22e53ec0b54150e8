"""Block-streamed compression: billion-parameter models on one machine, one block of statistics at a time.

Compressing a model whole holds every targeted layer's statistics at once (a float64 Gram matrix per layer for
``method="whitened"``, every decomposition until the factors are built): several times the model's own memory.
For a model made of repeated blocks (:mod:`smooth_hf.lowrank.blocks`), :func:`compress_streamed` instead works as
the sequential pipelines of SVD-LLM, GPTQ and llm-compressor do:

1. **Spectra, block by block.** One pass of the model over the calibration batches records what the first block
   receives, and the Gram matrices of the targeted layers outside the blocks (an LM head, a pooler; an embedding's
   token counts). Then each block runs alone on those inputs, its outputs becoming the next block's inputs: only
   that block's layers are hooked, with one Gram per distinct input tensor (q, k and v read the same hidden states;
   so do an MLP's gate and up projections). Each layer is decomposed, its spectrum kept, its singular vectors set
   aside (:class:`~smooth_hf.lowrank.offload.DecompositionStore`: memory, then disk), and the block's Grams freed.
   ``method="svd"`` needs no data: each layer's weight is decomposed in turn.
2. **Ranks, over the whole model**: the same global allocation, on the same spectra, as the whole-model path
   (:func:`~smooth_hf.lowrank.planning.decide_ranks`), so both choose the same ranks.
3. **The cut, block by block**: each layer's factors are built from its set-aside vectors and replace it at once,
   freeing its dense weight. With ``LowRankConfig(sequential=True)`` the cut takes its statistics again, this time
   on the outputs of the blocks already cut, so that each block is cut for the inputs it will really see (the ranks
   stay those of step 2).

Memory: the model, the calibration activations of one block, one block's Grams and one layer's decomposition.
``device="cuda"`` keeps the model in CPU memory and moves one block at a time to the accelerator (the first pass
streams every module through it with accelerate's ``cpu_offload``).

Every check that can refuse the compression (NaN weights, an unreachable budget, calibration data the model cannot
take) runs in steps 1-2, before any layer is replaced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.devices import on_device, streamed_through
from ..core.machine import release_freed_memory
from ..core.weights import weight_matrix
from .blocks import BlockInputs, Blocks
from .config import LowRankConfig
from .cost import LayerCall
from .decomposition import Decomposition, decompose
from .layers import factorise
from .offload import DecompositionStore
from .planning import Candidate, Plan, decide_ranks, finish, record, warn_if_nothing_factorised
from .replay import no_cache
from .report import LayerReport, count_parameters
from .sensitivity import marginal_losses, measure_sensitivity, probe_ranks
from .structure import replace_module
from .whitening import GramHook, WhitenedDecomposition, collect_input_grams, refuse_unreached, whiten

__all__ = ["compress_streamed"]

logger = logging.getLogger(__name__)


def compress_streamed(
    model: nn.Module,
    config: LowRankConfig,
    blocks: Blocks,
    rows: dict[str, LayerReport],
    candidates: list[Candidate],
    calls: dict[str, LayerCall] | None,
    example_inputs: Any,
    calibration_data: Iterable[Any] | None,
    device: torch.device | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Plan:
    """Cut ``candidates`` block by block (the module docstring), replacing the layers of ``model`` in place.

    ``rows`` and ``candidates`` come from :func:`~smooth_hf.lowrank.planning.classify`; the returned plan holds the
    saved config and the report's rows (its ``replacements`` are empty: every layer is already in place).
    """
    params_before = count_parameters(model)
    groups: dict[int | None, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(blocks.owner(c.name), []).append(c)
    inside = [groups.get(i, []) for i in range(len(blocks.modules))]
    outside = groups.get(None, [])
    whitened = config.method == "whitened"
    samples = None
    batches = list(calibration_data) if whitened else []  # iterated again by a sequential cut
    # The vectors wait in float32, unless the model itself is float64 (see smooth_hf.lowrank.offload).
    exact = any(c.module.weight.dtype == torch.float64 for c in candidates)
    with DecompositionStore(offload_folder, dtype=torch.float64 if exact else torch.float32) as store:
        if whitened:
            inputs, samples, kept = _whitened_spectra(model, config, blocks, inside, outside, batches, device, store)
        else:
            inputs, kept = None, []
            for i, group in enumerate(inside):
                with on_device(blocks.modules[i], device):
                    for c in group:
                        _svd_spectrum(c, store)
            for c in outside:
                with on_device(c.module, device):
                    _svd_spectrum(c, store)
        config, ranks = decide_ranks(model, config, rows, candidates, calls)
        kept.clear()
        if whitened and config.sequential:
            _cut_sequentially(model, config, blocks, inside, outside, ranks, rows, inputs, batches, device)
        else:
            for i, group in enumerate(inside):
                with on_device(blocks.modules[i], device):
                    for c in group:
                        _cut_from_store(model, c, ranks[c.name], rows, store, whitened)
            for c in outside:  # where the layer is: its replacement must be there too
                _cut_from_store(model, c, ranks[c.name], rows, store, whitened)
    factorised = [c for c in candidates if ranks.get(c.name) is not None]
    if not factorised:
        warn_if_nothing_factorised(model, config, len(candidates))
    params_after = count_parameters(model)
    expected = params_before - sum(r.params_before - r.params_after for r in rows.values())
    if params_after != expected:
        raise RuntimeError(
            f"compress: the model has {params_after:,} parameters after the cut but {expected:,} were planned, so a "
            "replaced layer shares parameters in a way compress did not detect. Keep the shared layers dense "
            "(exclude_modules) and please report the model."
        )
    return finish(config, params_before, rows, samples, calls, example_inputs)


# ---------------------------------------------------------------------------------------------- step 1: spectra


def _svd_spectrum(c: Candidate, store: DecompositionStore) -> None:
    """The weight's spectrum; its short side's singular vectors, up to the largest rank that pays, set aside."""
    d = decompose(weight_matrix(c.module).detach())
    c.decomposition = Decomposition(d.singular_values.cpu(), None, d.left)
    store.put(c.name, {"basis": d.basis[:, : c.largest_paying_rank]})
    release_freed_memory()


def _whitened_spectra(
    model: nn.Module,
    config: LowRankConfig,
    blocks: Blocks,
    inside: list[list[Candidate]],
    outside: list[Candidate],
    calibration_data: Iterable[Any],
    device: torch.device | None,
    store: DecompositionStore,
) -> tuple[BlockInputs | None, int, list[Any]]:
    """Step 1 for ``method="whitened"``: every candidate's whitened spectrum, its decomposition set aside.

    Returns the calibration inputs of the first block (for a sequential cut), the number of calibration samples,
    and the samples kept for the sensitivity allocation.
    """
    sensitivity = config.rank_allocation == "sensitivity"
    keep = config.sensitivity_samples if sensitivity else 0
    # No key/value cache: a block run again on the captured arguments must not append to the first run's cache.
    with no_cache(model), streamed_through(model, device), BlockInputs.capture(blocks) as captured:
        # One pass of the whole model: the first block's inputs, and the statistics of the layers outside the blocks.
        grams = collect_input_grams(model, {c.name: c.module for c in outside}, calibration_data, keep_samples=keep,
                                    device=device)
    first_inputs = BlockInputs(list(captured.calls)) if config.sequential else None  # a sequential cut starts over
    for i, group in enumerate(inside):
        with on_device(blocks.modules[i], device):
            layer_grams = _block_grams(blocks.modules[i], {c.name: c.module for c in group}, captured, keep_outputs=True)
            held = {}  # the sensitivity measurement truncates the block's layers with their decompositions
            for c in group:  # each Gram is let go once the last layer reading it is decomposed
                decomposition = _whitened(c, layer_grams.pop(c.name), config)
                if sensitivity:
                    held[c.name] = decomposition
                else:
                    _set_aside(c, decomposition, store)
            if sensitivity:
                _measure(model, group, held, grams.kept_batches)
        for c in group:
            if c.name in held:
                _set_aside(c, held.pop(c.name), store)
    refuse_unreached([c.name for c in outside if c.name in grams.unreached])
    for c in outside:  # (sensitivity is refused with a device: it runs the whole model where it is)
        with on_device(c.module, device):
            decomposition = _whitened(c, grams.grams.pop(c.name), config)
        if sensitivity:
            _measure(model, [c], {c.name: decomposition}, grams.kept_batches)
        _set_aside(c, decomposition, store)
    return first_inputs, grams.samples, grams.kept_batches


def _whitened(c: Candidate, gram: Tensor, config: LowRankConfig) -> WhitenedDecomposition:
    """The whitened decomposition of the candidate's layer, its vectors up to the largest rank that pays."""
    decomposition = whiten(weight_matrix(c.module), gram, config.whitening_damping, max_rank=c.largest_paying_rank)
    c.whitened_spectrum = decomposition.singular_values.cpu()
    return decomposition


def _set_aside(c: Candidate, decomposition: WhitenedDecomposition, store: DecompositionStore) -> None:
    store.put(c.name, decomposition.tensors())
    release_freed_memory()  # the decomposition's float64 temporaries, each the size of the layer


def _measure(model: nn.Module, group: list[Candidate], decompositions: dict, kept: list[Any]) -> None:
    """``rank_allocation="sensitivity"``: each layer's effect on the model's output, measured while its
    decomposition is at hand (the model runs whole on the kept samples; the blocks before the layer are replayed)."""
    if not group:
        return
    if not kept:
        raise ValueError("rank_allocation='sensitivity' needs calibration samples: give compress(..., calibration_data=...)")

    def truncated(name: str, rank: int) -> nn.Module:
        module = next(c.module for c in group if c.name == name)
        return factorise(module, rank, factors=decompositions[name].factors(weight_matrix(module), rank,
                                                                              module.weight.dtype))

    ranks = {c.name: probe_ranks(c.full_rank, c.cost_per_rank, c.dense_params) for c in group}
    curves = measure_sensitivity(model, {c.name: c.module for c in group}, truncated, ranks, kept)
    for c in group:
        c.marginal_losses = marginal_losses(curves[c.name], c.full_rank, c.spectrum.numpy())


def _block_grams(
    block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, keep_outputs: bool
) -> dict[str, Tensor]:
    """The input Gram of each of ``layers`` (inside ``block``) over every batch of ``inputs``, one per distinct input.

    Layers that read the very same tensor in the first batch (q, k and v; gate and up) share one Gram matrix, summed
    once; a later batch where they do not is an error (the model's structure changed between batches).
    """
    hooks = {name: GramHook(module) for name, module in layers.items()}
    shares: dict[str, str] = {}  # layer -> the layer whose Gram it shares
    this_batch: dict[int, tuple[str, Tensor]] = {}  # id(input) -> (layer that summed it, the input, held alive)
    first = [True]

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            owner = this_batch.get(id(x))
            shared = owner is not None and owner[1] is x
            if first[0] and shared:
                shares[name] = owner[0]
            if shared != (name in shares) or (shared and shares[name] != owner[0]):
                raise RuntimeError(f"{name} read another layer's input in one batch and not in another: compress the "
                                   "model whole (compress(..., streaming=False))")
            if not shared:
                this_batch[id(x)] = (name, x)
                hooks[name](module, args)

        return hook

    def next_batch() -> None:
        if this_batch:
            first[0] = False
        this_batch.clear()

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            inputs.run(block, keep_outputs=keep_outputs, before_each=next_batch)
    finally:
        for handle in handles:
            handle.remove()
        this_batch.clear()
    refuse_unreached([name for name in layers if hooks[shares.get(name, name)].gram is None])
    return {name: hooks[shares.get(name, name)].gram for name in layers}


# ---------------------------------------------------------------------------------------------- step 3: the cut


def _cut(model: nn.Module, c: Candidate, rank: int, factors: tuple[Tensor, Tensor] | None,
         decomposition: Decomposition | None, rows: dict[str, LayerReport]) -> None:
    """Replace the candidate's layer by its rank-``rank`` factorisation, and let its dense weight go."""
    layer = factorise(c.module, rank, factors=factors, decomposition=decomposition)
    replace_module(model, c.name, layer)
    record(rows[c.name], c, rank, layer)
    c.module = None  # the candidate list must not keep the dense weight alive
    release_freed_memory()


def _cut_from_store(model: nn.Module, c: Candidate, rank: int | None, rows: dict[str, LayerReport],
                    store: DecompositionStore, whitened: bool) -> None:
    tensors = store.pop(c.name)  # popped whatever the rank: what a dense layer set aside is freed too
    if rank is None:
        return
    if whitened:
        decomposition = WhitenedDecomposition.from_tensors(tensors)
        factors = decomposition.factors(weight_matrix(c.module), rank, c.module.weight.dtype)
        _cut(model, c, rank, tuple(f.to(c.module.weight.device) for f in factors), None, rows)
    else:
        basis = tensors["basis"].to(c.module.weight.device)
        decomposition = Decomposition(c.decomposition.singular_values, basis, c.decomposition.left)
        _cut(model, c, rank, None, decomposition, rows)


def _cut_sequentially(
    model: nn.Module,
    config: LowRankConfig,
    blocks: Blocks,
    inside: list[list[Candidate]],
    outside: list[Candidate],
    ranks: dict[str, int | None],
    rows: dict[str, LayerReport],
    inputs: BlockInputs,
    batches: list[Any],
    device: torch.device | None,
) -> None:
    """``sequential=True``: each block's statistics taken again on the outputs of the blocks already cut, then the
    layers outside the blocks on the cut model's own activations (one more pass of the model)."""
    for i, group in enumerate(inside):
        cut = [c for c in group if ranks[c.name] is not None]
        with on_device(blocks.modules[i], device):
            grams = _block_grams(blocks.modules[i], {c.name: c.module for c in cut}, inputs, keep_outputs=False)
            for c in cut:
                decomposition = _whitened(c, grams.pop(c.name), config)
                rank = ranks[c.name]
                _cut(model, c, rank, decomposition.factors(weight_matrix(c.module), rank, c.module.weight.dtype),
                     None, rows)
            with torch.no_grad():
                inputs.run(blocks.modules[i])  # the cut block's outputs: what the next block will see
    inputs.calls.clear()
    cut = [c for c in outside if ranks[c.name] is not None]
    if cut:
        with no_cache(model), streamed_through(model, device):
            grams = collect_input_grams(model, {c.name: c.module for c in cut}, batches, device=device)
        for c in cut:
            decomposition = _whitened(c, grams.grams.pop(c.name), config)
            _cut(model, c, ranks[c.name],
                 decomposition.factors(weight_matrix(c.module), ranks[c.name], c.module.weight.dtype), None, rows)

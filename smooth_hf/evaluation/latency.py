"""How much faster a compressed model runs than its dense self: median latency, eager and ``torch.compile``, measured
in one process, the variants interleaved.

Every round runs every variant in turn (the order rotated from round to round), so a slow spell of a shared machine
hits all of them, and a speed-up is a ratio of two medians measured side by side. Each round of a variant lasts at
least ``min_round_ms`` (enough calls for the clock and Python's overhead to vanish). Time with the thread settings
and batch sizes you deploy with: on a CPU the speed-up of a factorised layer depends on both.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..lowrank.cost import ExampleInputs, run_model

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "RUNTIME_NAMES", "fold_batchnorm", "interleaved_medians", "make_runner", "speedups"]

# How a model can be run, and the name each has in tables. For CNNs: "eager_cl" is eager PyTorch with the model and
# the images in channels_last memory format (faster convolutions on CPUs: smooth_hf.core.memory_format);
# "eager_fused" is that with every BatchNorm folded into the convolution before it (fold_batchnorm), as an eager
# deployment does: BatchNorm is memory traffic that no cut removes, a larger share of a cut model's time.
RUNTIME_NAMES = {"eager": "eager", "eager_cl": "eager channels_last", "eager_fused": "eager, BN folded",
                 "compile": "compiled"}
RUNTIMES = tuple(RUNTIME_NAMES)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with each BatchNorm that follows a convolution folded into its weights.

    :func:`torch.fx.experimental.optimization.fuse` on a ``torch.fx`` trace of the copy: it folds every ``nn.Conv2d ->
    nn.BatchNorm2d`` (and ``nn.Linear -> nn.BatchNorm1d``) pair whose first output feeds only the BatchNorm; a
    factorised convolution's second factor takes the BatchNorm after it. The result is an ``fx.GraphModule`` for
    inference (not a model to train, or to save with its config); its outputs equal the model's to float round-off.
    A BatchNorm it cannot fold stays, with a warning that counts them: one after something other than a convolution,
    or a subclass the trace goes into (timm's ``BatchNormAct2d``, in EfficientNets and MobileNets).

    Raises:
        ValueError: ``torch.fx`` cannot trace the model (most transformers models); time or deploy it another way.
    """
    from torch import fx
    from torch.fx.experimental.optimization import fuse

    copied = copy.deepcopy(model).eval()
    try:
        traced = fx.symbolic_trace(copied)
    except Exception as err:  # tracing fails on control flow that depends on the inputs
        raise ValueError(
            f"cannot fold the BatchNorms of {type(model).__name__}: torch.fx could not trace it ({err}). Time or serve "
            "it with the eager_cl runtime, or compile it (torch.compile folds BatchNorms itself)."
        ) from err
    folded = fuse(traced, inplace=True, no_trace=True)
    modules = dict(folded.named_modules())
    left = sum(
        1 for node in folded.graph.nodes
        if (node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm))
        or (node.op == "call_function" and node.target in (torch.nn.functional.batch_norm, torch.batch_norm))
    )
    if left:
        logger.warning(
            "fold_batchnorm: %d BatchNorm(s) of %s could not be folded (not an nn.BatchNorm right after the "
            "convolution or linear layer whose only use it is, e.g. timm's BatchNormAct2d); they run as before.",
            left, type(model).__name__,
        )
    return folded


def make_runner(runtime: str, model: nn.Module, inputs: ExampleInputs) -> Callable[[], Any]:
    """A zero-argument callable running ``model`` on ``inputs`` through ``runtime`` (:data:`RUNTIMES`)."""
    if runtime == "eager":
        return lambda: run_model(model, inputs)
    if runtime in ("eager_cl", "eager_fused"):
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise ValueError(f"the {runtime} runtime runs image models (4-D image batches) in channels_last")
        converted = fold_batchnorm(model) if runtime == "eager_fused" else copy.deepcopy(model)
        converted = converted.to(memory_format=torch.channels_last)
        images = inputs.contiguous(memory_format=torch.channels_last)
        return lambda: run_model(converted, images)
    if runtime == "compile":
        compiled = torch.compile(model, dynamic=False)
        return lambda: run_model(compiled, inputs)
    raise ValueError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], rounds: int = 7, min_round_ms: float = 200.0,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each runner; every round runs every runner in turn (order rotated)."""
    calls = {}
    for key, run in runners.items():
        for _ in range(warmup):
            run()
        start = time.perf_counter()
        run()
        once_ms = 1000 * (time.perf_counter() - start)
        calls[key] = max(1, round(min_round_ms / max(once_ms, 1e-3)))
    samples: dict[str, list[float]] = {key: [] for key in runners}
    keys = list(runners)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            start = time.perf_counter()
            for _ in range(calls[key]):
                runners[key]()
            samples[key].append(1000 * (time.perf_counter() - start) / calls[key])
    return {key: statistics.median(values) for key, values in samples.items()}


def speedups(
    models: Mapping[str, nn.Module],
    inputs: Callable[[int], ExampleInputs],
    batch_sizes: tuple[int, ...] = (1, 64),
    runtimes: tuple[str, ...] = ("eager", "compile"),
    reference: str = "dense",
    **timing: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {"eager_b64": {"ms": ..., "speedup": ...}, ...}}``: each model's latency and its ratio to
    ``models[reference]`` at each batch size and runtime, timed together (:func:`interleaved_medians`, whose
    settings ``timing`` passes on). ``inputs(batch)`` gives the inputs of one call at that batch size.

    The models are put in eval mode; timing runs under ``torch.inference_mode``. A runtime that cannot run these
    models (``eager_fused`` on a model ``torch.fx`` cannot trace) is left out, with a warning that says why.
    """
    if reference not in models:
        raise ValueError(f"speedups needs the reference model {reference!r} among the models ({sorted(models)})")
    for model in models.values():
        model.eval()
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for batch in batch_sizes:
        x = inputs(batch)
        for runtime in runtimes:
            try:
                runners = {name: make_runner(runtime, model, x) for name, model in models.items()}
            except ValueError as err:  # after minutes of training, a missing column beats a lost job
                logger.warning("speedups: the %s runtime is left out: %s", runtime, err)
                continue
            with torch.inference_mode():
                medians = interleaved_medians(runners, **timing)
            for name, ms in medians.items():
                out[name][f"{runtime}_b{batch}"] = {"ms": ms, "speedup": medians[reference] / ms}
            del runners
            if runtime == "compile":
                torch._dynamo.reset()  # frees the compiled graphs before the next batch size
    return out

"""Keep a layer dense where factorising it does not pay in time, on the device the model runs on.

Fewer multiply-adds is not less time: a factorised layer runs two kernels instead of one, the thin
intermediate is bound by memory traffic, and small layers are dominated by launch overhead. So
``LowRankConfig(keep_slower_dense=True)`` times each layer ``compress`` would factorise, dense and at
its chosen rank, on the layer's own device and dtype with the input shape it sees in one forward
pass on ``example_inputs``, and keeps it dense when the factorised form is not faster. Those layers
then leave the allocation, and the budget is allocated again over the others, until every
factorised layer is faster than its dense form (:func:`drop_slower_layers`).

Timings are noisy: each is the median of ``torch.utils.benchmark.Timer(...).adaptive_autorange``, which warms
up, runs blocks of calls long enough for the clock's resolution (a small layer on a GPU runs in microseconds),
synchronises the accelerator around each block, and stops once the spread of the blocks is small or the time
allowed is spent. The Timer runs with the caller's ``torch.get_num_threads()`` (its own default is one thread):
time with the thread settings and the batch size you deploy with. ``compress(..., layer_timer=...)`` replaces the timer
(:func:`median_latency`, eager PyTorch) with one for the runtime you deploy on, e.g.
:func:`onnxruntime_latency`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from ..core.optional import require
from .cost import LayerCall

__all__ = [
    "LayerTimer",
    "default_rank_multiple",
    "drop_slower_layers",
    "median_latency",
    "median_seconds",
    "onnxruntime_latency",
    "random_input",
]

# (module, input) -> seconds per forward pass. compress() calls it on the dense layer and on its replacement.
LayerTimer = Callable[[nn.Module, Tensor], float]

_SPREAD = 0.1  # stop once the blocks' interquartile range is within this fraction of their median
_MAX_SECONDS = 0.5  # per measurement at most: large layers at large batches add up


def default_rank_multiple(device: torch.device | str) -> int:
    """The rank granularity that suits ``device``: 8 on CUDA, 1 elsewhere.

    GPU matrix units (tensor cores) run half-precision products at full speed only when the inner
    dimension is a multiple of 8, and cuBLAS / cuDNN pad or fall back to slower kernels otherwise.
    CPU kernels have no such requirement, so there rounding would spend parameters for a gain that is
    not established (``benchmarks/speed_size.py --rank_multiple`` measures it).
    """
    return 8 if torch.device(device).type == "cuda" else 1


def random_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A normal tensor of ``shape`` for timing, from a private generator (the global RNG state is left alone)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def median_seconds(call: Callable[[], object], max_seconds: float = _MAX_SECONDS) -> float:
    """Median seconds per ``call()``: ``torch.utils.benchmark.Timer(...).adaptive_autorange`` at the current
    ``torch.get_num_threads()``, stopping once the blocks agree within 10% or after about ``max_seconds``."""
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(threshold=_SPREAD, max_run_time=max_seconds).median


def median_latency(module: nn.Module, x: Tensor, max_seconds: float = _MAX_SECONDS) -> float:
    """Median seconds per ``module(x)`` in eager PyTorch, under inference mode: the default ``layer_timer``.

    :func:`median_seconds`: blocks of calls lasting a few milliseconds, the device synchronised around each, so GPU
    kernels are timed to completion rather than to their launch; a slow layer stops after about ``max_seconds``.
    """
    with torch.inference_mode():
        return median_seconds(lambda: module(x), max_seconds)


def onnxruntime_latency(module: nn.Module, x: Tensor, max_seconds: float = _MAX_SECONDS) -> float:
    """Median seconds per call of ``module`` exported alone to ONNX and run by ONNX Runtime on the CPU.

    A ``layer_timer`` for models deployed through ONNX Runtime, whose kernels rank layers differently
    from eager PyTorch: ``compress(..., layer_timer=onnxruntime_latency)``. Uses as many intra-op
    threads as torch does (``torch.get_num_threads()``). The layer is timed alone, without the fusions
    (conv + BatchNorm + activation) the whole graph gets. Needs ``pip install 'smooth_hf[deploy]'``.

    The layer goes through the TorchScript-based exporter (``dynamo=False``), not the torch.export-based one that
    whole models should use: for a single Linear or Conv2d both write the same ONNX operators (Gemm, MatMul + Add,
    Conv), and the legacy one exports in milliseconds where the other takes a large fraction of a second, for each
    of the many (layer, rank) pairs ``compress`` times.
    """
    onnxruntime = require("onnxruntime", "onnxruntime_latency")
    require("onnx", "onnxruntime_latency")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # the deprecation of that exporter, said on every call, is about whole models (see above)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        path = os.path.join(folder, "layer.onnx")
        torch.onnx.export(module, (x,), path, input_names=["x"], output_names=["y"], dynamo=False)
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.detach().cpu().numpy()}
    return median_seconds(lambda: session.run(None, feed), max_seconds)


def drop_slower_layers(
    choose_ranks: Callable[[frozenset[str]], dict[str, int | None]],
    layers: Mapping[str, nn.Module],
    build: Callable[[str, int], nn.Module],
    calls: Mapping[str, LayerCall],
    timer: LayerTimer = median_latency,
) -> tuple[dict[str, int | None], dict[str, tuple[float, float]]]:
    """Allocate, time, keep the slower layers dense, allocate again without them, until none is slower.

    Args:
        choose_ranks: the allocation, given the names of the layers to keep dense; returns
            ``name -> rank`` (``None`` = dense). It raises ``ValueError`` when the budget cannot be met
            without those layers (the message then says which layers were kept dense for speed).
        layers: the dense layers, by name.
        build: the factorised replacement of layer ``name`` at ``rank``.
        calls: what a forward pass on the example inputs showed of each layer (its input shape and dtype);
            a layer that did not run is not timed and stays as allocated.
        timer: seconds per forward pass of a module on an input; each layer is timed once dense and once
            per rank it is given, on a random input of its own shape, dtype and device.

    Returns:
        the final ranks, and ``name -> (dense seconds, factorised seconds)`` of the layers kept dense
        because the factorised form was not faster. Each round keeps at least one more layer dense, so
        the loop ends after at most one round per layer.
    """
    measured: dict[tuple[str, int | None], float | None] = {}

    def latency(name: str, rank: int | None) -> float | None:
        if (name, rank) not in measured:
            call, dense = calls.get(name), layers[name]
            if call is None or call.input_shape is None or not call.input_dtype.is_floating_point:
                measured[name, rank] = None
            else:
                x = random_input(call.input_shape, call.input_dtype, dense.weight.device)
                measured[name, rank] = timer(dense if rank is None else build(name, rank), x)
        return measured[name, rank]

    slower: dict[str, tuple[float, float]] = {}
    while True:
        try:
            ranks = choose_ranks(frozenset(slower))
        except ValueError as err:
            if not slower:
                raise
            raise ValueError(
                f"{err} This is after keeping {len(slower)} layer(s) dense because factorising them was not faster "
                f"on this device ({', '.join(sorted(slower))}); lower the reduction, or set keep_slower_dense=False "
                "to factorise them anyway."
            ) from None
        found = {}
        for name, rank in ranks.items():
            if rank is None or name in slower:
                continue
            dense, factorised = latency(name, None), latency(name, rank)
            if dense is not None and factorised is not None and factorised >= dense:
                found[name] = (dense, factorised)
        if not found:
            return ranks, slower
        slower.update(found)

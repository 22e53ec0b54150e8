"""Repeated blocks: the decoder (or encoder) layers a transformer is made of, found generically, run one at a time.

Block-streamed compression (:mod:`smooth_hf.lowrank.streaming`) never holds more than one block's statistics: it
captures what the first block receives, then runs the blocks one after the other on those inputs, each block's
outputs becoming the next one's inputs, as GPTQ-style sequential pipelines (SVD-LLM, llm-compressor) do.

* :func:`find_blocks`: the ``nn.ModuleList`` of same-class modules that holds most of the targeted weights
  (``model.layers`` of Llama and Qwen, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT and ViT), with no
  architecture named anywhere. A model without one (a CNN, an encoder-decoder whose weights are split between two
  stacks) is compressed whole.
* :class:`BlockInputs`: while the model runs on the calibration batches, :meth:`BlockInputs.capture` records the
  positional and keyword arguments the first block is called with, and checks that the blocks are chained (block
  ``i + 1`` reads block ``i``'s output and nothing else differs between them). :meth:`BlockInputs.run` then runs
  one block on every batch and replaces the hidden states by its outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BlockInputs", "Blocks", "find_blocks", "primary_tensor"]

# A list of blocks must hold at least this share of the targeted weights for streaming to pay (a small encoder's
# blocks hold about half of it when its word embeddings are cut too).
MIN_SHARE = 0.25


@dataclass
class Blocks:
    """The repeated blocks of a model: ``names[i]`` is the qualified name of ``modules[i]``."""

    names: list[str]
    modules: list[nn.Module]

    def owner(self, layer_name: str) -> int | None:
        """The index of the block that contains the layer ``layer_name`` (``None``: outside every block)."""
        for index, name in enumerate(self.names):
            if layer_name.startswith(name + "."):
                return index
        return None


def find_blocks(model: nn.Module, layer_sizes: Mapping[str, int]) -> Blocks | None:
    """The ``nn.ModuleList`` of at least two modules of one class, each holding a targeted layer, that holds the most
    targeted weights (``layer_sizes``: layer name -> weights), if that is at least :data:`MIN_SHARE` of them."""
    total = sum(layer_sizes.values())
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        names = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
        sizes = [sum(size for layer, size in layer_sizes.items() if layer.startswith(block + ".")) for block in names]
        if min(sizes) == 0:
            continue
        if sum(sizes) > best_size:  # an outer list (the decoder layers) holds more than one nested in a block
            best, best_size = Blocks(names, list(module)), sum(sizes)
    return best if best is not None and best_size >= MIN_SHARE * total else None


def primary_tensor(output: Any) -> Tensor | None:
    """The hidden states a block returns: the output itself, or the first element of its tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _hidden_states(args: tuple, kwargs: dict) -> Tensor | None:
    if args:
        return args[0] if isinstance(args[0], Tensor) else None
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def _with_hidden_states(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _same_arguments(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """The arguments two blocks were called with, hidden states aside, are the same objects (a mask, positions)."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    return (len(args_a) == len(args_b) and all(x is y for x, y in zip(args_a[1:], args_b[1:], strict=True))
            and kw_a.keys() == kw_b.keys()
            and all(kw_a[k] is kw_b[k] for k in kw_a if k != "hidden_states"))


class StreamingUnsupported(Exception):  # noqa: N818 - a decision, not an error the user sees
    """The model's blocks are not a plain chain: it is compressed whole instead (the reason is logged)."""


@dataclass
class BlockInputs:
    """What the first block received for each calibration batch, and then what the next block will receive.

    ``calls[b] = (args, kwargs)`` of batch ``b``; only the hidden states change from block to block.
    """

    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def capture(cls, blocks: Blocks) -> Iterator[BlockInputs]:
        """Within the block, every forward pass of the model records the first block's arguments (one call a batch).

        On exit, raises StreamingUnsupported when a block was not called exactly once per forward pass, or not on
        the previous block's output with otherwise the same arguments.
        """
        captured = cls()
        n = len(blocks.modules)
        calls = [0] * n
        first: list[tuple[tuple, dict] | None] = [None]  # the latest call of block 0, whose arguments the others share
        outputs: list[Tensor | None] = [None] * n  # this forward pass's block outputs
        problems: list[str] = []

        def before(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls[index] += 1
                if index == 0:
                    first[0] = (args, kwargs)
                    outputs[:] = [None] * n
                    captured.calls.append((tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}))
                elif outputs[index - 1] is None or _hidden_states(args, kwargs) is not outputs[index - 1]:
                    problems.append(f"block {index} does not read block {index - 1}'s output")
                elif not _same_arguments(first[0], (args, kwargs)):
                    problems.append(f"block {index} gets other arguments than block 0")

            return hook

        def after(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                outputs[index] = primary_tensor(output)

            return hook

        handles = []
        try:
            for index, block in enumerate(blocks.modules):
                handles.append(block.register_forward_pre_hook(before(index), with_kwargs=True))
                handles.append(block.register_forward_hook(after(index), with_kwargs=True))
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            first[0], outputs[:] = None, [None] * n  # no activation kept alive by the closures
        if len(set(calls)) != 1 or calls[0] != len(captured.calls):
            problems.append(f"the blocks were called {sorted(set(calls))} times in {len(captured.calls)} forward passes")
        if problems:
            raise StreamingUnsupported(problems[0])

    def run(self, block: nn.Module, keep_outputs: bool = True, before_each: Callable[[], None] | None = None) -> None:
        """Run ``block`` on every batch (``before_each()`` first); with ``keep_outputs``, its outputs become the
        hidden states the next block is run on."""
        for b, (args, kwargs) in enumerate(self.calls):
            if before_each is not None:
                before_each()
            output = primary_tensor(block(*args, **kwargs))
            if keep_outputs:
                if output is None:
                    raise StreamingUnsupported(f"{type(block).__name__} returned no tensor")
                self.calls[b] = _with_hidden_states(args, kwargs, output)

    def to(self, device: torch.device) -> BlockInputs:
        """The same calls with every tensor moved to ``device``."""
        return BlockInputs([(tuple(_moved(a, device) for a in args), {k: _moved(v, device) for k, v in kw.items()})
                            for args, kw in self.calls])


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value

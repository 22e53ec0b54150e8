"""Re-running only what a change can reach: blocks that finished before a changed layer are replayed.

The sensitivity allocation truncates one layer at a time and re-runs the model on the same batches.
Every block that ran before that layer computes exactly what it computed in the dense run, so
:class:`PrefixReplay` records those blocks' outputs once, in the dense run, and while a layer is
changed makes each of them return its recorded output instead of running. On a 6-block encoder this
skips, on average, half of the blocks of every measurement.

A module is replayed for a changed layer ``L`` only when all of these hold, in every recorded batch:

- it is a child of one of ``L``'s ancestors, not itself an ancestor (so ``L`` is never inside it);
- it has submodules (a block or sublayer): leaves are cheap to recompute, and recording every leaf's
  output would keep one activation per layer in memory;
- the dense run called it exactly once, and that call returned before ``L``'s first call began, so
  nothing it computed can depend on ``L``;
- it returned a tensor, or a tuple or list of tensors and ``None``.

Outputs are cloned when recorded and when replayed: an in-place op downstream (``ReLU(inplace=True)``)
must change neither the record nor the next replay. :meth:`PrefixReplay.verified` checks each set of
replayed modules once against the dense output and falls back to running everything when it differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["PrefixReplay", "no_cache"]


def _replayable_output(output: Any) -> bool:
    if isinstance(output, Tensor):
        return True
    return isinstance(output, (tuple, list)) and all(v is None or isinstance(v, Tensor) for v in output)


def _clone(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.clone()
    return type(output)(v.clone() if isinstance(v, Tensor) else v for v in output)


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a", "a.b"]``: the names of the modules that contain ``name``, outermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


class PrefixReplay:
    """Records a dense run's block outputs, then replays the blocks a changed layer cannot affect.

    Usage: ``outputs = replay.record(batches, run)`` once (``run(batch)`` is the model's forward on one
    batch), then for each changed layer ``with replay.installed(replay.for_layer(name)):`` around forward
    passes, setting ``replay.batch`` to the index of the batch being run.
    """

    def __init__(self, model: nn.Module, targets: Iterable[str]) -> None:
        self.model = model
        self.targets = set(targets)  # looked up in a hook on every call
        self.batch = 0
        # Candidates: children of the targets' ancestors that have submodules (see the module docstring); a block
        # that contains one target is a candidate for the others.
        ancestors = {a for t in self.targets for a in _ancestors(t)}
        self._candidates: dict[str, nn.Module] = {}
        for parent in ancestors:
            for child_name, child in self.model.get_submodule(parent).named_children():
                name = f"{parent}.{child_name}" if parent else child_name
                if next(child.children(), None) is not None:
                    self._candidates[name] = child
        self._records: dict[str, list[Any]] = {}
        self._first_start: dict[str, int] = {}  # target -> latest (over batches) event index of its first call
        self._last_finish: dict[str, int] = {}  # candidate -> latest (over batches) event index of its return
        self._checked: dict[tuple[str, ...], bool] = {}

    def record(self, batches: Sequence[Any], run: Callable[[Any], Any]) -> list[Any]:
        """``[run(batch) for batch in batches]``, recording the candidates' outputs and the call order."""
        watched = {n: self.model.get_submodule(n) for n in self.targets} | self._candidates
        calls: dict[str, int] = {}
        unusable: set[str] = set()
        self._records = {n: [] for n in self._candidates}
        clock = [0]

        def before(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                clock[0] += 1
                calls[name] = calls.get(name, 0) + 1
                if name in self.targets and calls[name] == 1:
                    self._first_start[name] = max(self._first_start.get(name, -1), clock[0])

            return hook

        def after(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                clock[0] += 1
                if name in self._candidates:
                    if _replayable_output(output):
                        self._records[name].append(_clone(output))
                    else:
                        unusable.add(name)
                    self._last_finish[name] = max(self._last_finish.get(name, -1), clock[0])

            return hook

        handles = []
        try:
            for name, module in watched.items():
                handles.append(module.register_forward_pre_hook(before(name)))
                handles.append(module.register_forward_hook(after(name)))
            outputs = []
            for batch in batches:
                calls.clear()
                clock[0] = 0
                outputs.append(run(batch))
                unusable.update(n for n in self._candidates if calls.get(n, 0) != 1)
                unusable.update(t for t in self.targets if calls.get(t, 0) == 0)
        finally:
            for handle in handles:
                handle.remove()
        for name in unusable:
            self._records.pop(name, None)
            self._first_start.pop(name, None)
        return outputs

    def for_layer(self, target: str) -> tuple[str, ...]:
        """The recorded modules that ``target`` cannot affect (empty if it was never called)."""
        start = self._first_start.get(target)
        if start is None:
            return ()
        ancestors = set(_ancestors(target))
        return tuple(
            name for name in self._records
            if name not in ancestors and name.rpartition(".")[0] in ancestors and self._last_finish[name] < start
        )

    @contextlib.contextmanager
    def installed(self, names: Iterable[str]) -> Iterator[None]:
        """Within the block, each named module returns its recorded output for ``self.batch`` instead of running."""
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for name in names:
                module, records = self._candidates[name], self._records[name]
                saved.append((module, module.__dict__.get("forward")))  # accelerate's hooks replace forward too
                module.forward = lambda *args, _records=records, **kwargs: _clone(_records[self.batch])
            yield
        finally:
            for module, forward in reversed(saved):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def verified(self, names: tuple[str, ...], deviation: Callable[[], float]) -> tuple[str, ...]:
        """``names`` if replaying them reproduces the dense output (``deviation()``, run with them installed and
        nothing changed, is negligible), else ``()``: a model that breaks an assumption above runs in full."""
        if names and names not in self._checked:
            with self.installed(names):
                self._checked[names] = deviation() <= 1e-12
        return names if not names or self._checked[names] else ()


def no_cache(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``config.use_cache`` off while measuring: a replayed decoder block would not fill its key/value cache."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def off() -> Iterator[None]:
        config.use_cache = False
        try:
            yield
        finally:
            config.use_cache = True

    return off()


"""``LowRankLayer``: the base class of every low-rank layer, recognised everywhere with ``isinstance``.

Like peft's ``BaseTunerLayer``: code that must treat a factorised layer differently (targeting skips
it and its factors, ``compress`` refuses to cut it twice, saving checks the recorded ranks, reports
read its geometry) asks ``isinstance(module, LowRankLayer)``. This module imports nothing else of the
package but :mod:`smooth_hf.lowrank.guard` (which imports nothing), so any module can import it without an
import cycle.
"""

from __future__ import annotations

from torch import Tensor, nn

from .guard import GUARD_SUFFIX, is_guard

__all__ = ["LowRankLayer", "move_call_hooks"]


class LowRankLayer(nn.Module):
    """``up(down(x))``: two plain layers standing in for one dense layer of rank ``rank``.

    Subclasses set ``down``, ``up`` and ``rank`` and say which dense layer they replace
    (:attr:`kind`, :attr:`dense_shape`, :meth:`dense_weight`).
    """

    kind: str  # "linear" or "conv2d": the computation it stands in for (an HF Conv1D becomes "linear")
    rank: int
    down: nn.Module
    up: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # transformers checkpoints carry a guard at the dense weight's name (smooth_hf.lowrank.guard); it has
        # no place in this layer, so a strict load_state_dict skips it instead of calling it unexpected.
        if is_guard(state_dict.get(prefix + GUARD_SUFFIX)):
            del state_dict[prefix + GUARD_SUFFIX]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        """``(out, in, kh, kw)`` of the dense weight this layer replaces (``kh = kw = 1`` for a linear layer)."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The product of the factors, shaped like the dense weight (for inspection; the forward never builds it)."""
        raise NotImplementedError

    # Code that reads ``layer.weight`` / ``layer.bias`` directly (ViTModel reads
    # ``patch_embeddings.projection.weight.dtype``) gets the exact dense equivalent, built on demand.
    @property
    def weight(self) -> Tensor:
        return self.dense_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias


# The hooks registered on a module instance (register_forward_hook & co.): they act on its inputs and outputs, which a
# stand-in at its name shares, so they go with the name. (State-dict hooks concern the dense weights, which are gone.)
_CALL_HOOKS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


def move_call_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward and backward hooks registered on ``old``, which takes its place in a model.

    The hook dicts themselves are shared, not copied, so the handles their registration returned still remove them.
    """
    for hooks in _CALL_HOOKS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook

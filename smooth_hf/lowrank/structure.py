"""The structure of a compressed model: rebuilding it (``apply_ranks``) and checking its record (``check_compressed``).

A compressed model is its dense architecture with some layers replaced by low-rank layers of recorded ranks
(``model.lowrank_config.ranks``). That record is all a reload needs: build the dense architecture, replace the
recorded layers by uninitialised low-rank layers of those ranks, then load the weights strictly (as timm's
``adapt_model_from_file`` and peft's AdaLoRA ``rank_pattern`` do). Every module swap goes through
:func:`replace_module`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LowRankLayer, move_call_hooks
from .config import LowRankConfig
from .layers import low_rank_layer_like
from .targeting import layer_kind

__all__ = ["apply_ranks", "check_compressed", "replace_module"]


def check_compressed(model: nn.Module, allow_meta: bool = False) -> LowRankConfig:
    """``model.lowrank_config``, after checking that it describes the model's low-rank layers (else ValueError).

    ``allow_meta``: tensors on the meta device are accepted (transformers' own save reads offloaded weights back).
    """
    config = getattr(model, "lowrank_config", None)
    if not isinstance(config, LowRankConfig):
        raise ValueError(
            f"{type(model).__name__} was not compressed (it has no lowrank_config): call "
            "smooth_hf.compress(model, LowRankConfig(...)) first. To save a dense model, use timm's or transformers' "
            "own save functions."
        )
    # The recorded ranks are all a reload has to rebuild the structure: they must describe this model.
    wrong = []
    for name, rank in config.ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            wrong.append(f"{name} (no such module)")
            continue
        if not isinstance(module, LowRankLayer) or getattr(module, "rank", None) != rank:
            wrong.append(
                f"{name} (config rank {rank}, model has {type(module).__name__} rank {getattr(module, 'rank', None)})"
            )
    if wrong:
        raise ValueError(
            "model.lowrank_config.ranks does not describe the model's low-rank layers, so the checkpoint would "
            f"not reload: {', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}. Do not edit the layers after "
            "compress()."
        )
    meta = [] if allow_meta else [name for name, t in model.state_dict().items() if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"cannot save tensors on the meta device (e.g. {meta[0]}): load or materialise the weights first"
        )
    return config


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (peft-style), on the old module's device/dtype, in its train/eval mode, with its hooks."""
    old = model.get_submodule(name)
    weight = getattr(old, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        new.to(device=weight.device, dtype=weight.dtype)
    new.train(old.training)
    move_call_hooks(old, new)
    model.set_submodule(name, new)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Give ``model`` the structure of a compressed checkpoint, ready for ``load_state_dict(strict=True)``.

    Each named layer becomes an *uninitialised* low-rank layer of the recorded rank
    (:func:`~smooth_hf.lowrank.layers.low_rank_layer_like`), on the layer's device and dtype (the meta
    device included, for big-model loading): no SVD is run since the weights are about to be
    overwritten. Every entry is validated, and every new layer built, before any layer is replaced.

    Raises:
        ValueError: a name is missing or not a Linear/Conv2d/Conv1D layer (or a grouped conv), or a
            rank is not in ``[1, full rank]``.
    """
    plan = {}
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"apply_ranks: no module named {name!r} in {type(model).__name__}: the ranks must come from a "
                "compression of this same architecture (its compression_config.json)"
            ) from None
        if layer_kind(module, embeddings=True) is None:
            raise ValueError(
                f"apply_ranks: {name!r} is a {type(module).__name__}, not a dense Linear, Conv2d, Conv1D or Embedding layer"
                f"{'; it is already low-rank: apply ranks to a freshly built dense model' if isinstance(module, LowRankLayer) else ''}"
            )
        try:
            plan[name] = low_rank_layer_like(module, rank)
        except ValueError as err:
            raise ValueError(f"apply_ranks: {name!r}: {err}") from None
    for name, new in plan.items():
        replace_module(model, name, new)
    return model

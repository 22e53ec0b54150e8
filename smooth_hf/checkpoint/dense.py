"""Dense checkpoint folders: the trained model a compression starts from, written and read as timm and transformers do.

A folder holds ``model.safetensors`` and the ``config.json`` that rebuilds the architecture: timm's own
(``architecture`` + ``model_args``, as ``timm.models.push_to_hf``'s ``save_config_for_hf`` writes it) or
transformers' (``model_type`` + ``architectures``), plus, for a transformers model, its processor (tokenizer or
image processor) so that ``pipeline(task, model=folder)`` works on it. No pickle, no remote code.

:func:`write_model_files` is the one writer of weights and config, used for dense folders here and for compressed
ones (:mod:`smooth_hf.checkpoint.compressed`); :func:`build_from_config_dir` the one builder of an architecture
from a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig

from ..core.files import GENERATION_CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME
from ..core.libraries import base_library, is_transformers_model_class
from ..models import resnet_cifar  # noqa: F401  (registers the CIFAR ResNets so that their configs rebuild)
from .folders import is_compressed_folder

__all__ = [
    "build_from_config_dir",
    "is_timm_folder",
    "load_dense",
    "read_config",
    "save_dense",
    "transformers_class",
    "write_model_files",
]

# One weights file whatever the size: smooth_hf's folder checks (and its atomic save) know that one name.
_ONE_FILE = 2**60
# transformers' save records these on the model's own config; they are put back so that saving edits nothing.
_CONFIG_KEPT = ("architectures", "dtype")


def write_model_files(model: nn.Module, folder: Path, model_args: dict[str, Any] | None = None) -> None:
    """``model.safetensors`` and ``config.json`` of a timm or transformers model, into the existing ``folder``.

    A transformers model is written by its own ``save_pretrained`` (one weights file; ``model.config`` is left as it
    was), so that transformers reads the folder back exactly. A timm model: ``save_model`` (which drops the duplicate
    names of tied tensors and records what they pointed to) and timm's config. ``model_args``: timm only, JSON
    replacements for constructor arguments timm cannot write (``{"act_layer": "silu"}``).
    """
    if base_library(model) == "transformers":
        kept = {name: getattr(model.config, name, None) for name in _CONFIG_KEPT}
        try:
            model.save_pretrained(folder, max_shard_size=_ONE_FILE)
        finally:
            for name, value in kept.items():
                setattr(model.config, name, value)
        return
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    _save_timm_config(model, folder / HF_CONFIG_NAME, model_args)


def _save_timm_config(model: nn.Module, path: Path, model_args: dict[str, Any] | None) -> None:
    """timm's own config.json (``architecture`` + ``model_args``), with a way out for non-JSON arguments."""
    from timm.models._hub import save_config_for_hf

    try:
        save_config_for_hf(model, str(path), model_args=model_args)
    except (TypeError, ValueError) as err:
        if "serializ" not in str(err):
            raise
        raise ValueError(
            f"timm cannot write {type(model).__name__}'s constructor arguments as JSON ({err}). Pass JSON "
            "replacements that timm.create_model accepts, e.g. smooth_hf.save_pretrained(model, path, "
            "model_args={'act_layer': 'silu'}) for create_model(..., act_layer=nn.SiLU); they are stored in "
            "config.json and used to rebuild the model."
        ) from err


def save_dense(model: nn.Module, directory: str | os.PathLike, processor: Any = None) -> None:
    """Weights (safetensors) + the config that rebuilds the architecture, timm or transformers, + the processor.

    ``processor``: the tokenizer or image processor the model was trained with (anything with ``save_pretrained``),
    written beside the weights so that ``pipeline(task, model=directory)`` and ``recipes/compress.py`` use it.
    """
    directory = Path(directory)
    if base_library(model) is None:  # checked before creating the folder: a refused save writes nothing
        raise TypeError(f"{type(model).__name__} is neither a timm nor a transformers model: its architecture "
                        "cannot be written as JSON. Build it with timm.create_model or transformers.")
    directory.mkdir(parents=True, exist_ok=True)
    write_model_files(model, directory)
    if processor is not None:
        processor.save_pretrained(directory)


def _is_timm_config(config: dict[str, Any]) -> bool:
    """timm's config.json (``architecture`` + ``model_args``), as ``save_config_for_hf`` writes it."""
    return "architecture" in config


def is_timm_folder(path: str | os.PathLike) -> bool:
    """A local folder whose config.json is timm's, not transformers'."""
    try:
        config = read_config(path)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _is_timm_config(config)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder (FileNotFoundError, with what to do, when missing)."""
    path = Path(directory) / HF_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint folder needs the config.json that describes its architecture")
    return json.loads(path.read_text())


def transformers_class(directory: str | os.PathLike, config: dict[str, Any]) -> type[nn.Module]:
    """The transformers model class a ``config.json``'s ``architectures`` names (shipped classes only)."""
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not is_transformers_model_class(cls):
        raise ValueError(
            f"unknown base architecture {architectures or '(none)'} in {Path(directory) / HF_CONFIG_NAME}: smooth_hf "
            "only builds model classes shipped with transformers (never remote code). Upgrade transformers if the "
            "class is newer than the installed version."
        )
    return cls


def build_from_config_dir(
    directory: str | os.PathLike, device: str | torch.device = "cpu", config: dict[str, Any] | None = None
) -> nn.Module:
    """The (randomly initialised) architecture described by ``directory/config.json``.

    timm configs are built by timm itself (``timm.create_model("local-dir:...")``, which keeps the saved data
    config: mean, std, input size) and transformers configs by their class; ``config`` is the already-parsed
    ``config.json`` when the caller has it. Built under ``torch.device(device)`` (``"meta"`` builds the structure
    without allocating weights).
    """
    folder = Path(directory)
    config = read_config(folder) if config is None else config
    if _is_timm_config(config):
        name = config["architecture"]
        if not isinstance(name, str) or not timm.is_model(name):
            raise ValueError(
                f"unknown base architecture: timm has no model {name!r} ({folder / HF_CONFIG_NAME}). Upgrade timm, or "
                "import the module that registers it before loading."
            )
        with torch.device(device):
            return timm.create_model(f"local-dir:{folder}", pretrained=False)
    if "model_type" in config:
        cls = transformers_class(folder, config)
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"unknown base architecture: transformers cannot read {folder / HF_CONFIG_NAME}: {err}") from err
        with torch.device(device):
            model = cls._from_config(hf_config)
        if (folder / GENERATION_CONFIG_NAME).is_file() and model.can_generate():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model
    raise ValueError(
        f"unknown base architecture: {folder / HF_CONFIG_NAME} is neither a timm config (no 'architecture') nor a "
        "transformers config (no 'model_type')."
    )


def load_dense(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A dense trained checkpoint written by :func:`save_dense` (or any HF / timm safetensors export), in eval mode.

    ``directory`` may also be a transformers checkpoint on the Hub (``"TinyLlama/TinyLlama-1.1B-Chat-v1.0"``): it is
    loaded by the class its config names, in its saved dtype.
    """
    if not Path(directory).exists():  # a Hub id: transformers downloads it (safetensors only)
        try:
            hub_config = AutoConfig.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{directory} is neither a local checkpoint folder nor a transformers checkpoint "
                                    f"on the Hub ({err})") from err
        cls = transformers_class(directory, hub_config.to_dict())
        return cls.from_pretrained(str(directory), device_map=str(device), use_safetensors=True).eval()
    config = read_config(directory)
    if is_compressed_folder(directory):  # a dense load would only fail on it with a key mismatch
        raise ValueError(
            f"{directory} holds a compressed (low-rank) checkpoint, not a dense one: compress the dense model it came "
            "from (the training run's output folder), or load this one with smooth_hf.from_pretrained."
        )
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (smooth_hf reads safetensors weights only, never pickle)")
    if "model_type" in config:
        return transformers_class(directory, config).from_pretrained(directory, device_map=str(device)).eval()
    model = build_from_config_dir(directory, device, config)
    load_model(model, str(weights), strict=True, device=str(device))  # re-ties what save_model de-duplicated
    return model.eval()

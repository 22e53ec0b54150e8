"""Build models from a name, a type or a checkpoint folder, like transformers' Auto classes, for timm too.

* ``build_model("resnet18_cifar", num_labels=10, num_channels=1)``: a timm architecture (timm's
  registry, ``timm/...`` or ``hf-hub:...``), pretrained weights when timm has them;
* ``build_model("path/or/hub-id", ...)``: a transformers checkpoint (``AutoModelFor*``), head resized;
* ``build_model("runs/smooth", ...)``: a timm checkpoint folder ``save_dense`` wrote (``recipes/train.py``'s
  output), new head if the classes differ;
* ``build_model(None, model_type="vit", config_overrides="image_size=28,...")``: a transformers
  architecture from scratch, as in the HF example scripts.

``save_dense`` / ``build_from_config_dir`` store and rebuild a (dense) trained model from JSON +
safetensors: timm's own ``config.json`` (``architecture`` + ``model_args``) or transformers'
``config.json`` (``architectures``). No pickle, no remote code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import AutoConfig

from . import modeling_resnet_cifar  # noqa: F401  (registers the CIFAR ResNets with timm)
from .compat import base_library, is_transformers_model, is_transformers_model_class

__all__ = [
    "build_from_config_dir",
    "build_model",
    "check_num_labels",
    "image_input_config",
    "is_timm_name",
    "load_dense",
    "num_labels_of",
    "save_dense",
]

TASK_AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
}


def is_timm_name(name: str) -> bool:
    return name.startswith(("timm/", "hf-hub:")) or timm.is_model(name)


def _parse_overrides(config_overrides: str | None) -> dict[str, Any]:
    """``"a=1,b=x,c=0.5"`` -> typed dict (ints, floats, bools, JSON, else strings), HF-script style."""
    if not config_overrides:
        return {}
    out = {}
    # Split on the commas that start a new "key=", so list values ("channels=[16,32,64]") survive.
    for item in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", config_overrides):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} is not key=value (example: 'hidden_size=64,num_hidden_layers=2')")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_model(
    model_name_or_path: str | None,
    *,
    num_labels: int,
    num_channels: int | None = None,
    task: str = "image-classification",
    model_type: str | None = None,
    config_overrides: str | None = None,
    pretrained: bool = True,
    id2label: dict[int, str] | None = None,
) -> nn.Module:
    """A timm or transformers model with a ``num_labels``-way head (see module doc)."""
    if task not in TASK_AUTO_CLASSES:
        raise ValueError(f"task must be one of {list(TASK_AUTO_CLASSES)}, got {task!r}")
    auto_class = getattr(transformers, TASK_AUTO_CLASSES[task])
    overrides = _parse_overrides(config_overrides)
    label_kwargs = {"num_labels": num_labels}
    if id2label:
        label_kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})

    if model_name_or_path is None:
        if model_type is None:
            raise ValueError("give --model_name_or_path, or --model_type to train a transformers architecture from scratch")
        if num_channels is not None and task == "image-classification":
            overrides.setdefault("num_channels", num_channels)
        config = AutoConfig.for_model(model_type, **overrides, **label_kwargs)
        return auto_class.from_config(config)

    if _is_timm_folder(model_name_or_path):  # a timm checkpoint saved by save_dense (recipes/train.py's output)
        if overrides:
            raise ValueError(f"--config_overrides does not apply to the saved timm model {model_name_or_path}: its "
                             "config.json fixes the architecture")
        model = load_dense(model_name_or_path) if pretrained else build_from_config_dir(model_name_or_path)
        if num_labels != model.num_classes:
            model.reset_classifier(num_labels)  # a new head for other classes, as ignore_mismatched_sizes does
        return model

    if is_timm_name(model_name_or_path):
        if task != "image-classification":
            raise ValueError(f"timm model {model_name_or_path!r} is an image model; task {task!r} needs a transformers model")
        kwargs = {"num_classes": num_labels, **overrides}
        if num_channels is not None:
            kwargs["in_chans"] = num_channels
        # Registry names without released weights (e.g. resnet18_cifar) start from scratch.
        cfg = timm.models.get_pretrained_cfg(model_name_or_path) if timm.is_model(model_name_or_path) else None
        has_weights = cfg is None or cfg.has_weights
        return timm.create_model(model_name_or_path, pretrained=pretrained and has_weights, **kwargs)

    config = AutoConfig.from_pretrained(model_name_or_path, **overrides, **label_kwargs)
    if not pretrained:
        return auto_class.from_config(config)
    return auto_class.from_pretrained(model_name_or_path, config=config, ignore_mismatched_sizes=True)


def num_labels_of(model: nn.Module) -> int | None:
    """Output classes of a classifier: transformers ``config.num_labels``, timm ``num_classes``."""
    if is_transformers_model(model):
        return getattr(model.config, "num_labels", None)
    return getattr(model, "num_classes", None)


def check_num_labels(model: nn.Module, num_classes: int) -> None:
    """A dataset with more (or fewer) classes than the model's head is a mistake, not a warning."""
    outputs = num_labels_of(model)
    if outputs is not None and outputs != num_classes:
        raise ValueError(
            f"the model has {outputs} outputs but the dataset has {num_classes} classes: use the dataset the "
            f"model was trained on, or build the model with num_labels={num_classes}"
        )


def image_input_config(model: nn.Module) -> dict[str, Any]:
    """Channels, fixed image size (or None) and normalisation a model expects, timm or transformers."""
    if is_transformers_model(model):
        config = model.config
        size = getattr(config, "image_size", None)
        size = size[0] if isinstance(size, list | tuple) else size
        channels = getattr(config, "num_channels", 3)
        return {"channels": channels, "image_size": size, "mean": (0.5,) * channels, "std": (0.5,) * channels}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0]
    mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
    if len(mean) != channels:  # e.g. a 3-channel recipe used with 1-channel images: use the average
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    size = cfg.get("input_size")[1] if cfg.get("fixed_input_size") else None
    return {"channels": channels, "image_size": size, "mean": tuple(mean), "std": tuple(std)}


def save_dense(model: nn.Module, directory: str | os.PathLike) -> None:
    """Weights (safetensors) + the config that rebuilds the architecture, timm or transformers."""
    directory = Path(directory)
    library = base_library(model)
    if library is None:  # checked before creating the folder: a refused save writes nothing
        raise TypeError(f"{type(model).__name__} is neither a timm nor a transformers model: its architecture "
                        "cannot be written as JSON. Build it with timm.create_model or transformers.")
    directory.mkdir(parents=True, exist_ok=True)
    if library == "transformers":
        model.save_pretrained(directory)
        return
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(model, directory / "config.json")
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _is_timm_config(config: dict[str, Any]) -> bool:
    """timm's config.json (``architecture`` + ``model_args``), as ``save_config_for_hf`` writes it."""
    return "architecture" in config


def _is_timm_folder(path: str) -> bool:
    """A local folder whose config.json is timm's, not transformers'."""
    try:
        config = _read_config(path)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _is_timm_config(config)


def _read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint folder needs the config.json that describes its architecture")
    return json.loads(path.read_text())


def _transformers_class(directory: str | os.PathLike, config: dict[str, Any]) -> type[nn.Module]:
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not is_transformers_model_class(cls):
        raise ValueError(
            f"unknown base architecture {architectures or '(none)'} in {Path(directory) / 'config.json'}: smooth_hf "
            "only builds model classes shipped with transformers (never remote code). Upgrade transformers if the "
            "class is newer than the installed version."
        )
    return cls


def build_from_config_dir(
    directory: str | os.PathLike, device: str | torch.device = "cpu", config: dict[str, Any] | None = None
) -> nn.Module:
    """The (randomly initialised) architecture described by ``directory/config.json``.

    timm configs (``architecture`` + ``model_args``, as ``save_config_for_hf`` writes them) and
    transformers configs (``model_type`` + ``architectures``) are both understood; ``config`` is the
    already-parsed ``config.json`` when the caller has it. Built under ``torch.device(device)``
    (``"meta"`` builds the structure without allocating weights).
    """
    folder = Path(directory)
    config = _read_config(folder) if config is None else config
    if _is_timm_config(config):
        from timm.models._hub import load_model_config_from_path

        name = config["architecture"]
        if not isinstance(name, str) or not timm.is_model(name):
            raise ValueError(
                f"unknown base architecture: timm has no model {name!r} ({folder / 'config.json'}). Upgrade timm, or "
                "import the module that registers it before loading."
            )
        pretrained_cfg, _, model_args = load_model_config_from_path(folder)
        with torch.device(device):
            model = timm.create_model(name, pretrained=False, **model_args)
        # Keep the saved data config (mean/std/input size) rather than the registry default, as timm does.
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **pretrained_cfg}
        return model
    if "model_type" in config:
        cls = _transformers_class(folder, config)
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"unknown base architecture: transformers cannot read {folder / 'config.json'}: {err}") from err
        with torch.device(device):
            model = cls._from_config(hf_config)
        if (folder / "generation_config.json").is_file() and model.can_generate():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model
    raise ValueError(
        f"unknown base architecture: {folder / 'config.json'} is neither a timm config (no 'architecture') nor a "
        "transformers config (no 'model_type')."
    )


def _check_dense(directory: str | os.PathLike) -> None:
    """Refuse a compressed checkpoint, which a dense load would only fail on with a key mismatch."""
    from .hub import is_compressed_folder  # here: hub builds its models with this module

    if is_compressed_folder(directory):
        raise ValueError(
            f"{directory} holds a compressed (low-rank) checkpoint, not a dense one: compress the dense model it came "
            "from (the training run's output folder), or load this one with smooth_hf.from_pretrained."
        )


def load_dense(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A dense trained checkpoint written by :func:`save_dense` (or any HF / timm safetensors export)."""
    config = _read_config(directory)
    _check_dense(directory)
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (smooth_hf reads safetensors weights only, never pickle)")
    if "model_type" in config:
        return _transformers_class(directory, config).from_pretrained(directory, device_map=str(device)).eval()
    model = build_from_config_dir(directory, device)
    model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    return model.eval()

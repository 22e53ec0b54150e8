"""Build models from a name, a type or a checkpoint folder, like transformers' Auto classes, for timm too.

* ``build_model("resnet18_cifar", num_labels=10, num_channels=1)``: a timm architecture (timm's
  registry, ``timm/...`` or ``hf-hub:...``), pretrained weights when timm has them;
* ``build_model("path/or/hub-id", ...)``: a transformers checkpoint (``AutoModelFor*``), head resized;
* ``build_model("runs/smooth", ...)``: a timm checkpoint folder ``save_dense`` wrote (``recipes/train.py``'s
  output), new head if the classes differ;
* ``build_model(None, model_type="vit", config_overrides="image_size=28,...")``: a transformers
  architecture from scratch, as in the HF example scripts.

Which library a name belongs to is decided here; saving and reloading folders: :mod:`smooth_hf.checkpoint.dense`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import timm
import transformers
from torch import nn
from transformers import AutoConfig

from ..core.libraries import is_transformers_model
from ..models import resnet_cifar  # noqa: F401  (registers the CIFAR ResNets with timm)
from .dense import build_from_config_dir, is_timm_folder, load_dense

__all__ = ["build_model", "check_num_labels", "is_timm_name", "num_labels_of", "task_of"]

TASK_AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
}


def is_timm_name(name: str) -> bool:
    return name.startswith(("timm/", "hf-hub:")) or timm.is_model(name)


def task_of(model_name_or_path: str | None, model_type: str | None = None) -> str:
    """``"text-classification"`` for a transformers text model (a config with a vocabulary and no image input), else
    ``"image-classification"`` (timm models, transformers vision models)."""
    if model_name_or_path is None:
        config = AutoConfig.for_model(model_type) if model_type else None
    elif is_timm_folder(model_name_or_path) or is_timm_name(model_name_or_path):
        return "image-classification"
    else:
        config = AutoConfig.from_pretrained(model_name_or_path)
    text = config is not None and hasattr(config, "vocab_size") and not hasattr(config, "num_channels")
    return "text-classification" if text else "image-classification"


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

    if is_timm_folder(model_name_or_path):  # a timm checkpoint saved by save_dense (recipes/train.py's output)
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



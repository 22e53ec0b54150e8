"""Which library a model or layer comes from: the one place that decides it.

Everything that treats a transformers model, a timm model and a plain ``nn.Module`` differently
(the loss in the Trainer, saving and rebuilding an architecture, model cards, input configs) asks
here, so that the three always mean the same thing:

* a **transformers** model is an instance of ``transformers.PreTrainedModel``;
* a **timm** model carries timm's ``pretrained_cfg`` with its registry ``architecture`` (what
  ``timm.create_model`` sets, and what rebuilds the model from JSON);
* anything else is a **plain** module: it trains, but its architecture cannot be written as JSON.

HF's ``Conv1D`` (GPT-2's layers, weight stored ``(in, out)``) is recognised with ``isinstance``, as
peft does, never by class name. This module imports nothing else of the package, so any module can
use it.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

__all__ = [
    "Library",
    "base_library",
    "is_hf_conv1d",
    "is_timm_model",
    "is_transformers_model",
    "is_transformers_model_class",
    "pipeline_task",
]

Library = Literal["transformers", "timm"]


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (its own loss, ``config.json`` and ``save_pretrained``)."""
    return isinstance(model, PreTrainedModel)


def is_transformers_model_class(cls: Any) -> bool:
    """A model class shipped with transformers, e.g. the class a ``config.json``'s ``architectures`` names."""
    return isinstance(cls, type) and issubclass(cls, PreTrainedModel)


def is_timm_model(model: nn.Module) -> bool:
    """A model built by ``timm.create_model``: it carries a ``pretrained_cfg`` naming its architecture."""
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and bool(cfg.get("architecture"))


def base_library(model: nn.Module) -> Library | None:
    """``"transformers"``, ``"timm"``, or ``None`` for a plain module (whose architecture has no JSON config)."""
    if is_transformers_model(model):
        return "transformers"
    if is_timm_model(model):
        return "timm"
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored transposed, ``(in, out)``."""
    return isinstance(module, Conv1D)


def pipeline_task(model: nn.Module) -> str | None:
    """The Hub pipeline tag implied by the head (``"text-generation"`` for a causal LM): what the Hub lists the model
    under, and what the recipes evaluate it on."""
    if base_library(model) == "timm":
        return "image-classification" if getattr(model, "num_classes", 0) else "image-feature-extraction"
    name = type(model).__name__
    for suffix, task in (
        ("ForImageClassification", "image-classification"),
        ("ForSequenceClassification", "text-classification"),
        ("ForTokenClassification", "token-classification"),
        ("ForQuestionAnswering", "question-answering"),
        ("ForCausalLM", "text-generation"),
        ("LMHeadModel", "text-generation"),
        ("ForMaskedLM", "fill-mask"),
    ):
        if name.endswith(suffix):
            return task
    return None

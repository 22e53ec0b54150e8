"""Checkpoints of compressed transformers models: written and read through transformers itself.

:func:`smooth_hf.save_pretrained` and :func:`smooth_hf.from_pretrained` use these for transformers
models, so a folder they write is byte for byte what ``model.save_pretrained`` writes (plus the
smooth_hf files: ``compression_config.json``, ``compression_report.json``, the card), and a folder
written by ``model.save_pretrained`` loads with either. The low-rank structure travels in
``config.json``'s ``quantization_config`` (:mod:`smooth_hf.integrations.transformers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedModel

from ..integrations.transformers import (
    SmoothHfConfig,
    SmoothHfQuantizer,
    attach_quantization_config,
    quantization_section,
)
from ..lowrank import LowRankConfig
from .dense import transformers_class

__all__ = ["ensure_quantization_config", "load_checkpoint"]

def ensure_quantization_config(model: PreTrainedModel) -> None:
    """Make ``model.save_pretrained`` record the low-rank structure (a no-op when ``compress`` already did).

    The ``quantization_config`` is refreshed to the model's current ranks and dtypes when it is saved
    (:meth:`SmoothHfQuantizer.get_state_dict_and_metadata`).
    """
    if not isinstance(getattr(model, "hf_quantizer", None), SmoothHfQuantizer):
        attach_quantization_config(model)  # e.g. a model compressed before compress() attached it
    if not isinstance(getattr(model, "hf_quantizer", None), SmoothHfQuantizer):
        raise ValueError(
            f"{type(model).__name__} carries another quantization method "
            f"({getattr(model.config, 'quantization_config', None)!r}); smooth_hf cannot save it with its "
            "low-rank structure. Compress a model that is not quantized."
        )


def load_checkpoint(folder: Path, config: dict[str, Any], lowrank: LowRankConfig | None) -> PreTrainedModel:
    """The compressed model in ``folder``, loaded by its transformers class with the smooth_hf quantizer.

    ``config`` is the parsed ``config.json``; ``lowrank`` the ``compression_config.json`` if there is one.
    Folders saved before ``config.json`` carried the ranks (``lowrank`` only) load too. The load is strict:
    any missing, unexpected or mismatched tensor is an error, not a warning.

    Raises:
        ValueError: unknown architecture, ranks that do not fit the architecture or the weights, or the two
            configs disagreeing.
    """
    cls = transformers_class(folder, config)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"unknown base architecture: transformers cannot read {folder / 'config.json'}: {err}") from err
    section = quantization_section(config)
    if section is None:
        if lowrank is None:
            raise ValueError(f"{folder / 'config.json'} has no smooth_hf quantization_config: not a compressed model")
        hf_config.quantization_config = SmoothHfConfig(lowrank=lowrank).to_dict()
    elif lowrank is not None and SmoothHfConfig.from_dict(section).ranks != lowrank.ranks:
        raise ValueError(
            f"The ranks in {folder / 'compression_config.json'} differ from the quantization_config in "
            f"{folder / 'config.json'}: the files come from different saves (e.g. transformers' model.save_pretrained "
            "or model.push_to_hub over a folder or repo that smooth_hf.save_pretrained / push_to_hub wrote: they "
            "do not update compression_config.json or the card). Re-save, or push again, with "
            "smooth_hf.save_pretrained / smooth_hf.push_to_hub; AutoModelFor*.from_pretrained loads config.json's ranks."
        )
    try:
        model, info = cls.from_pretrained(
            folder, config=hf_config, dtype="auto", use_safetensors=True, output_loading_info=True
        )
    except ValueError as err:
        raise ValueError(f"cannot load {folder}: {err}") from err
    problems = []
    for key, what in (
        ("missing_keys", "missing from the file"),
        ("unexpected_keys", "not expected by the model"),
        ("mismatched_keys", "shape mismatch"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            problems.append(f"{what}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if problems:
        raise ValueError(
            f"The ranks in {folder / 'config.json'} (quantization_config) do not match the weights in {folder}: "
            f"{'; '.join(problems)}. The files come from different saves or were edited; re-save the model."
        )
    return model


"""Compressed checkpoints in local folders: :func:`save_pretrained` and the loader behind ``from_pretrained``.

A compressed checkpoint is a folder of plain files::

    model.safetensors        weights (safetensors only); factorised layers as <name>.down/up.*
    config.json              the base model's own config, as timm / transformers write it; for transformers
                             models with a ``quantization_config`` section holding the ranks
    generation_config.json   transformers generative models only, as transformers writes it
    compression_config.json  LowRankConfig, with the rank of every factorised layer
    compression_report.json  parameter counts and per-layer table (informational, for the card)
    README.md                the model card
    (processor files)        the tokenizer or image processor, when saved with one

transformers models are written and read through transformers itself (``model.save_pretrained``, and their class's
``from_pretrained`` with the smooth_hf quantizer: :mod:`smooth_hf.checkpoint.transformers`), so these folders are
also what ``AutoModelFor*.from_pretrained`` loads after ``import smooth_hf``, and a folder written by
``model.save_pretrained`` loads here too. timm has no such hook: following timm's ``adapt_model_from_file`` and
peft's AdaLoRA ``rank_pattern``, the base architecture is built from its JSON config, the recorded ranks replayed
(:func:`smooth_hf.lowrank.apply_ranks`), then the weights loaded. Both loads are strict: any mismatch is an error,
never a silently half-initialised model. Downloading from and pushing to the Hub: :mod:`smooth_hf.hub`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.dtypes import set_tensor_dtypes
from ..core.files import CARD_NAME, COMPRESSION_CONFIG_NAME, HF_CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from ..core.libraries import base_library, is_transformers_model
from ..lowrank import CompressionReport, LowRankConfig, apply_ranks, check_compressed
from .card import ModelCardInfo, render_model_card
from .dense import build_from_config_dir, write_model_files
from .folders import check_compressed_folder, check_save_target, move_into_place, read_json, weight_shapes
from .transformers import ensure_quantization_config, load_checkpoint

__all__ = ["load_compressed", "save_pretrained", "write_checkpoint"]

logger = logging.getLogger(__name__)


def _base_library(model: nn.Module) -> str:
    """``"transformers"`` or ``"timm"``: the libraries whose configs rebuild an architecture from JSON."""
    library = base_library(model)
    if library is not None:
        return library
    raise TypeError(
        f"{type(model).__name__} is neither a timm model (timm.create_model) nor a transformers PreTrainedModel, so "
        "its architecture cannot be rebuilt from JSON and save_pretrained/from_pretrained cannot handle it. Save its "
        "state dict yourself instead: safetensors.torch.save_model(model, 'model.safetensors') plus "
        "json.dump(model.lowrank_config.ranks, ...); to reload, build the dense model in code, call "
        "smooth_hf.lowrank.apply_ranks(model, ranks), then safetensors.torch.load_model(model, 'model.safetensors')."
    )


def _write_checkpoint(
    model: nn.Module,
    folder: Path,
    config: LowRankConfig,
    card_text: str,
    model_args: dict[str, Any] | None = None,
    processor: Any = None,
) -> None:
    """Write every file of the checkpoint into ``folder`` (a fresh temporary folder)."""
    if is_transformers_model(model):
        ensure_quantization_config(model)  # so that model.save_pretrained records the ranks
    write_model_files(model, folder, model_args)
    config.save_pretrained(folder)
    report = getattr(model, "lowrank_report", None)
    if isinstance(report, CompressionReport):
        (folder / REPORT_NAME).write_text(
            json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    if processor is not None:
        processor.save_pretrained(folder)
    (folder / CARD_NAME).write_text(card_text, encoding="utf-8")
    for path in folder.iterdir():  # durable before the rename makes them visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def write_checkpoint(
    model: nn.Module,
    save_directory: str | os.PathLike,
    info: ModelCardInfo | None,
    location: str,
    model_args: dict[str, Any] | None = None,
    processor: Any = None,
) -> Path:
    """:func:`save_pretrained`, with the card's reload snippet naming ``location`` (a folder or a Hub repo id)."""
    config = check_compressed(model)
    library = _base_library(model)
    if model_args is not None and library != "timm":
        raise TypeError("model_args is for timm models; a transformers model's config.json comes from model.config")
    target = check_save_target(save_directory)
    card_text = str(render_model_card(model, info, location=location))
    target.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system (and is atomic). Created with mkdir, not
    # mkdtemp, so that the folder gets the usual permissions (umask) rather than mkdtemp's private 0700.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        _write_checkpoint(model, tmp, config, card_text, model_args, processor)
        move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    model_card: ModelCardInfo | None = None,
    model_args: dict[str, Any] | None = None,
    processor: Any = None,
) -> Path:
    """Save a compressed timm / transformers model as safetensors + JSON configs + model card.

    A transformers model is written exactly as ``model.save_pretrained`` writes it (``config.json`` with a
    ``quantization_config`` holding the ranks), so ``AutoModelFor*.from_pretrained`` loads the folder after
    ``import smooth_hf``; the smooth_hf files (``compression_config.json``, report, card) come on top.

    The files are written into a temporary sibling folder and moved into place only when all of them
    were written, so a save that fails half way (disk full, interrupted) leaves any previous checkpoint
    at ``save_directory`` as it was. Other files already in ``save_directory`` are kept.

    Args:
        model_card: what the card should say beyond what the model knows (datasets, metrics, ...).
        model_args: timm models only: JSON replacements for constructor arguments timm cannot write as
            JSON, as in timm's own ``save_for_hf`` (e.g. ``{"act_layer": "silu"}`` for a model created
            with ``act_layer=nn.SiLU``). They go into ``config.json`` and rebuild the model on reload.
        processor: the model's tokenizer or image processor (anything with ``save_pretrained``), saved beside it
            so that ``pipeline(task, model=save_directory)`` works on the folder unchanged.

    Returns:
        The absolute path of the checkpoint folder, symlinks resolved (a link's target folder is written).

    Raises:
        ValueError: the model was not compressed (call :func:`smooth_hf.compress` first), the folder holds
            pickle files that :func:`from_pretrained` would refuse or a dense checkpoint that the save would
            replace (:func:`check_save_target`), or a timm constructor argument is not JSON (the message says
            to pass ``model_args``).
        TypeError: the model is neither timm nor transformers, so its architecture cannot be saved as JSON.
    """
    return write_checkpoint(model, save_directory, model_card, str(save_directory), model_args, processor)


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """State-dict names sharing one tensor (tied weights), by tensor identity so it works on the meta device."""
    groups: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def _check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """The model (base architecture + recorded ranks) must expect exactly the tensors the file holds."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = _tied_groups(model)
    missing = sorted(
        name
        for name in set(expected) - set(shapes)
        # safetensors keeps one name per tied group: the others are filled by the tie itself.
        if not any(name in group and group & set(shapes) for group in tied)
    )
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(name for name in set(shapes) & set(expected) if shapes[name] != expected[name])
    if not (missing or unexpected or mismatched):
        return
    details = []
    if mismatched:
        details.append(
            "shape mismatch: " + ", ".join(f"{n} file {shapes[n]} vs model {expected[n]}" for n in mismatched[:4])
        )
    if missing:
        details.append("missing from the file: " + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))
    if unexpected:
        details.append(
            "not expected by the model: " + ", ".join(unexpected[:4]) + (", ..." if len(unexpected) > 4 else "")
        )
    raise ValueError(
        f"The ranks in {folder / COMPRESSION_CONFIG_NAME} (and the architecture in {HF_CONFIG_NAME}) do not match the weights in "
        f"{folder / WEIGHTS_NAME}: {'; '.join(details)}. The files come from different saves or were edited; "
        "re-save the model with smooth_hf.save_pretrained."
    )


def _meta_tensors(model: nn.Module) -> list[str]:
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [name for name, t in tensors if t.device.type == "meta"]


def _load_report(folder: Path) -> CompressionReport | None:
    path = folder / REPORT_NAME
    if not path.is_file():
        return None
    try:
        return CompressionReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as err:  # informational only: never fail a load over it
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None


def load_compressed(folder: Path, device: str | torch.device, check_pickles: bool = True) -> nn.Module:
    check_compressed_folder(folder, check_pickles)
    config = None
    if (folder / COMPRESSION_CONFIG_NAME).is_file():
        try:
            config = LowRankConfig.from_dict(read_json(folder / COMPRESSION_CONFIG_NAME))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{folder / COMPRESSION_CONFIG_NAME} is invalid: {err}") from err
    hf_config = read_json(folder / HF_CONFIG_NAME)
    weights = folder / WEIGHTS_NAME
    if config is None and "model_type" not in hf_config:
        raise ValueError(f"{folder} has no {COMPRESSION_CONFIG_NAME}; re-save the model with smooth_hf.save_pretrained")
    if "model_type" in hf_config:
        if weights.is_file():  # else shards, which transformers reads (and checks) through their index
            weight_shapes(weights)  # refuses a truncated file before anything is built
        # transformers models load through transformers itself, as AutoModelFor*.from_pretrained would.
        model = load_checkpoint(folder, hf_config, config).to(device)
    else:
        model = _load_timm(folder, hf_config, config, weight_shapes(weights)).to(device)
    report = _load_report(folder)
    if report is not None:
        model.lowrank_report = report
    return model.eval()


def _load_timm(
    folder: Path, hf_config: dict[str, Any], config: LowRankConfig, shapes: dict[str, tuple[int, ...]]
) -> nn.Module:
    def structure(build_device: str) -> nn.Module:
        model = build_from_config_dir(folder, build_device, hf_config)
        try:
            apply_ranks(model, config.ranks)
        except ValueError as err:
            raise ValueError(
                f"The ranks in {folder / COMPRESSION_CONFIG_NAME} do not fit the architecture in {HF_CONFIG_NAME}: {err}"
            ) from err
        _check_keys(model, shapes, folder)
        return model

    state_dict = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    # Built on the meta device (no random init, no double memory) and the weights assigned, which keeps
    # every tensor's saved dtype.
    model = None
    try:
        model = structure("meta")
    except (NotImplementedError, RuntimeError) as err:  # an __init__ that computes on its tensors
        logger.debug("meta-device build failed (%s); building on CPU", err)
    else:
        model.load_state_dict(state_dict, strict=False, assign=True)
        if _meta_tensors(model):  # a buffer that is not in the file, or a tie: build for real instead
            model = None
    if model is None:
        model = structure("cpu")
        # Each tensor takes its saved dtype (a float32 island in a half-precision model stays float32).
        set_tensor_dtypes(model, {name: t.dtype for name, t in state_dict.items() if t.is_floating_point()})
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = _tied_groups(model)
        missing = [n for n in missing if not any(n in g and g & set(state_dict) for g in tied)]
        if missing or unexpected:  # _check_keys already guarantees this; kept as a surgery check
            raise RuntimeError(f"strict load failed: missing {missing}, unexpected {unexpected}")
    model.lowrank_config = config
    return model

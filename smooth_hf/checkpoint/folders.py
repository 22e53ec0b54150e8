"""Checkpoint folders on disk: what a folder holds, whether it may be written, and writing it atomically.

Shared by the dense and the compressed checkpoints (:mod:`smooth_hf.checkpoint.dense`,
:mod:`smooth_hf.checkpoint.compressed`): the checks that a folder is a complete compressed checkpoint (and holds
no pickle), that a save does not replace a dense checkpoint, and the move of a finished save into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..core.files import (
    CARD_NAME,
    COMPRESSION_CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    HF_CONFIG_NAME,
    PICKLE_SUFFIXES,
    REPORT_NAME,
    SHARD_INDEX_NAME,
    WEIGHTS_NAME,
)
from ..integrations.transformers import quantization_section

__all__ = [
    "OWN_FILES",
    "check_compressed_folder",
    "check_save_target",
    "is_compressed_folder",
    "move_into_place",
    "pickle_files",
    "read_json",
    "weight_shapes",
    "written_by_transformers",
]

# The files a compressed checkpoint of smooth_hf's consists of (a processor's files come on top when saved with one).
OWN_FILES = (WEIGHTS_NAME, HF_CONFIG_NAME, GENERATION_CONFIG_NAME, COMPRESSION_CONFIG_NAME, REPORT_NAME, CARD_NAME)


def pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _shard_files(folder: Path) -> set[str]:
    """The index of a sharded transformers save in ``folder`` and the shard files it names (empty if none)."""
    index = folder / SHARD_INDEX_NAME
    if not index.is_file():
        return set()
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        names = set()  # unreadable: only the index itself is known to be a checkpoint file
    return {SHARD_INDEX_NAME} | {n for n in names if isinstance(n, str) and "/" not in n and (folder / n).is_file()}


def move_into_place(tmp: Path, target: Path) -> None:
    """Make ``tmp`` the checkpoint at ``target``; never leave a mix of two saves that ``from_pretrained`` loads.

    * ``target`` absent: one ``rename`` (atomic).
    * ``target`` holds only checkpoint files: rename it aside, rename ``tmp`` in, delete the old one;
      if the second rename fails the old folder is put back.
    * ``target`` also holds other files (e.g. a training output folder): they are kept and the checkpoint
      files are replaced one by one, the two configs removed first and written last (``config.json`` the very
      last), so a folder caught half way is rejected by ``smooth_hf.from_pretrained`` and by transformers'
      ``from_pretrained`` (which reads no ``compression_config.json``) instead of loading mismatched files.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    entries = {p.name for p in target.iterdir()}
    shards = _shard_files(target)  # of a sharded transformers save: stale once this save is in
    if entries <= set(OWN_FILES) | shards:
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    last = (COMPRESSION_CONFIG_NAME, HF_CONFIG_NAME)  # what each loader needs first: without them a folder is refused
    for name in last:
        (target / name).unlink(missing_ok=True)
    new_files = {p.name for p in tmp.iterdir()}
    # The weights first, then the other files of the checkpoint and of its processor (when it has one).
    for name in [n for n in OWN_FILES if n in new_files] + sorted(new_files - set(OWN_FILES)):
        if name not in last:
            os.replace(tmp / name, target / name)
    for name in set(OWN_FILES) - new_files - set(last):
        (target / name).unlink(missing_ok=True)  # a stale file of the previous save (e.g. its report) must not survive
    for name in shards:
        (target / name).unlink(missing_ok=True)
    for name in last:
        os.replace(tmp / name, target / name)
    shutil.rmtree(tmp, ignore_errors=True)


def check_save_target(save_directory: str | os.PathLike) -> Path:
    """The folder a compressed model would be saved into (absolute, links resolved), or a clear error.

    Refused: a folder holding pickle files (``from_pretrained`` would refuse it) or a dense checkpoint (its
    weights would be replaced: the trained model is what a compression starts from). A previous compressed
    checkpoint there is replaced, and other files are kept. ``recipes/compress.py`` calls this before any work.
    """
    # Resolved: saving through a symlink must write into the folder it points to, not replace the link.
    target = Path(save_directory).expanduser().resolve()
    if not target.is_dir():
        return target
    pickles = pickle_files(target)
    if pickles:
        raise ValueError(
            f"{target} contains pickle files ({', '.join(pickles)}); from_pretrained refuses such folders "
            "(unpickling can run arbitrary code). Save the compressed model into its own folder, e.g. "
            "<output_dir>/compressed."
        )
    # A dense checkpoint: weights and the config.json that rebuilds them, and no sign of a compressed model. (Without
    # config.json, e.g. a save of ours caught half way, nothing could load the folder: the next save completes it.)
    has_weights = (target / WEIGHTS_NAME).is_file() or (target / SHARD_INDEX_NAME).is_file()
    if has_weights and (target / HF_CONFIG_NAME).is_file() and not is_compressed_folder(target):
        raise ValueError(
            f"{target} holds a dense checkpoint ({WEIGHTS_NAME} of a model that is not compressed): saving the "
            f"compressed model there would replace its weights. Save it into another folder, e.g. "
            f"{target.with_name(target.name + '-lowrank')}."
        )
    return target


def check_compressed_folder(folder: Path, check_pickles: bool = True) -> None:
    """Refuse, with what to do, anything that is not a complete smooth_hf checkpoint."""
    present = {p.name for p in folder.iterdir()}
    if not present:
        raise FileNotFoundError(
            f"{folder} is empty: expected {WEIGHTS_NAME}, {HF_CONFIG_NAME} and {COMPRESSION_CONFIG_NAME} as written by "
            "smooth_hf.save_pretrained (or push_to_hub)."
        )
    pickles = pickle_files(folder) if check_pickles else []
    if pickles:
        raise ValueError(
            f"{folder} contains pickle files ({', '.join(pickles)}): smooth_hf refuses to load folders with pickled "
            "checkpoints, because unpickling can execute arbitrary code. Remove them (the weights smooth_hf reads are "
            f"in {WEIGHTS_NAME}), or re-save the model with smooth_hf.save_pretrained."
        )
    if not is_compressed_folder(folder):
        if WEIGHTS_NAME in present or HF_CONFIG_NAME in present:
            raise ValueError(
                f"{folder} has no {COMPRESSION_CONFIG_NAME}: this is not a smooth_hf compressed checkpoint. A dense checkpoint "
                "loads with timm or transformers directly (e.g. transformers' AutoModel*.from_pretrained(path), or "
                "timm.create_model(..., pretrained_cfg_overlay=dict(file=...))), and can then be compressed with "
                "smooth_hf.compress."
            )
        raise FileNotFoundError(
            f"{folder} holds no smooth_hf checkpoint (found {', '.join(sorted(present)[:5])}); expected "
            f"{WEIGHTS_NAME}, {HF_CONFIG_NAME} and {COMPRESSION_CONFIG_NAME} as written by smooth_hf.save_pretrained."
        )
    if HF_CONFIG_NAME not in present:
        raise FileNotFoundError(
            f"{folder} has no {HF_CONFIG_NAME} (the base model's config), so the architecture cannot be rebuilt; "
            "re-save the model with smooth_hf.save_pretrained."
        )
    if WEIGHTS_NAME not in present and not (SHARD_INDEX_NAME in present and written_by_transformers(folder)):
        raise FileNotFoundError(
            f"{folder} has no {WEIGHTS_NAME}: the weights are missing (smooth_hf reads safetensors only). Re-save the "
            "model with smooth_hf.save_pretrained, or re-download it (snapshot_download(..., force_download=True))."
        )


def is_compressed_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a smooth_hf compressed checkpoint (by its configs; the weights are not read)."""
    return (Path(folder) / COMPRESSION_CONFIG_NAME).is_file() or written_by_transformers(Path(folder))


def written_by_transformers(folder: Path) -> bool:
    """A compressed transformers model saved with ``model.save_pretrained``: the ranks are in config.json."""
    try:
        return quantization_section(json.loads((folder / HF_CONFIG_NAME).read_text(encoding="utf-8"))) is not None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model with smooth_hf.save_pretrained") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header; opening it also checks that the file is complete."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is truncated or corrupt ({err}). Re-download it (snapshot_download(..., force_download=True)) or "
            "re-save the model with smooth_hf.save_pretrained."
        ) from err

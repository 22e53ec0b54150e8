"""Save, reload and share compressed models: a folder (or Hub repo) that rebuilds without pickle or remote code.

A compressed checkpoint is a folder of plain files::

    model.safetensors        weights (safetensors only); factorised layers as <name>.down/up.*
    config.json              the base model's own config, as timm / transformers write it; for transformers
                             models with a ``quantization_config`` section holding the ranks (hf_quantizer.py)
    generation_config.json   transformers generative models only, as transformers writes it
    compression_config.json  LowRankConfig, with the rank of every factorised layer
    compression_report.json  parameter counts and per-layer table (informational, for the card)
    README.md                the model card

transformers models are written and read through transformers itself (``model.save_pretrained``, and
their class's ``from_pretrained`` with the smooth_hf quantizer: :mod:`smooth_hf.hub_transformers`), so
these folders are also what ``AutoModelFor*.from_pretrained`` loads after ``import smooth_hf``, and a
folder written by ``model.save_pretrained`` loads here too. timm has no such hook: following timm's
``adapt_model_from_file`` and peft's AdaLoRA ``rank_pattern``, the base architecture is built from its
JSON config, the recorded ranks replayed (:func:`smooth_hf.lowrank.apply_ranks`), then the weights
loaded. Both loads are strict: any mismatch is an error, never a silently half-initialised model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from . import modeling_resnet_cifar  # noqa: F401  (registers the CIFAR ResNets so their configs rebuild)
from .auto import build_from_config_dir
from .compat import base_library
from .dtypes import set_tensor_dtypes
from .hub_transformers import load_checkpoint, quantization_section, write_checkpoint
from .lowrank import CONFIG_NAME, CompressionReport, LowRankConfig, LowRankLayer, apply_ranks
from .model_card import ModelCardInfo, render_model_card

__all__ = [
    "CONFIG_NAME",
    "HF_CONFIG_NAME",
    "PICKLE_SUFFIXES",
    "REPORT_NAME",
    "WEIGHTS_NAME",
    "PushToHubError",
    "check_compressed",
    "check_save_target",
    "is_compressed_folder",
    "from_pretrained",
    "push_to_hub",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
REPORT_NAME = "compression_report.json"
CARD_NAME = "README.md"
GENERATION_CONFIG_NAME = "generation_config.json"
SHARD_INDEX_NAME = "model.safetensors.index.json"  # transformers' sharded save (max_shard_size), read by transformers
# Files a checkpoint may hold or not: an earlier push's that this one does not write are deleted from the repo.
STALE_ON_PUSH = [REPORT_NAME, GENERATION_CONFIG_NAME, SHARD_INDEX_NAME, "model-*-of-*.safetensors"]
OWN_FILES = (WEIGHTS_NAME, HF_CONFIG_NAME, GENERATION_CONFIG_NAME, CONFIG_NAME, REPORT_NAME, CARD_NAME)
# Extensions of pickle-based checkpoints: loading them can execute arbitrary code, so a folder holding
# any of them is refused rather than half-trusted.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class PushToHubError(OSError):
    """A push failed; ``stage`` says where: ``"create_repo"`` (repo creation / access) or ``"upload"``."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


# ---------------------------------------------------------------------------------------------- save


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


def _pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _write_checkpoint(
    model: nn.Module,
    folder: Path,
    library: str,
    config: LowRankConfig,
    card_text: str,
    model_args: dict[str, Any] | None = None,
) -> None:
    """Write every file of the checkpoint into ``folder`` (a fresh temporary folder)."""
    if library == "transformers":
        # Exactly what model.save_pretrained writes, so that AutoModelFor*.from_pretrained reads it too.
        write_checkpoint(model, folder)
    else:
        # save_model (not save_file) drops the duplicate names of tied tensors and records which name each
        # dropped one pointed to; from_pretrained re-ties by building the model first.
        save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_timm_config(model, folder / HF_CONFIG_NAME, model_args)
    config.save_pretrained(folder)
    report = getattr(model, "lowrank_report", None)
    if isinstance(report, CompressionReport):
        (folder / REPORT_NAME).write_text(
            json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    (folder / CARD_NAME).write_text(card_text, encoding="utf-8")
    for path in folder.iterdir():  # durable before the rename makes them visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())


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


def _move_into_place(tmp: Path, target: Path) -> None:
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
    last = (CONFIG_NAME, HF_CONFIG_NAME)  # what each loader needs first: without them a folder is refused
    for name in last:
        (target / name).unlink(missing_ok=True)
    new_files = {p.name for p in tmp.iterdir()}
    for name in OWN_FILES:
        if name in last:
            continue
        if name in new_files:
            os.replace(tmp / name, target / name)
        elif (target / name).exists():
            (target / name).unlink()  # a stale file of the previous save (e.g. its report) must not survive
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
    pickles = _pickle_files(target)
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


def _save(
    model: nn.Module,
    save_directory: str | os.PathLike,
    info: ModelCardInfo | None,
    location: str,
    model_args: dict[str, Any] | None = None,
) -> Path:
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
        _write_checkpoint(model, tmp, library, config, card_text, model_args)
        _move_into_place(tmp, target)
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

    Returns:
        The absolute path of the checkpoint folder, symlinks resolved (a link's target folder is written).

    Raises:
        ValueError: the model was not compressed (call :func:`smooth_hf.compress` first), the folder holds
            pickle files that :func:`from_pretrained` would refuse or a dense checkpoint that the save would
            replace (:func:`check_save_target`), or a timm constructor argument is not JSON (the message says
            to pass ``model_args``).
        TypeError: the model is neither timm nor transformers, so its architecture cannot be saved as JSON.
    """
    return _save(model, save_directory, model_card, location=str(save_directory), model_args=model_args)


# ---------------------------------------------------------------------------------------------- load


def _is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def _resolve_folder(
    name_or_path: str | os.PathLike, revision: str | None, token: str | bool | None, cache_dir: Any
) -> tuple[Path, bool]:
    """The local folder to load, and whether it was downloaded from the Hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, False
    name = os.fspath(name_or_path)
    if path.exists():
        raise ValueError(f"{name} is a file; from_pretrained expects a checkpoint folder written by save_pretrained")
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{name!r} is neither an existing folder nor a valid Hub repo id ('user/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    import smooth_hf

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            # Only what a reload reads: no pickle is ever downloaded, let alone unpickled.
            allow_patterns=HUB_PATTERNS,
            library_name="smooth_hf",
            library_version=getattr(smooth_hf, "__version__", None),
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(
            f"{name!r} is not a local folder and the Hub answered: {err}. Check the repo id and revision, and pass "
            "token=... (or log in) for a private repo."
        ) from err
    return Path(folder), True


def _check_folder(folder: Path, check_pickles: bool = True) -> None:
    """Refuse, with what to do, anything that is not a complete smooth_hf checkpoint."""
    present = {p.name for p in folder.iterdir()}
    if not present:
        raise FileNotFoundError(
            f"{folder} is empty: expected {WEIGHTS_NAME}, {HF_CONFIG_NAME} and {CONFIG_NAME} as written by "
            "smooth_hf.save_pretrained (or push_to_hub)."
        )
    pickles = _pickle_files(folder) if check_pickles else []
    if pickles:
        raise ValueError(
            f"{folder} contains pickle files ({', '.join(pickles)}): smooth_hf refuses to load folders with pickled "
            "checkpoints, because unpickling can execute arbitrary code. Remove them (the weights smooth_hf reads are "
            f"in {WEIGHTS_NAME}), or re-save the model with smooth_hf.save_pretrained."
        )
    if not is_compressed_folder(folder):
        if WEIGHTS_NAME in present or HF_CONFIG_NAME in present:
            raise ValueError(
                f"{folder} has no {CONFIG_NAME}: this is not a smooth_hf compressed checkpoint. A dense checkpoint "
                "loads with timm or transformers directly (e.g. transformers' AutoModel*.from_pretrained(path), or "
                "timm.create_model(..., pretrained_cfg_overlay=dict(file=...))), and can then be compressed with "
                "smooth_hf.compress."
            )
        raise FileNotFoundError(
            f"{folder} holds no smooth_hf checkpoint (found {', '.join(sorted(present)[:5])}); expected "
            f"{WEIGHTS_NAME}, {HF_CONFIG_NAME} and {CONFIG_NAME} as written by smooth_hf.save_pretrained."
        )
    if HF_CONFIG_NAME not in present:
        raise FileNotFoundError(
            f"{folder} has no {HF_CONFIG_NAME} (the base model's config), so the architecture cannot be rebuilt; "
            "re-save the model with smooth_hf.save_pretrained."
        )
    if WEIGHTS_NAME not in present and not (SHARD_INDEX_NAME in present and _written_by_transformers(folder)):
        raise FileNotFoundError(
            f"{folder} has no {WEIGHTS_NAME}: the weights are missing (smooth_hf reads safetensors only). Re-save the "
            "model with smooth_hf.save_pretrained, or re-download it (snapshot_download(..., force_download=True))."
        )


def is_compressed_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a smooth_hf compressed checkpoint (by its configs; the weights are not read)."""
    return (Path(folder) / CONFIG_NAME).is_file() or _written_by_transformers(Path(folder))


def _written_by_transformers(folder: Path) -> bool:
    """A compressed transformers model saved with ``model.save_pretrained``: the ranks are in config.json."""
    try:
        return quantization_section(json.loads((folder / HF_CONFIG_NAME).read_text(encoding="utf-8"))) is not None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model with smooth_hf.save_pretrained") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header; opening it also checks that the file is complete."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is truncated or corrupt ({err}). Re-download it (snapshot_download(..., force_download=True)) or "
            "re-save the model with smooth_hf.save_pretrained."
        ) from err


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
        f"The ranks in {folder / CONFIG_NAME} (and the architecture in {HF_CONFIG_NAME}) do not match the weights in "
        f"{folder / WEIGHTS_NAME}: {'; '.join(details)}. The files come from different saves or were edited; "
        "re-save the model with smooth_hf.save_pretrained."
    )


def _build_base(folder: Path, hf_config: dict[str, Any], device: str) -> nn.Module:
    """The dense architecture described by config.json, built under ``torch.device(device)``."""
    return build_from_config_dir(folder, device, hf_config)


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


def _load_folder(folder: Path, device: str | torch.device, check_pickles: bool = True) -> nn.Module:
    _check_folder(folder, check_pickles)
    config = None
    if (folder / CONFIG_NAME).is_file():
        try:
            config = LowRankConfig.from_dict(_read_json(folder / CONFIG_NAME))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{folder / CONFIG_NAME} is invalid: {err}") from err
    hf_config = _read_json(folder / HF_CONFIG_NAME)
    weights = folder / WEIGHTS_NAME
    if config is None and "model_type" not in hf_config:
        raise ValueError(f"{folder} has no {CONFIG_NAME}; re-save the model with smooth_hf.save_pretrained")
    if "model_type" in hf_config:
        if weights.is_file():  # else shards, which transformers reads (and checks) through their index
            _weight_shapes(weights)  # refuses a truncated file before anything is built
        # transformers models load through transformers itself, as AutoModelFor*.from_pretrained would.
        model = load_checkpoint(folder, hf_config, config).to(device)
    else:
        model = _load_timm(folder, hf_config, config, _weight_shapes(weights)).to(device)
    report = _load_report(folder)
    if report is not None:
        model.lowrank_report = report
    return model.eval()


def _load_timm(
    folder: Path, hf_config: dict[str, Any], config: LowRankConfig, shapes: dict[str, tuple[int, ...]]
) -> nn.Module:
    def structure(build_device: str) -> nn.Module:
        model = _build_base(folder, hf_config, build_device)
        try:
            apply_ranks(model, config.ranks)
        except ValueError as err:
            raise ValueError(
                f"The ranks in {folder / CONFIG_NAME} do not fit the architecture in {HF_CONFIG_NAME}: {err}"
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


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a compressed model saved by :func:`save_pretrained` or :func:`push_to_hub`, in eval mode.

    ``pretrained_model_name_or_path`` is a local folder or a Hub repo id (downloaded with
    ``snapshot_download``, JSON / safetensors / Markdown files only). The base architecture is rebuilt
    from ``config.json`` (timm or a transformers class; never remote code), the recorded ranks are
    replayed, and ``model.safetensors`` is loaded strictly. The returned model carries ``lowrank_config``.
    transformers models load through their class's own ``from_pretrained`` (``dtype="auto"``), so this
    equals ``AutoModelFor*.from_pretrained`` after ``import smooth_hf``, and also reads folders written
    by ``model.save_pretrained``.

    Raises:
        FileNotFoundError: empty folder, missing weights or config, unknown path / repo.
        ValueError: not a smooth_hf checkpoint (dense), pickle files in the folder, truncated weights, ranks
            that do not match the weights, or an unknown base architecture.
    """
    folder, downloaded = _resolve_folder(pretrained_model_name_or_path, revision, token, cache_dir)
    # A Hub snapshot holds only the files requested (no pickle is ever downloaded), but the cache folder may
    # hold more, fetched by other libraries for the same commit: those are never read, so they do not count.
    return _load_folder(folder, device, check_pickles=not downloaded)


# ---------------------------------------------------------------------------------------------- push


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model (smooth_hf)",
    model_card: ModelCardInfo | None = None,
    model_args: dict[str, Any] | None = None,
) -> str:
    """Save the compressed model into a temporary folder and upload it to the Hub repo ``repo_id``.

    The repo is created if needed (``exist_ok``). Nothing of the caller's is written: the checkpoint
    exists only in a temporary folder, removed afterwards whatever happens. The card's reload snippet
    names ``repo_id``. ``model_args``: as in :func:`save_pretrained` (timm models only).

    Returns:
        The URL of the commit.

    Raises:
        ValueError / TypeError: as :func:`save_pretrained`, before anything is sent.
        PushToHubError: the repo could not be created or accessed (``stage="create_repo"``), or the upload
            failed (``stage="upload"``); the Hub's error is chained.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    import smooth_hf

    with tempfile.TemporaryDirectory(prefix="smooth_hf-push-") as tmp:
        folder = _save(model, Path(tmp) / "checkpoint", model_card, location=repo_id, model_args=model_args)
        api = HfApi(token=token, library_name="smooth_hf", library_version=getattr(smooth_hf, "__version__", None))
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
                api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
        except Exception as err:
            hint = (
                "Check the repo id and that the token has write access to its namespace."
                if isinstance(err, HfHubHTTPError)
                else "Is the Hub reachable (network, proxy, HF_ENDPOINT)?"
            )
            raise PushToHubError(
                f"push_to_hub: could not create or access the repo {repo_id!r} on {api.endpoint} ({err}). {hint} "
                "Nothing was uploaded.",
                stage="create_repo",
            ) from err
        if repo_url.repo_id != repo_id:  # e.g. "name" resolved to "user/name": the card must show the real id
            _rewrite_card(model, folder, model_card, repo_url.repo_id)
        try:
            commit = api.upload_folder(
                repo_id=repo_url.repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                # What an earlier push may have left that this checkpoint does not have (a report, shards): stale
                # there, as a local save removes them (files this push uploads are never deleted).
                delete_patterns=STALE_ON_PUSH,
            )
        except Exception as err:
            raise PushToHubError(
                f"push_to_hub: the repo {repo_url} exists but uploading the checkpoint failed ({err}). Your local "
                "files and model are untouched; retry the push.",
                stage="upload",
            ) from err
    return commit.commit_url


def _rewrite_card(model: nn.Module, folder: Path, info: ModelCardInfo | None, location: str) -> None:
    (folder / CARD_NAME).write_text(str(render_model_card(model, info, location=location)), encoding="utf-8")

"""The Hub: downloading a compressed checkpoint and pushing one, through ``huggingface_hub``; nothing else.

:func:`from_pretrained` takes a local folder or a Hub repo id (downloaded with ``snapshot_download``, JSON,
safetensors, Markdown and tokenizer text files only: no pickle is ever downloaded) and loads it with
:func:`smooth_hf.checkpoint.compressed.load_compressed`. :func:`push_to_hub` writes the checkpoint into a temporary
folder (:func:`smooth_hf.checkpoint.compressed.write_checkpoint`) and uploads it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .checkpoint.card import ModelCardInfo, render_model_card
from .checkpoint.compressed import load_compressed, write_checkpoint
from .core.files import CARD_NAME, GENERATION_CONFIG_NAME, REPORT_NAME, SHARD_INDEX_NAME

__all__ = ["PushToHubError", "from_pretrained", "push_to_hub"]

# Files a checkpoint may hold or not: an earlier push's that this one does not write are deleted from the repo.
STALE_ON_PUSH = [REPORT_NAME, GENERATION_CONFIG_NAME, SHARD_INDEX_NAME, "model-*-of-*.safetensors"]
# What a reload reads: weights, configs, the card, and a processor's files (tokenizer vocabularies are text or
# sentencepiece models). Never a pickle.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class PushToHubError(OSError):
    """A push failed; ``stage`` says where: ``"create_repo"`` (repo creation / access) or ``"upload"``."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


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

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            # Only what a reload reads: no pickle is ever downloaded, let alone unpickled.
            allow_patterns=HUB_PATTERNS,
            library_name="smooth_hf",
            library_version=__version__,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(
            f"{name!r} is not a local folder and the Hub answered: {err}. Check the repo id and revision, and pass "
            "token=... (or log in) for a private repo."
        ) from err
    return Path(folder), True


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
    return load_compressed(folder, device, check_pickles=not downloaded)


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
    processor: Any = None,
) -> str:
    """Save the compressed model into a temporary folder and upload it to the Hub repo ``repo_id``.

    The repo is created if needed (``exist_ok``). Nothing of the caller's is written: the checkpoint
    exists only in a temporary folder, removed afterwards whatever happens. The card's reload snippet
    names ``repo_id``. ``model_args`` (timm models only) and ``processor``: as in :func:`save_pretrained`.

    Returns:
        The URL of the commit.

    Raises:
        ValueError / TypeError: as :func:`save_pretrained`, before anything is sent.
        PushToHubError: the repo could not be created or accessed (``stage="create_repo"``), or the upload
            failed (``stage="upload"``); the Hub's error is chained.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="smooth_hf-push-") as tmp:
        folder = write_checkpoint(model, Path(tmp) / "checkpoint", model_card, repo_id, model_args, processor)
        api = HfApi(token=token, library_name="smooth_hf", library_version=__version__)
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

"""save_pretrained / from_pretrained of compressed models: exact round trips, refused folders, atomic saves.

Models are tiny and compressed once per session (``conftest.compressed_model``); every check compares
logits with ``torch.equal`` (CPU, float32): a reload must give back the very same function, not an
approximation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import COMPRESSED_MODELS, compressed_model, logits, tiny_resnet14
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import smooth_hf.checkpoint.compressed as compressed
import smooth_hf.checkpoint.dense as dense
import smooth_hf.checkpoint.folders as folders
from smooth_hf.checkpoint.compressed import save_pretrained
from smooth_hf.core.files import (
    COMPRESSION_CONFIG_NAME,
    PICKLE_SUFFIXES,
    REPORT_NAME,
    SHARD_INDEX_NAME,
    WEIGHTS_NAME,
)
from smooth_hf.hub import from_pretrained
from smooth_hf.lowrank import LowRankConfig, compress


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", COMPRESSED_MODELS)
def test_round_trip_is_exact(name, tmp_path):
    model, inputs = compressed_model(name)
    expected = logits(model, inputs)
    folder = save_pretrained(model, tmp_path / "ckpt")

    assert folder == (tmp_path / "ckpt").resolve()
    assert {WEIGHTS_NAME, "config.json", COMPRESSION_CONFIG_NAME, "README.md"} <= set(digest(folder))
    assert not any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())

    loaded = from_pretrained(folder)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(logits(loaded, inputs), expected)
    assert loaded.lowrank_config.to_dict() == model.lowrank_config.to_dict()
    assert loaded.lowrank_config.ranks, "the test models must actually be factorised"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert loaded.lowrank_report.to_dict() == model.lowrank_report.to_dict()

    # A reloaded model saves the same checkpoint: nothing is lost or re-derived differently on the way. (The
    # weights file is compared tensor by tensor: safetensors writes its metadata map in no fixed order.)
    again = save_pretrained(loaded, tmp_path / "again")
    for file in (COMPRESSION_CONFIG_NAME, "config.json", REPORT_NAME):
        assert (again / file).read_bytes() == (folder / file).read_bytes(), file
    first, second = load_file(folder / WEIGHTS_NAME), load_file(again / WEIGHTS_NAME)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert safetensors_metadata(folder / WEIGHTS_NAME) == safetensors_metadata(again / WEIGHTS_NAME)


def test_gpt2_tied_lm_head_stays_tied(tmp_path):
    model, inputs = compressed_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight  # compress keeps tied weights dense
    loaded = from_pretrained(save_pretrained(model, tmp_path / "gpt2"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert (tmp_path / "gpt2" / "generation_config.json").is_file()


def test_save_does_not_modify_the_model(tmp_path):
    model, inputs = compressed_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    architectures = model.config.architectures
    save_pretrained(model, tmp_path / "bert")
    assert model.config.architectures == architectures
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_timm_data_config_survives(tmp_path):
    model, _ = compressed_model("timm-resnet14_cifar")
    loaded = from_pretrained(save_pretrained(model, tmp_path / "r"))
    assert loaded.pretrained_cfg["input_size"][0] == 1
    assert loaded.pretrained_cfg["architecture"] == "resnet14_cifar"


def test_meta_build_falls_back_when_buffers_are_not_in_the_file(tmp_path, monkeypatch):
    """A timm model with a non-persistent buffer cannot come from the meta device: the CPU build is used."""
    model, inputs = compressed_model("timm-resnet14_cifar")
    folder = save_pretrained(model, tmp_path / "r")
    real, devices = compressed.build_from_config_dir, []

    def build_with_buffer(folder, device, hf_config):
        devices.append(device)
        built = real(folder, device, hf_config)
        built.register_buffer("scale", torch.ones(1, device=device), persistent=False)
        return built

    monkeypatch.setattr(compressed, "build_from_config_dir", build_with_buffer)
    loaded = from_pretrained(folder)
    assert devices == ["meta", "cpu"]
    assert loaded.scale.device.type == "cpu" and torch.equal(loaded.scale, torch.ones(1))
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


# ---------------------------------------------------------------------------------------------- refused folders


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was (wrongly) loaded."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _case_empty(f: Path) -> None:
    for p in f.iterdir():
        p.unlink()


def _case_dense(f: Path) -> None:
    (f / COMPRESSION_CONFIG_NAME).unlink()


def _case_missing_weights(f: Path) -> None:
    (f / WEIGHTS_NAME).unlink()


def _case_truncated_weights(f: Path) -> None:
    data = (f / WEIGHTS_NAME).read_bytes()
    (f / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _case_truncated_header(f: Path) -> None:
    (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:40])


def _case_missing_config(f: Path) -> None:
    (f / "config.json").unlink()


def _case_rank_mismatch(f: Path) -> None:
    def edit(d: dict) -> None:
        d["ranks"]["stages.0.0.conv1"] -= 1

    _edit_json(f / COMPRESSION_CONFIG_NAME, edit)


def _case_rank_unknown_module(f: Path) -> None:
    _edit_json(f / COMPRESSION_CONFIG_NAME, lambda d: d["ranks"].update({"stages.9.conv": 2}))


def _case_rank_dropped(f: Path) -> None:
    _edit_json(f / COMPRESSION_CONFIG_NAME, lambda d: d["ranks"].pop("fc"))


def _case_invalid_compression_json(f: Path) -> None:
    (f / COMPRESSION_CONFIG_NAME).write_text("{not json")


def _case_unknown_timm_architecture(f: Path) -> None:
    _edit_json(f / "config.json", lambda d: d.update({"architecture": "no_such_model_v9"}))


def _case_unknown_transformers_architecture(f: Path) -> None:
    (f / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["NoSuchModelForMagic"]}))


def _case_remote_code_class(f: Path) -> None:
    # Only classes shipped with transformers are built; a name that resolves to something else is refused.
    (f / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["AutoConfig"]}))


def _case_neither_library(f: Path) -> None:
    (f / "config.json").write_text(json.dumps({"hidden_size": 8}))


def _case_pickle(f: Path) -> None:
    boom = _Boom()
    _Boom.marker = f.parent / "UNPICKLED"
    (f / "pytorch_model.bin").write_bytes(pickle.dumps(boom))


def _case_checkpoint_pickle(f: Path) -> None:
    (f / "optimizer.pt").write_bytes(b"\x80\x04not really")


ERROR_CASES = [
    # (case id, how to break a good checkpoint, exception type, key phrase of the message)
    ("empty folder", _case_empty, FileNotFoundError, "is empty"),
    ("dense checkpoint", _case_dense, ValueError, "not a smooth_hf compressed checkpoint"),
    ("missing weights", _case_missing_weights, FileNotFoundError, f"no {WEIGHTS_NAME}"),
    ("truncated weights", _case_truncated_weights, ValueError, "truncated or corrupt"),
    ("truncated header", _case_truncated_header, ValueError, "truncated or corrupt"),
    ("missing config.json", _case_missing_config, FileNotFoundError, "no config.json"),
    ("rank does not match weights", _case_rank_mismatch, ValueError, "do not match the weights"),
    ("rank for unknown module", _case_rank_unknown_module, ValueError, "do not fit the architecture"),
    ("rank dropped from config", _case_rank_dropped, ValueError, "do not match the weights"),
    ("invalid compression_config", _case_invalid_compression_json, ValueError, "not valid JSON"),
    ("unknown timm architecture", _case_unknown_timm_architecture, ValueError, "unknown base architecture"),
    ("unknown transformers class", _case_unknown_transformers_architecture, ValueError, "unknown base architecture"),
    ("non-model transformers attr", _case_remote_code_class, ValueError, "unknown base architecture"),
    ("config of no known library", _case_neither_library, ValueError, "unknown base architecture"),
    ("pickle weights present", _case_pickle, ValueError, "pickle"),
    ("pickle checkpoint present", _case_checkpoint_pickle, ValueError, "refuses to load folders with pickled"),
]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    model, _ = compressed_model("timm-resnet14_cifar")
    return save_pretrained(model, tmp_path_factory.mktemp("good") / "ckpt")


@pytest.mark.parametrize(("case", "breaker", "error", "phrase"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_refused_folders(good_checkpoint, tmp_path, case, breaker, error, phrase):
    folder = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, folder)
    breaker(folder)
    with pytest.raises(error, match=phrase) as info:
        from_pretrained(folder)
    assert str(folder) in str(info.value), "the message must say which folder is wrong"
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was unpickled"


def test_path_that_is_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a valid Hub repo id"):
        from_pretrained(tmp_path / "does" / "not" / "exist")


def test_file_instead_of_folder(good_checkpoint):
    with pytest.raises(ValueError, match="expects a checkpoint folder"):
        from_pretrained(good_checkpoint / WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------------- refused saves


def test_save_refuses_uncompressed_model(tmp_path):
    model = tiny_resnet14()
    with pytest.raises(ValueError, match=r"call smooth_hf\.compress"):
        save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_refuses_plain_module(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    compress(model, LowRankConfig(rank_ratio=0.25))
    with pytest.raises(TypeError, match="cannot be rebuilt from JSON") as info:
        save_pretrained(model, tmp_path / "x")
    assert "state dict" in str(info.value) and "apply_ranks" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_save_refuses_folder_with_pickles(tmp_path):
    model, _ = compressed_model("timm-resnet14_cifar")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "training_args.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle files"):
        save_pretrained(model, tmp_path / "out")


def test_save_refuses_edited_structure(tmp_path):
    import copy

    model = copy.deepcopy(compressed_model("timm-resnet14_cifar")[0])
    model.lowrank_config.ranks["stages.0.0.conv1"] += 1
    with pytest.raises(ValueError, match="does not describe the model"):
        save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- atomic saves


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture
def two_models():
    """The compressed resnet and a second, different one with the same structure."""
    model_a, inputs = compressed_model("timm-resnet14_cifar")
    import copy

    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        for p in model_b.parameters():
            p.mul_(1.5)
    return model_a, model_b, inputs


@pytest.mark.parametrize("foreign_file", [False, True], ids=["checkpoint-only folder", "folder with other files"])
def test_failed_save_keeps_previous_checkpoint(two_models, tmp_path, monkeypatch, foreign_file):
    model_a, model_b, inputs = two_models
    target = tmp_path / "run" / "ckpt"
    save_pretrained(model_a, target)
    if foreign_file:
        (target / "notes.txt").write_text("keep me")
    before = digest(target)

    def half_written(model, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(dense, "save_model", half_written)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(model_b, target)

    assert digest(target) == before
    assert _siblings(target) == [], "a temporary folder was left behind"
    assert torch.equal(logits(from_pretrained(target), inputs), logits(model_a, inputs))


def test_failure_while_writing_config_keeps_previous_checkpoint(two_models, tmp_path, monkeypatch):
    model_a, model_b, inputs = two_models
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    before = digest(target)
    import timm.models._hub

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(timm.models._hub, "save_config_for_hf", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        save_pretrained(model_b, target)
    assert digest(target) == before
    assert _siblings(target) == []


def test_failed_swap_puts_the_old_folder_back(two_models, tmp_path, monkeypatch):
    model_a, model_b, inputs = two_models
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    before = digest(target)
    real_rename = folders.os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old folder was moved aside; moving the new one in fails
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(model_b, target)
    monkeypatch.undo()
    assert digest(target) == before
    assert _siblings(target) == []


@pytest.mark.parametrize("foreign_file", [False, True], ids=["checkpoint-only folder", "folder with other files"])
def test_successful_overwrite(two_models, tmp_path, foreign_file):
    model_a, model_b, inputs = two_models
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    if foreign_file:
        (target / "notes.txt").write_text("keep me")
    (target / REPORT_NAME).unlink()  # must come back from the new save
    save_pretrained(model_b, target)
    assert torch.equal(logits(from_pretrained(target), inputs), logits(model_b, inputs))
    assert (target / REPORT_NAME).is_file()
    assert ((target / "notes.txt").read_text() == "keep me") if foreign_file else not (target / "notes.txt").exists()
    assert _siblings(target) == []


def test_save_through_a_symlink_writes_into_the_folder_it_points_to(two_models, tmp_path):
    """A "latest" link to a checkpoint folder: the new save lands in that folder and the link stays a link."""
    model_a, model_b, inputs = two_models
    real, link = tmp_path / "run-7", tmp_path / "latest"
    save_pretrained(model_a, real)
    link.symlink_to(real, target_is_directory=True)
    assert save_pretrained(model_b, link) == real.resolve()
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-7"]
    assert torch.equal(logits(from_pretrained(real), inputs), logits(model_b, inputs))


def test_save_caught_half_way_in_a_shared_folder_is_refused_by_both_loaders(tmp_path, monkeypatch):
    """In a folder with other files the checkpoint's files are replaced one by one. Caught in between, the folder
    must not load new weights with the old config.json (its labels, its ranks) in either loader."""
    from transformers import AutoModelForSequenceClassification

    model_a, inputs = compressed_model("bert")
    model_b = copy.deepcopy(model_a)
    target = tmp_path / "run"
    save_pretrained(model_a, target)
    (target / "vocab.txt").write_text("kept")
    real_replace, moved = folders.os.replace, []

    def interrupted(src, dst):
        moved.append(Path(dst).name)
        if len(moved) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were moved in
        return real_replace(src, dst)

    monkeypatch.setattr(folders.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model_b, target)
    monkeypatch.undo()
    assert moved[0] == WEIGHTS_NAME and not (target / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        from_pretrained(target)
    with pytest.raises((OSError, ValueError)):
        AutoModelForSequenceClassification.from_pretrained(target)
    save_pretrained(model_b, target)  # the next save completes it
    assert torch.equal(logits(from_pretrained(target), inputs), logits(model_b, inputs))
    assert (target / "vocab.txt").read_text() == "kept"


@pytest.mark.parametrize("foreign_file", [False, True], ids=["checkpoint-only folder", "folder with other files"])
def test_save_over_a_sharded_transformers_checkpoint_removes_its_shards(tmp_path, foreign_file):
    """Stale shards (and their index) of an earlier model.save_pretrained must not outlive a new save."""
    model, inputs = compressed_model("bert")
    target = tmp_path / "ckpt"
    model.save_pretrained(target, max_shard_size="20KB")
    if foreign_file:
        (target / "vocab.txt").write_text("kept")
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 1 and (target / SHARD_INDEX_NAME).is_file()
    assert torch.equal(logits(from_pretrained(target), inputs), logits(model, inputs))  # sharded folders load
    save_pretrained(model, target)
    assert not list(target.glob("model-*.safetensors")) and not (target / SHARD_INDEX_NAME).exists()
    assert torch.equal(logits(from_pretrained(target), inputs), logits(model, inputs))
    assert (target / "vocab.txt").is_file() == foreign_file


def test_save_refuses_a_folder_holding_a_dense_checkpoint(two_models, tmp_path):
    """The trained dense model is what a compression starts from: saving the cut over it would lose it."""
    from smooth_hf.checkpoint.dense import save_dense

    model_a, _, _ = two_models
    dense = tmp_path / "run"
    save_dense(tiny_resnet14(), dense)
    before = digest(dense)
    with pytest.raises(ValueError, match="holds a dense checkpoint.*run-lowrank"):
        save_pretrained(model_a, dense)
    assert digest(dense) == before and _siblings(dense) == []

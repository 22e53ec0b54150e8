"""Text-classification data through ``datasets``: a ``save_to_disk`` folder, a CSV / JSON / Parquet file, or a Hub id.

Every source ends as a ``DatasetDict`` with ``train`` and ``test`` splits and the columns ``text`` and ``label``
(the same split and subset rules as images: :mod:`smooth_hf.data.splits`); :func:`prepare_text_splits` tokenises
them with the checkpoint's own tokenizer into ``input_ids``, ``attention_mask`` (and ``token_type_ids``) and
``labels``, unpadded: a ``DataCollatorWithPadding`` pads each batch to its longest sentence
(:func:`text_collator`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, load_dataset, load_from_disk

from .splits import LABEL_COLUMNS, find_column, select_subset, train_test_splits

__all__ = [
    "DEFAULT_MAX_SEQ_LENGTH",
    "TEXT_COLUMNS",
    "load_source",
    "load_text_classification",
    "prepare_text_splits",
    "text_collator",
    "tokenizer_for",
]

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
DEFAULT_MAX_SEQ_LENGTH = 128
# File suffix -> the datasets builder that reads it.
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".txt": "text", "": "text"}  # a file without a suffix is plain text (one example a line)


def load_source(dataset_name: str, dataset_config_name: str | None = None, cache_dir: str | None = None) -> Any:
    """A text dataset by name: a ``save_to_disk`` folder, a CSV/TSV/JSON/JSONL/Parquet/plain-text file, or a Hub id."""
    path = Path(dataset_name)
    if path.is_dir():
        if not ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            raise ValueError(f"{dataset_name} is a folder but not one datasets' save_to_disk wrote (no dataset_dict.json "
                             "or dataset_info.json): give that folder, a CSV/JSON/Parquet file, or a Hub dataset id")
        return load_from_disk(str(path))
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{dataset_name}: a text dataset file must be one of {', '.join(_FILE_BUILDERS)} (the "
                             "suffix says how to read it)")
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(builder, data_files=str(path), cache_dir=cache_dir, **options)
    return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)


def load_text_classification(
    dataset_name: str,
    dataset_config_name: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    eval_split_ratio: float | None = None,
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load a text-classification dataset as ``DatasetDict(train, test)`` with ``text`` / ``label`` columns.

    ``dataset_name`` is a ``save_to_disk`` folder, a ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file
    (one split: a seeded ``eval_split_ratio`` of it becomes the test split) or a Hub id. Labels that are not a
    ``ClassLabel`` (strings like ``"positive"``, or ints like ``-1`` / ``1``) become one, classes in sorted order.
    """
    data = train_test_splits(load_source(dataset_name, dataset_config_name, cache_dir), dataset_name, eval_split_ratio,
                             seed)
    columns = data["train"].column_names
    text = find_column(columns, text_column, TEXT_COLUMNS, "text", "--text_column_name")
    label = find_column(columns, label_column, LABEL_COLUMNS, "label", "--label_column_name")
    data = data.select_columns([text, label])
    if text != "text":
        data = data.rename_column(text, "text")
    if label != "label":
        data = data.rename_column(label, "label")
    if not isinstance(data["train"].features["label"], ClassLabel):
        # One class list for both splits (the sorted labels of both), so that a label means the same in each.
        names = sorted({str(v) for split in data.values() for v in split["label"]}, key=_natural)
        feature = ClassLabel(names=names)
        data = DatasetDict({k: v.map(lambda b: {"label": [feature.str2int(str(x)) for x in b["label"]]}, batched=True,
                                     keep_in_memory=True).cast_column("label", feature)
                            for k, v in data.items()})
    return data


def _natural(value: str) -> tuple:
    """Numbers in numeric order (``-1`` before ``1`` before ``10``), then other strings."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def tokenizer_for(source: str | os.PathLike) -> Any:
    """The tokenizer saved with a transformers checkpoint (Hub id or folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"{source} has no tokenizer that AutoTokenizer can load ({err}); a text model needs the "
                         "tokenizer of its checkpoint (recipes/train.py saves it with every model it writes)") from err


def prepare_text_splits(
    data: str | DatasetDict,
    tokenizer: Any = None,
    *,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    dataset_config_name: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    eval_split_ratio: float | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load -> seeded subsets -> tokenised: the ``train`` and ``test`` splits a recipe trains and scores on.

    As :func:`smooth_hf.data.prepare_image_splits`: ``data`` is a dataset name (loaded with
    :func:`load_text_classification`) or splits already loaded; without ``tokenizer`` the splits keep their raw
    ``text`` / ``label`` columns (to read the label names a model is built for, then to be passed back in).
    Tokenised examples are truncated to ``max_seq_length`` tokens and not padded.
    """
    if isinstance(data, str):
        data = load_text_classification(data, dataset_config_name, text_column, label_column, eval_split_ratio,
                                        seed=seed, cache_dir=cache_dir)
    splits = DatasetDict({
        "train": select_subset(data["train"], max_train_samples, seed),
        "test": select_subset(data["test"], max_eval_samples, seed),
    })
    if tokenizer is None:
        return splits

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {**tokenizer(batch["text"], truncation=True, max_length=max_seq_length), "labels": batch["label"]}

    # In memory: a dataset loaded from disk would otherwise get cache files written into the user's folder. The
    # labels keep their class names (a ClassLabel), which the model's id2label and the card read.
    return DatasetDict({name: split.map(tokenize, batched=True, remove_columns=split.column_names, keep_in_memory=True)
                        .cast_column("labels", split.features["label"]) for name, split in splits.items()})


def text_collator(tokenizer: Any) -> Any:
    """Pads each batch to its longest example (``DataCollatorWithPadding``): what training and scoring batch with."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)

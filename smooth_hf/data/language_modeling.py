"""Text for causal language models: calibration sequences and held-out text, as ``run_clm.py`` prepares them.

A dataset with a text column (a ``save_to_disk`` folder, a CSV/JSON/Parquet or plain-text file, a Hub id:
:func:`smooth_hf.data.text.load_source`) gets the usual train/test splits (:mod:`smooth_hf.data.splits`); each split's
texts are tokenised, joined (with the tokenizer's end-of-sequence token between texts) and cut into sequences of
``sequence_length`` tokens, the remainder dropped, as transformers' ``run_clm.py`` groups texts. Every sequence is
full length, so batches need no padding; subsets are the first ``n`` sequences of a seeded shuffle
(:func:`~smooth_hf.data.splits.select_subset`), the same rule as every other dataset.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from datasets import DatasetDict

from .splits import find_column, select_subset, train_test_splits
from .text import TEXT_COLUMNS, load_source

__all__ = ["DEFAULT_SEQUENCE_LENGTH", "prepare_language_modeling_splits"]

DEFAULT_SEQUENCE_LENGTH = 512


def prepare_language_modeling_splits(
    data: str | DatasetDict,
    tokenizer: Any,
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    dataset_config_name: str | None = None,
    text_column: str | None = None,
    eval_split_ratio: float | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """``train`` and ``test`` splits of ``input_ids`` / ``attention_mask`` / ``labels`` sequences of ``sequence_length``
    tokens (``labels`` = ``input_ids``: the model shifts them), subsets by sequence.

    Raises:
        ValueError: no text column, a sequence length below 2, or a split too short for one sequence.
    """
    if not isinstance(sequence_length, int) or sequence_length < 2:
        raise ValueError(f"the sequence length must be an integer >= 2 (tokens per sequence), got {sequence_length!r}")
    if isinstance(data, str):
        name = data
        data = train_test_splits(load_source(data, dataset_config_name, cache_dir), data, eval_split_ratio, seed)
    else:
        name = "the dataset"
    column = find_column(data["train"].column_names, text_column, TEXT_COLUMNS, "text", "--text_column_name")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def sequences(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer([t for t in batch[column] if t and t.strip()], add_special_tokens=False)["input_ids"]
        joined = list(chain.from_iterable(text + separator for text in ids))
        usable = len(joined) // sequence_length * sequence_length
        blocks = [joined[i : i + sequence_length] for i in range(0, usable, sequence_length)]
        return {"input_ids": blocks, "attention_mask": [[1] * sequence_length for _ in blocks], "labels": blocks}

    splits = {}
    for split in ("train", "test"):
        # One batch per split: texts are joined across the whole split before they are cut into sequences.
        grouped = data[split].map(sequences, batched=True, batch_size=None, remove_columns=data[split].column_names,
                                  keep_in_memory=True)
        if len(grouped) == 0:
            raise ValueError(f"the {split} split of {name} holds fewer than {sequence_length} tokens: use more text or "
                             "a shorter --max_seq_length")
        limit = max_train_samples if split == "train" else max_eval_samples
        splits[split] = select_subset(grouped, limit, seed).with_format("torch")
    return DatasetDict(splits)

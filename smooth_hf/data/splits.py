"""The split and subset rules every dataset follows, image or text: one place, so every recipe picks the same examples.

* a dataset without a test split gets a seeded held-out split of its train split (``validation`` is taken as the
  test split when there is one);
* every subset is the first ``n`` of a shuffle seeded by ``seed`` (:func:`select_subset`), so the same
  ``max_eval_samples`` and seed give the same evaluation examples in ``recipes/train.py``, ``recipes/compress.py``
  and the benchmarks.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EVAL_SPLIT_RATIO", "LABEL_COLUMNS", "find_column", "select_subset", "train_test_splits"]

DEFAULT_EVAL_SPLIT_RATIO = 0.1
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


def find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    """``wanted`` if it is a column, else the first of ``candidates`` that is one; or a clear error naming ``flag``."""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{flag} {wanted!r} is not a column of the dataset; its columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"the dataset has no {what} column (looked for {list(candidates)}; it has {columns}). "
                     f"Name it with {flag}.")


def train_test_splits(
    data: Dataset | DatasetDict, dataset_name: str, eval_split_ratio: float | None, seed: int
) -> DatasetDict:
    """``DatasetDict(train, test)`` of a loaded dataset: its own test (or validation) split, else a seeded held-out
    ``eval_split_ratio`` of its train split (default :data:`DEFAULT_EVAL_SPLIT_RATIO`)."""
    ratio_given = eval_split_ratio is not None
    if eval_split_ratio is None:
        eval_split_ratio = DEFAULT_EVAL_SPLIT_RATIO
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    if "train" not in data:
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split (it has {list(data)}): save it as "
                         "DatasetDict({'train': ..., 'test': ...}), or rename its training split to 'train'")
    if ("test" in data or "validation" in data) and ratio_given:
        logger.warning("dataset %r has its own %s split: the split ratio %s (--train_val_split) is not used",
                       dataset_name, "test" if "test" in data else "validation", eval_split_ratio)
    if "test" not in data:
        if "validation" in data:
            data["test"] = data.pop("validation")
        else:
            data = DatasetDict(_held_out_split(data["train"], eval_split_ratio, seed))
    return data


def select_subset(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """The first ``max_samples`` examples of a shuffle seeded by ``seed`` (all of them when ``None``).

    The one rule for every subset in the project: the same ``max_eval_samples`` and seed give the same
    evaluation examples in ``recipes/train.py``, ``recipes/compress.py`` and the benchmarks.
    """
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"a subset of {max_samples} examples is empty: give a number >= 1, or leave the limit out")
    return dataset.select(_permutation(len(dataset), seed)[:max_samples], keep_in_memory=True)


# ``Dataset.shuffle`` / ``train_test_split`` write index files next to a dataset loaded from disk -- into the
# user's own folder -- and ignore ``keep_in_memory`` there (datasets 5.2). The same permutations, drawn here
# and selected in memory, give the same examples and write nothing.
def _permutation(n: int, seed: int) -> np.ndarray:
    """``Dataset.shuffle(seed=seed)``'s order."""
    return np.random.default_rng(seed).permutation(n)


def _held_out_split(dataset: Dataset, test_size: float, seed: int) -> dict[str, Dataset]:
    """``Dataset.train_test_split(test_size=test_size, seed=seed)``'s two splits."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"--train_val_split must be a fraction in (0, 1), got {test_size!r}")
    n_test = math.ceil(test_size * len(dataset))
    if not 0 < n_test < len(dataset):
        raise ValueError(f"a {test_size} test split of {len(dataset)} examples leaves one side empty: use a larger "
                         "dataset or another --train_val_split")
    permutation = _permutation(len(dataset), seed)
    return {"train": dataset.select(permutation[n_test:], keep_in_memory=True),
            "test": dataset.select(permutation[:n_test], keep_in_memory=True)}

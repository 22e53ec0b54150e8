"""Arguments the recipes share, declared once (as trl's ``ScriptArguments``), and the record of the data a
checkpoint was trained on.

``HfArgumentParser((ModelArguments, TrainingDataArguments, SmoothTrainingArguments))`` is
``recipes/train.py``'s command line; ``recipes/compress.py`` takes ``DataArguments`` and
``LowRankArguments``. ``recipes/train.py`` writes :data:`DATA_RECORD_NAME` next to the weights, and
``recipes/compress.py`` reads it, so a checkpoint is evaluated on the data it was trained on unless
the user names other data.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from ..data.images import dataset_identity, label_names
from ..data.text import DEFAULT_MAX_SEQ_LENGTH
from ..lowrank import LowRankConfig

__all__ = [
    "DATA_RECORD_NAME",
    "DEFAULT_DATASET",
    "DataArguments",
    "LowRankArguments",
    "ModelArguments",
    "TrainingDataArguments",
    "load_data_record",
    "resolve_data_arguments",
    "save_data_record",
]

logger = logging.getLogger(__name__)

DATA_RECORD_NAME = "data_args.json"
CROP_PADDING = 4  # --random_crop_padding's default: CIFAR's
DEFAULT_DATASET = "fashion_mnist"
DEFAULT_SEED = 42  # TrainingArguments' default seed, so both recipes pick the same subsets by default

_DATASET_HELP = (
    "Images: fashion_mnist (local Debian files when installed, else the Hub), cifar10, any Hub image-classification "
    "dataset, a save_to_disk folder, or a folder of class sub-folders. Text (for a transformers text checkpoint): a "
    "save_to_disk folder, a CSV/TSV/JSON/JSONL/Parquet file, or a Hub dataset, with text and label columns."
)


@dataclass
class ModelArguments:
    """Which model to train: a timm name, a transformers checkpoint, or a transformers type from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A timm model name (e.g. resnet18_cifar, resnet14_cifar, timm/resnet18.a1_in1k), a "
                  "transformers checkpoint (Hub id or local folder), or a folder recipes/train.py wrote."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train a transformers architecture of this type from scratch (e.g. vit) instead."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value overrides of the model config / timm kwargs, e.g. "
                  "'hidden_size=128,num_hidden_layers=4'."},
    )
    from_scratch: bool = field(default=False, metadata={"help": "Do not load pretrained weights."})


@dataclass
class DataArguments:
    """Which images or sentences, in which columns, and how many test examples to score.

    ``None`` fields of ``recipes/compress.py`` are filled from the checkpoint's data record
    (:func:`resolve_data_arguments`).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Evaluation data: {_DATASET_HELP} Default: the dataset the checkpoint was trained on "
                  f"(recorded by recipes/train.py in {DATA_RECORD_NAME})."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Text column of a text dataset (default: detected: text, sentence, ...)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Text models: sentences are tokenised by the checkpoint's tokenizer and truncated to this "
                  f"many tokens (each batch is padded to its longest sentence). Default: the training run's, else "
                  f"{DEFAULT_MAX_SEQ_LENGTH}."},
    )
    train_val_split: float | None = field(
        default=None,
        metadata={"help": "Test fraction split off the train split when the dataset has no test split (default: "
                  "a tenth; compress.py: the training run's), seeded by --seed."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Score this many test images: the first of a shuffle seeded by --seed, the same images "
                  "in every recipe (default: the whole test split)."},
    )

    def split_kwargs(self, text: bool = False) -> dict[str, Any]:
        """Keyword arguments of :func:`smooth_hf.data.prepare_image_splits` (load and subsets), or with ``text`` of
        :func:`smooth_hf.data.text.prepare_text_splits`."""
        column = {"text_column": self.text_column_name} if text else {"image_column": self.image_column_name}
        return {
            "data": self.dataset_name, "dataset_config_name": self.dataset_config_name, **column,
            "label_column": self.label_column_name, "eval_split_ratio": self.train_val_split,
            "max_eval_samples": self.max_eval_samples,
        }


@dataclass
class TrainingDataArguments(DataArguments):
    """:class:`DataArguments` plus what only training uses."""

    dataset_name: str = field(default=DEFAULT_DATASET, metadata={"help": _DATASET_HELP})
    max_seq_length: int = field(
        default=DEFAULT_MAX_SEQ_LENGTH,
        metadata={"help": "Text models: sentences are tokenised by the checkpoint's tokenizer and truncated to this "
                  "many tokens (each batch is padded to its longest sentence)."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on this many images: the first of a shuffle seeded by --seed (quick runs)."},
    )
    augment: bool = field(
        default=False,
        metadata={"help": "Random horizontal flips of the training images, and random crops of the image padded by "
                  "--random_crop_padding pixels."},
    )
    random_crop_padding: int = field(
        default=CROP_PADDING,
        metadata={"help": "With --augment: pad by this many pixels (zeros) before the random crop; 0 = flips only."},
    )

    def __post_init__(self) -> None:
        if self.random_crop_padding != CROP_PADDING and not self.augment:
            logger.warning("--random_crop_padding does nothing without --augment (no training augmentation)")

    def split_kwargs(self, text: bool = False) -> dict[str, Any]:
        return {**super().split_kwargs(text), "max_train_samples": self.max_train_samples}

    def transform_kwargs(self) -> dict[str, Any]:
        """The augmentation keywords of :func:`smooth_hf.data.prepare_image_splits`."""
        return {"augment": self.augment, "crop_padding": self.random_crop_padding}


def _config_default(name: str) -> Any:
    source = next(f for f in fields(LowRankConfig) if f.name == name)
    return source.default if source.default is not MISSING else None


def _low_rank_field(name: str, planned: bool = False) -> Any:
    """A command-line field with ``LowRankConfig``'s own default and help, so the two cannot drift apart; ``planned``:
    left unset (None), it takes the value the training plan used (``recipes/compress.py``), else the config's."""
    source = next(f for f in fields(LowRankConfig) if f.name == name)
    help_text = source.metadata["help"]
    if planned:
        help_text += (f" Default: what a model trained for a cut was planned with (training_args.json), else "
                      f"{_config_default(name)!r}.")
    return field(default=None if planned else _config_default(name), metadata={"help": help_text})


@dataclass
class LowRankArguments:
    """The :class:`~smooth_hf.lowrank.LowRankConfig` fields a command line sets (one rank rule, the targets)."""

    param_reduction: float | None = _low_rank_field("param_reduction")
    macs_reduction: float | None = _low_rank_field("macs_reduction")
    rank_ratio: float | None = _low_rank_field("rank_ratio")
    energy: float | None = _low_rank_field("energy")
    target_modules: list[str] | None = _low_rank_field("target_modules")
    exclude_modules: list[str] | None = _low_rank_field("exclude_modules")
    skip_first_last: bool = _low_rank_field("skip_first_last")
    factorise_embeddings: bool | None = _low_rank_field("factorise_embeddings", planned=True)
    rank_multiple: int | None = _low_rank_field("rank_multiple")
    method: str | None = _low_rank_field("method", planned=True)
    rank_allocation: str = _low_rank_field("rank_allocation")
    sensitivity_samples: int = _low_rank_field("sensitivity_samples")
    sequential: bool = _low_rank_field("sequential")

    RULES = ("param_reduction", "macs_reduction", "rank_ratio", "energy")
    BUDGETS = ("param_reduction", "macs_reduction")  # the rules a --budgets sweep can take
    PLANNED = ("method", "factorise_embeddings")  # unset: the training plan's (recipes/compress.py), else the config's

    def rules_given(self) -> list[str]:
        return [name for name in self.RULES if getattr(self, name) is not None]

    def _value(self, name: str) -> Any:
        value = getattr(self, name)
        return _config_default(name) if value is None and name in self.PLANNED else value

    def targets(self) -> dict[str, Any]:
        """The fields that are not a rank rule (what a budget sweep adds to each budget's config)."""
        return {f.name: self._value(f.name) for f in fields(self) if f.name not in self.RULES}

    def to_config(self) -> LowRankConfig:
        return LowRankConfig(**{f.name: self._value(f.name) for f in fields(self)})


# ---- the record of a training run's data ---------------------------------------------------------
_RECORDED = ("dataset_name", "dataset_config_name", "image_column_name", "text_column_name", "label_column_name",
             "train_val_split", "max_seq_length")


def save_data_record(folder: str | os.PathLike, data_args: DataArguments, seed: int, splits: DatasetDict) -> Path:
    """Write what a checkpoint was trained and evaluated on: the dataset's identity, the seed that picked
    the split and subsets, and their sizes."""
    record = {
        **{name: getattr(data_args, name) for name in _RECORDED},
        # a local folder by its absolute path: compress.py may run from another working directory
        "dataset_name": dataset_identity(data_args.dataset_name),
        "seed": seed,
        "max_train_samples": getattr(data_args, "max_train_samples", None),
        "max_eval_samples": data_args.max_eval_samples,
        "num_train": len(splits["train"]),
        "num_test": len(splits["test"]),
        "labels": label_names(splits["train"]),
    }
    path = Path(folder) / DATA_RECORD_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_data_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record :func:`save_data_record` wrote in ``folder``, or ``None`` when there is none."""
    path = Path(folder) / DATA_RECORD_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def resolve_data_arguments(
    data_args: DataArguments, checkpoint: str | os.PathLike, seed: int | None
) -> tuple[DataArguments, int, dict[str, Any] | None]:
    """Fill what the user left out from the checkpoint's data record: ``(data arguments, seed, record)``.

    Without ``--dataset_name`` (or naming the recorded one) the recorded dataset is used with its recorded
    config, columns and split ratio where the command line leaves them out; another dataset is used
    with the command line's settings only. The seed
    (which picks the test split of a dataset without one, and every subset) defaults to the recorded one.
    """
    record = load_data_record(checkpoint)
    values = asdict(data_args)
    if data_args.dataset_name is None and record is None:
        raise ValueError(
            f"{checkpoint} has no {DATA_RECORD_NAME} (recipes/train.py writes it) to say which data the model was "
            "trained on: name the evaluation data with --dataset_name"
        )
    named = data_args.dataset_name
    if record is not None and (named is None or record.get("dataset_name") in (named, dataset_identity(named))):
        values.update({name: record.get(name) for name in _RECORDED if values[name] is None})
    if seed is None:
        seed = record["seed"] if record is not None and "seed" in record else DEFAULT_SEED
    return type(data_args)(**values), seed, record

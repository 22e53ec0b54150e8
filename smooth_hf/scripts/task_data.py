"""What ``recipes/compress.py`` needs of the data, by kind of model: calibration examples, the evaluation, its metric.

* image classifiers (timm, transformers vision models): images through the model's own processor, accuracy;
* text classifiers: sentences through the checkpoint's tokenizer, each batch padded to its longest, accuracy;
* causal language models (a ``*ForCausalLM`` / ``*LMHeadModel``): text joined and cut into sequences of
  ``--max_seq_length`` tokens (:mod:`smooth_hf.data.language_modeling`), perplexity on the held-out sequences
  (:func:`smooth_hf.evaluation.perplexity.perplexity`; lower is better).

The recipe reads one :class:`TaskData` whatever the kind, so compressing, sweeping, saving and the card are written
once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import default_data_collator

from ..checkpoint.build import check_num_labels, task_of
from ..core.libraries import pipeline_task
from ..core.memory_format import channels_last_inference
from ..data.images import held_as_tensors, label_names, prepare_image_splits
from ..data.language_modeling import DEFAULT_SEQUENCE_LENGTH, prepare_language_modeling_splits
from ..data.processors import image_input_config, image_processor_for
from ..data.text import DEFAULT_MAX_SEQ_LENGTH, prepare_text_splits, text_collator, tokenizer_for
from ..evaluation.accuracy import classification_accuracy
from ..evaluation.perplexity import perplexity
from .args import DataArguments

__all__ = ["TaskData", "load_task_data"]


@dataclass
class TaskData:
    """The data a compression recipe calibrates and scores with, for one kind of model."""

    task: str  # "image-classification", "text-classification" or "text-generation"
    processor: Any  # saved with the model (image processor or tokenizer; None for timm models)
    train: Any  # calibration (and BN repair) examples are drawn from it
    test: Any
    collate: Callable[[list], dict]
    metric: str  # "accuracy" or "perplexity"
    unit: str  # what the test split holds: "images", "sentences", "sequences"
    sample_shape: tuple[int, ...]  # one example's input shape (multiply-adds are priced on it)
    labels: list[str] | None = None

    def evaluate(self, model: nn.Module) -> float:
        if self.metric == "perplexity":
            return perplexity(model, self.test, collate_fn=self.collate)
        with channels_last_inference(model):  # the same accuracy, faster convolutions
            return classification_accuracy(model, self.test, collate_fn=self.collate)


def load_task_data(
    model: nn.Module, checkpoint: str | os.PathLike, data_args: DataArguments, seed: int, record: dict | None
) -> TaskData:
    """The data of ``data_args`` prepared for ``model`` (loaded from ``checkpoint``), as it was trained on it.

    Raises:
        ValueError: a classifier whose head does not have as many outputs as the dataset has classes.
    """
    if pipeline_task(model) == "text-generation":
        tokenizer = tokenizer_for(checkpoint)
        length = data_args.max_seq_length or DEFAULT_SEQUENCE_LENGTH
        splits = prepare_language_modeling_splits(
            data_args.dataset_name, tokenizer, sequence_length=length, max_eval_samples=data_args.max_eval_samples,
            seed=seed, dataset_config_name=data_args.dataset_config_name, text_column=data_args.text_column_name,
            eval_split_ratio=data_args.train_val_split,
        )
        return TaskData("text-generation", tokenizer, splits["train"], splits["test"], default_data_collator,
                        "perplexity", "sequences", (length,))
    if task_of(str(checkpoint)) == "text-classification":
        # The checkpoint's tokenizer (recipes/train.py saved it there), the training run's sequence length.
        tokenizer = tokenizer_for(checkpoint)
        length = data_args.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
        splits = prepare_text_splits(**data_args.split_kwargs(text=True), tokenizer=tokenizer, seed=seed,
                                     max_seq_length=length)
        data = TaskData("text-classification", tokenizer, splits["train"], splits["test"], text_collator(tokenizer),
                        "accuracy", "sentences", (length,), label_names(splits["train"]))
    else:
        processor = image_processor_for(model, checkpoint)  # what the model was trained with; saved with it
        splits = prepare_image_splits(**data_args.split_kwargs(), seed=seed, input_spec=image_input_config(model, processor))
        test = held_as_tensors(splits["test"])  # decoded once, scored at every budget
        data = TaskData("image-classification", processor, splits["train"], test, default_data_collator, "accuracy",
                        "images", tuple(test[0]["pixel_values"].shape), label_names(splits["train"]))
    check_num_labels(model, len(data.labels))
    return data

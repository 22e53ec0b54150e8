"""Accuracy, computed one way: the pure function, the Trainer's compute_metrics and the model-over-dataset loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image_dataset, text_dataset, tiny_bert
from transformers import DataCollatorWithPadding, EvalPrediction

from smooth_hf.evaluation.accuracy import classification_accuracy
from smooth_hf.evaluation.metrics import accuracy, accuracy_metrics


def test_accuracy_counts_equal_class_ids():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert accuracy(torch.tensor([1, 1]), np.array([0, 0])) == 0.0
    with pytest.raises(ValueError, match="one predicted class id per label"):
        accuracy([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_compute_metrics_takes_the_argmax_of_the_logits():
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    labels = np.array([1, 0, 0, 2])
    assert accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.5}
    assert accuracy_metrics(((logits, "hidden states"), labels)) == {"accuracy": 0.5}  # models returning tuples


def test_classification_accuracy_equals_a_direct_computation(tiny_conv):
    data = image_dataset(n=40, seed=3)
    everything = data[:]
    with torch.no_grad():
        direct = (tiny_conv(everything["pixel_values"]).argmax(-1) == everything["labels"]).float().mean().item()
    tiny_conv.train()
    assert classification_accuracy(tiny_conv, data, batch_size=7) == pytest.approx(direct)
    assert tiny_conv.training  # the caller's mode is restored


def test_classification_accuracy_with_a_padding_collator_for_text():
    model = tiny_bert().eval()
    data = text_dataset(n=20, seed=4)
    data = data.map(lambda row, i: {"input_ids": row["input_ids"][: 2 + i % 5]}, with_indices=True)  # ragged lengths

    class Tokenizer:  # what DataCollatorWithPadding needs of a tokenizer
        pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids", "attention_mask"]

        def pad(self, features, **kwargs):
            width = max(len(f["input_ids"]) for f in features)
            ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]
            mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                    "labels": torch.tensor([f["labels"] for f in features])}

    got = classification_accuracy(model, data, batch_size=6, collate_fn=DataCollatorWithPadding(Tokenizer()))
    with torch.no_grad():
        direct = [int(model(input_ids=torch.tensor([r["input_ids"]])).logits.argmax(-1)) == r["labels"] for r in data]
    assert got == pytest.approx(sum(direct) / len(direct))

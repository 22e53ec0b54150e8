"""Text models end to end: SmoothTrainer fine-tunes a BERT sequence classifier on tokenised text with the
penalties on, logs every penalty term, and the result compresses and is scored without fine-tuning.

Everything is built here (a word-level vocabulary, a tokenizer, a tiny ``BertConfig``): no download.
The real-model version of this flow (all-MiniLM-L6-v2 on Pang & Lee sentences) is
``benchmarks/transformers_path.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from smooth_hf import SmoothTrainer, SmoothTrainingArguments
from smooth_hf.evaluation.accuracy import classification_accuracy
from smooth_hf.lowrank import LowRankConfig, LowRankLinear, compress, count_parameters
from smooth_hf.lowrank.report import STATUS_DENSE_NO_GAIN

POSITIVE = ["good", "great", "fine", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "film", "plot", "was", "is", "a", "very", "quite", "story", "cast", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 12
# Weak enough that the task loss still drives a 48-step fine-tune, strong enough to be measured.
COEFS = {"first_order_coef": 0.1, "second_order_coef": 0.05, "nuclear_norm_coef": 0.1}


@pytest.fixture(scope="module")
def tokenizer():
    # transformers 5's BertTokenizer takes ``vocab`` (a dict or a path); ``vocab_file=`` is silently ignored
    # there, leaving every word [UNK] -- hence the check below.
    tok = BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)})
    assert tok.convert_ids_to_tokens(tok("a good film")["input_ids"]) == ["[CLS]", "a", "good", "film", "[SEP]"]
    return tok


def sentences(n: int, seed: int) -> dict[str, list]:
    """Filler words around one sentiment word; the label is that word's polarity (balanced)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 7))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return {"text": texts, "label": labels}


def tokenised(tokenizer, n: int, seed: int) -> Dataset:
    data = Dataset.from_dict(sentences(n, seed))
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH, padding="max_length"),
                    batched=True, remove_columns=["text"])
    return data.rename_column("label", "labels").with_format("torch")


def tiny_bert_classifier(vocab_size: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LENGTH, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine two threads made this test ~20x
    slower (measured: 24 steps in 25 s vs 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bert_fine_tunes_with_penalties_and_compresses_without_fine_tuning(tmp_path, tokenizer, one_thread):
    train, test = tokenised(tokenizer, 96, seed=0), tokenised(tokenizer, 64, seed=1)
    assert set(train.column_names) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    model = tiny_bert_classifier(tokenizer.vocab_size)
    chance = classification_accuracy(model, test)

    args = SmoothTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=48, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=6, disable_tqdm=True, seed=0, data_seed=0,
        nuclear_norm_every=4, **COEFS,
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    # Every Linear but the first (layer 0's query) and the last (the classifier head) is penalised.
    names = trainer.smoothness.layer_names
    assert names[0] == "bert.encoder.layer.0.attention.self.key" and "classifier" not in names
    assert "bert.pooler.dense" in names
    trainer.train()

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 48 // 6
    for log in train_logs:
        for key in ("smooth/first_order", "smooth/second_order", "smooth/nuclear_norm", "smooth/penalty"):
            assert key in log and math.isfinite(log[key]) and log[key] > 0, (key, log)
        # The logged total is the weighted sum of the logged (unweighted) terms.
        weighted = sum(coef * log[f"smooth/{key.removesuffix('_coef')}"] for key, coef in COEFS.items())
        assert log["smooth/penalty"] == pytest.approx(weighted, rel=1e-3)
    # The first-order penalty (the smoothness of the weights along their channel axes) went down.
    assert train_logs[-1]["smooth/first_order"] < train_logs[0]["smooth/first_order"]

    dense_accuracy = classification_accuracy(model, test)
    assert dense_accuracy >= 0.9 > chance + 0.2, (chance, dense_accuracy)

    before = count_parameters(model)
    compress(model, LowRankConfig(rank_ratio=0.5))
    report = model.lowrank_report
    assert count_parameters(model) == report.params_after < before
    factorised = {layer.name for layer in report.factorised}
    # At half rank the 64x32 feed-forward layers shrink; a square 32x32 projection would not (16 * (32 + 32)
    # parameters = its dense size), so it stays dense and the report says why.
    assert {f"bert.encoder.layer.{i}.{ffn}.dense" for i in (0, 1) for ffn in ("intermediate", "output")} <= factorised
    status = {layer.name: layer.status for layer in report.layers}
    assert status["bert.encoder.layer.0.attention.self.query"] == STATUS_DENSE_NO_GAIN
    for name in factorised:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        assert layer.rank == model.lowrank_config.ranks[name] == math.ceil(0.5 * min(layer.in_features, layer.out_features))

    accuracy = classification_accuracy(model, test, batch_size=32)
    everything = test[:]
    with torch.no_grad():
        logits = model(**{k: v for k, v in everything.items() if k != "labels"}).logits
    assert torch.isfinite(logits).all()
    assert accuracy == pytest.approx((logits.argmax(-1) == everything["labels"]).float().mean().item())
    assert accuracy >= 0.9, (chance, dense_accuracy, accuracy)  # still classifies without fine-tuning

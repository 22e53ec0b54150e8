"""Fine-tuning a pretrained text checkpoint for the cut (issue 27): whitened rank projection with the word embeddings,
recipes/train.py on text data, and recipes/compress.py cutting it as planned with no flag.

Everything is built here (a word-level tokenizer, a tiny BERT saved as a checkpoint folder, CSV and save_to_disk
sentences): no download. The real-model version is ``benchmarks/finetune_cut.py`` (all-MiniLM-L6-v2 on Pang & Lee).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from test_text_models import FILLER, NEGATIVE, POSITIVE, SPECIAL, sentences, tiny_bert_classifier, tokenised
from transformers import BertTokenizer, pipeline

import smooth_hf
from smooth_hf import LowRankConfig, RankProjection, SmoothTrainer, SmoothTrainingArguments, compress
from smooth_hf.data.text import load_text_classification, prepare_text_splits
from smooth_hf.lowrank.whitening import collect_input_grams, output_error, whitened_decomposition
from smooth_hf.scripts import compress as compress_recipe
from smooth_hf.scripts import train as train_recipe
from smooth_hf.training.calibration import RecentBatches, RunningGrams
from smooth_hf.training.presets import TEXT_FINE_TUNE
from smooth_hf.training.projection import project_to_rank_, project_whitened_

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)})


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A 'pretrained' tiny BERT classifier checkpoint folder with its tokenizer, as a Hub checkpoint would be."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-bert"
    tiny_bert_classifier(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def batches_of(data, size: int = 16) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in data[i:i + size].items() if k != "labels"} for i in range(0, len(data), size)]


def test_whitened_projection_is_the_best_cut_for_the_inputs(tokenizer):
    """Projected in whitened space, a layer loses less on its inputs than projected by plain SVD at the same rank:
    exactly the whitened tail, the least any rank-r weight can lose there."""
    model = tiny_bert_classifier(tokenizer.vocab_size).eval()
    data = tokenised(tokenizer, 64, 0)
    layer = model.bert.encoder.layer[0].intermediate.dense
    gram = collect_input_grams(model, {"x": layer}, batches_of(data)).grams["x"]
    dense = layer.weight.detach().clone().double()
    decomposition = whitened_decomposition(dense, gram, 1e-6)
    rank, errors = 8, {}
    for method, project in (("svd", lambda m: project_to_rank_(m.weight, rank)),
                            ("whitened", lambda m: project_whitened_(m, decomposition, rank))):
        module = copy.deepcopy(layer)
        project(module)
        assert torch.linalg.matrix_rank(module.weight.detach()) == rank
        errors[method] = output_error(dense, module.weight.detach(), gram)
    tail = float((decomposition[1][8:] ** 2).sum())
    assert errors["whitened"] == pytest.approx(tail, rel=1e-3) and errors["whitened"] < 0.9 * errors["svd"]


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_fine_tune_with_projection_makes_the_whole_model_cut_exact(tokenizer, tmp_path, method):
    """Planned over the whole model with the word embeddings, the cut of the same plan (and method) after the fine-tune
    changes the logits by round-off only: with calibration data of its own (the whitened cut) too."""
    model = tiny_bert_classifier(tokenizer.vocab_size)
    train = tokenised(tokenizer, 96, 0)
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=16, learning_rate=1e-3,
        rank_projection_param_reduction=0.5, rank_projection_method=method, factorise_embeddings=True,
        rank_projection_every=4, rank_projection_calibration_batches=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=train)
    names = [name for name, _ in trainer.rank_projection.layers]
    assert "bert.embeddings.word_embeddings" in names and trainer.rank_projection.method == method
    trainer.train()
    if method == "whitened":  # the statistics came from the training batches, refreshed at each projection
        assert trainer._running_grams.batches == 2 * 3 and set(trainer._running_grams.grams) == set(names)
    model.eval()
    test = tokenised(tokenizer, 32, 1)
    inputs = {k: v for k, v in test[:].items() if k != "labels"}
    with torch.no_grad():
        dense = model(**inputs).logits
        for cut_method in ("svd", "whitened"):
            calibration = batches_of(tokenised(tokenizer, 48, 2)) if cut_method == "whitened" else None
            cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.5, method=cut_method,
                                                               factorise_embeddings=True), calibration_data=calibration)
            assert cut.lowrank_report.reduction >= 0.5
            torch.testing.assert_close(cut(**inputs).logits, dense, atol=1e-5, rtol=1e-4)


def test_running_grams_sum_the_recent_batches_halving_the_earlier_ones(tokenizer):
    model = tiny_bert_classifier(tokenizer.vocab_size).eval()
    layer = ("bert.encoder.layer.0.intermediate.dense", model.bert.encoder.layer[0].intermediate.dense)
    batches = batches_of(tokenised(tokenizer, 32, 0))
    recent, running = RecentBatches(1), RunningGrams([layer])
    for batch in batches:
        recent.add({**batch, "labels": torch.zeros(16)})
    assert len(recent) == 1 and "labels" not in recent.batches[0]  # the last batch only, labels dropped
    first = running.refresh(model, recent)[layer[0]].clone()
    second = running.refresh(model, recent)[layer[0]]
    torch.testing.assert_close(second, 1.5 * first)
    with pytest.raises(ValueError, match="no training batch"):
        RunningGrams([layer]).refresh(model, RecentBatches(2))


def test_bad_fine_tune_settings_are_clear_errors(caplog):
    with pytest.raises(ValueError, match="rank_projection_method must be one of"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=0.5, rank_projection_method="pca")
    with pytest.raises(ValueError, match="rank_projection_calibration_batches must be an integer"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=0.5,
                                rank_projection_calibration_batches=0)
    with caplog.at_level("WARNING"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_method="whitened", factorise_embeddings=True)
    assert "--rank_projection_method, --factorise_embeddings do(es) nothing without rank projection" in caplog.text
    with pytest.raises(ValueError, match="needs the input Gram matrix"):
        model = tiny_bert_classifier(30)
        RankProjection.for_model(model, 0.3, method="whitened", start=0.0, end=0.0)(1, 1)


# ---- text data ---------------------------------------------------------------------------------------------------
def write_csv(path: Path, n: int, seed: int, labels=("negative", "positive"), columns=("sentence", "sentiment")) -> str:
    rows = sentences(n, seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for text, label in zip(rows["text"], rows["label"], strict=True):
            writer.writerow([text, labels[label]])
    return str(path)


def test_text_data_from_a_csv_file_and_a_saved_dataset_with_the_split_rules_of_images(tmp_path, tokenizer):
    path = write_csv(tmp_path / "reviews.csv", 50, 0, labels=("-1", "1"), columns=("sentence", "polarity"))
    data = load_text_classification(path, label_column="polarity", eval_split_ratio=0.2, seed=3)
    assert data["train"].column_names == ["text", "label"] and (len(data["train"]), len(data["test"])) == (40, 10)
    assert data["train"].features["label"].names == ["-1", "1"]  # numbers in numeric order
    assert load_text_classification(path, label_column="polarity", eval_split_ratio=0.2, seed=3)["test"]["text"] == \
        data["test"]["text"]  # seeded: the same held-out sentences every time
    data.save_to_disk(tmp_path / "saved")
    splits = prepare_text_splits(str(tmp_path / "saved"), tokenizer, max_seq_length=6, max_eval_samples=4, seed=3)
    assert len(splits["test"]) == 4 and max(len(x) for x in splits["train"]["input_ids"]) <= 6
    assert set(splits["train"].column_names) >= {"input_ids", "attention_mask", "labels"}
    assert not list((tmp_path / "saved").rglob("cache-*"))  # nothing written into the user's folder
    with pytest.raises(ValueError, match="--text_column_name 'words' is not a column"):
        load_text_classification(path, text_column="words")
    (tmp_path / "notes.xml").write_text("x")
    with pytest.raises(ValueError, match="must be one of"):
        load_text_classification(str(tmp_path / "notes.xml"))


# ---- the recipes as users run them --------------------------------------------------------------------------------
def test_the_text_recipe_trains_for_the_cut_and_compress_cuts_it_as_planned(checkpoint, tmp_path):
    data = write_csv(tmp_path / "reviews.csv", 320, 0)
    out = tmp_path / "fine-tuned"
    metrics = train_recipe.main([
        "--model_name_or_path", str(checkpoint), "--dataset_name", data, "--text_column_name", "sentence",
        "--label_column_name", "sentiment", "--max_seq_length", "12", "--do_train", "--do_eval",
        "--output_dir", str(out), "--rank_projection_param_reduction", "0.5", "--rank_projection_method", "whitened",
        "--factorise_embeddings", "--rank_projection_every", "3", "--rank_projection_calibration_batches", "2",
        "--num_train_epochs", "4", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--seed", "5",
    ])
    assert metrics["eval_accuracy"] > 0.5
    assert (out / "tokenizer_config.json").is_file()  # the tokenizer is saved with the model
    saved = json.loads((out / "training_args.json").read_text())
    assert (saved["rank_projection_method"], saved["factorise_embeddings"]) == ("whitened", True)
    record = json.loads((out / "data_args.json").read_text())
    assert (record["text_column_name"], record["max_seq_length"], record["labels"]) == ("sentence", 12,
                                                                                         ["negative", "positive"])
    classify = pipeline("text-classification", model=str(out))
    assert classify("a good film")[0]["label"] in ("negative", "positive")

    cut = tmp_path / "cut"
    result = compress_recipe.main(["--model_name_or_path", str(out), "--output_dir", str(cut)])  # no flag at all
    config = result["model"].lowrank_config
    assert (config.param_reduction, config.method, config.factorise_embeddings) == (0.5, "whitened", True)
    assert result["reduction"] >= 0.5
    assert result["accuracy"] == pytest.approx(result["dense_accuracy"])  # the cut it was trained for changes nothing
    assert result["max_logit_change"] < 1e-4
    dense = smooth_hf.checkpoint.dense.load_dense(out).eval()
    reloaded = smooth_hf.from_pretrained(cut)
    inputs = classify.tokenizer(["a good film", "the plot was dull and boring"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=1e-4)
    assert (cut / "tokenizer_config.json").is_file()
    assert pipeline("text-classification", model=str(cut))("a good film")[0]["label"] in ("negative", "positive")


def test_the_fine_tune_preset_is_what_the_guide_runs():
    """docs/fine-tuning-for-the-cut.md's commands train with TEXT_FINE_TUNE, setting for setting."""
    from test_docs import RECIPE_COMMANDS

    assert TEXT_FINE_TUNE["rank_projection_method"] == "whitened" and TEXT_FINE_TUNE["factorise_embeddings"] is True
    trainings = [argv for where, recipe, argv in RECIPE_COMMANDS
                 if where.startswith("docs/fine-tuning-for-the-cut.md") and recipe == "train"]
    assert len(trainings) == 2  # from the Hub, and without it
    for argv in trainings:
        _, _, training_args = train_recipe.parse_args(argv)
        for key, value in TEXT_FINE_TUNE.items():
            assert getattr(training_args, key) == value, f"--{key}: the guide {getattr(training_args, key)!r}, preset {value!r}"

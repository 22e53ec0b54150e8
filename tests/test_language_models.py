"""Causal language models through recipes/compress.py: text calibration, perplexity on held-out text, streamed.

The text is real English that the machine ships (the GNU GPL v3 of Debian's base-files, or CPython's licence),
the tokenizer is trained on it here (no Hub), and the model is a tiny random Llama: the numbers are meaningless,
the path is the one a user takes with a Hub checkpoint.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

import smooth_hf
from smooth_hf.data.language_modeling import prepare_language_modeling_splits
from smooth_hf.evaluation.perplexity import perplexity
from smooth_hf.scripts import compress as compress_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]


@pytest.fixture(scope="module")
def corpus() -> Path:
    found = next((p for p in TEXTS if p.is_file()), None)
    assert found is not None, f"no shipped English text found at {[str(p) for p in TEXTS]}"
    return found


@pytest.fixture(scope="module")
def causal_lm(corpus, tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer trained on the corpus, saved as a checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.WordLevelTrainer(vocab_size=400, special_tokens=["[UNK]", "</s>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_text_is_joined_and_cut_into_full_sequences(corpus, causal_lm):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(causal_lm)
    splits = prepare_language_modeling_splits(str(corpus), tokenizer, sequence_length=16, max_eval_samples=5, seed=3)
    assert len(splits["test"]) == 5 and len(splits["train"]) > 50
    row = splits["train"][0]
    assert row["input_ids"].shape == (16,) and torch.equal(row["labels"], row["input_ids"])
    assert bool(row["attention_mask"].all())
    again = prepare_language_modeling_splits(str(corpus), tokenizer, sequence_length=16, max_eval_samples=5, seed=3)
    assert torch.equal(again["test"][:]["input_ids"], splits["test"][:]["input_ids"])  # the same seed, the same text
    with pytest.raises(ValueError, match="fewer than 100000 tokens"):
        prepare_language_modeling_splits(str(corpus), tokenizer, sequence_length=100000)


def test_perplexity_is_the_exponential_of_the_models_own_mean_loss(corpus, causal_lm):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(causal_lm)
    model = AutoModelForCausalLM.from_pretrained(causal_lm).eval()
    test = prepare_language_modeling_splits(str(corpus), tokenizer, sequence_length=16, max_eval_samples=6)["test"]
    with torch.no_grad():
        loss = model(input_ids=test[:]["input_ids"], labels=test[:]["labels"]).loss  # mean over every shifted token
    assert perplexity(model, test, batch_size=4) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_the_recipe_compresses_a_causal_lm_scored_by_perplexity_and_the_folder_generates(corpus, causal_lm, tmp_path):
    out = tmp_path / "lm-lowrank-30"
    result = compress_recipe.main([
        "--model_name_or_path", str(causal_lm), "--dataset_name", str(corpus), "--max_seq_length", "32",
        "--max_eval_samples", "8", "--calibration_samples", "16", "--param_reduction", "0.3", "--method", "whitened",
        "--output_dir", str(out),
    ])
    assert result["reduction"] >= 0.3 and result["perplexity"] > 1 and result["dense_perplexity"] > 1
    card = (out / "README.md").read_text()
    assert "perplexity" in card and "text-generation" in card
    assert (out / "tokenizer.json").is_file(), "the tokenizer is saved with the model"
    # transformers' own loader reads it (after import smooth_hf), with the same perplexity, and generates
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    test = prepare_language_modeling_splits(str(corpus), tokenizer, sequence_length=32, max_eval_samples=8, seed=42)["test"]
    assert perplexity(reloaded, test) == pytest.approx(result["perplexity"], rel=1e-5)
    generated = pipeline("text-generation", model=str(out), device="cpu")("the program", max_new_tokens=4, do_sample=False)
    assert generated[0]["generated_text"].startswith("the program")
    config = json.loads((out / "compression_config.json").read_text())
    assert config["method"] == "whitened" and config["calibration_samples"] == 16
    assert smooth_hf.from_pretrained(out).lowrank_config.ranks == config["ranks"]


def test_a_sweep_of_a_causal_lm_tabulates_perplexity_and_a_sequential_cut_records_it(corpus, causal_lm, tmp_path):
    (rows,) = compress_recipe.main([
        "--model_name_or_path", str(causal_lm), "--dataset_name", str(corpus), "--max_seq_length", "32",
        "--max_eval_samples", "8", "--calibration_samples", "16", "--budgets", "0.2,0.4", "--method", "whitened",
        "--sequential", "--output_dir", str(tmp_path / "sweep"),
    ]).values()
    assert [row["budget"] for row in rows] == [0.0, 0.2, 0.4] and all("perplexity" in row for row in rows)
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert f"{rows[0]['perplexity']:.2f}" in table  # perplexities as they are, not as percentages
    assert (tmp_path / "sweep" / "perplexity_vs_params_removed.png").is_file()

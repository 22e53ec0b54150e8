"""The recipes as users run them, on a tiny dataset in the Fashion-MNIST format (no Hub)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

import smooth_hf
from smooth_hf.data import ImageTransform
from smooth_hf.evaluation import logits_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import compress as compress_recipe  # noqa: E402
import smooth_vs_plain  # noqa: E402
import train as train_recipe  # noqa: E402

TINY_MODEL = ["--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[4,8,8],layers=[1,1,1]"]


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory) -> str:
    """64 train / 32 test 12x12 grey images with 3 classes: the brightness of a quadrant decides the class."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 12, 12)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[: 6 * (label > 0) + 6, :6] += 150 if label else 0
        return {"image": images, "label": labels}

    features = Features({"image": Array2D((12, 12), "uint8"), "label": ClassLabel(names=["a", "b", "c"])})
    path = tmp_path_factory.mktemp("data") / "tiny_fmnist"
    DatasetDict({s: Dataset.from_dict(split(n), features=features) for s, n in (("train", 64), ("test", 32))}).save_to_disk(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_fmnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smooth"
    metrics = train_recipe.main([
        *TINY_MODEL, "--dataset_name", tiny_fmnist, "--output_dir", str(out), "--do_train", "--do_eval",
        "--max_train_samples", "48", "--max_eval_samples", "16", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-2", "--nuclear_norm_coef", "1",
        "--first_order_coef", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1",
    ])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    return out


def test_train_writes_a_rebuildable_checkpoint_and_logs_penalties(trained):
    assert {"model.safetensors", "config.json", "training_args.json"} <= {p.name for p in trained.iterdir()}
    state = json.loads((trained / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged and all("smooth/nuclear_norm" in e and "smooth/first_order" in e for e in logged)
    model = smooth_hf.auto.load_dense(trained)
    assert model.num_classes == 3 and model.in_chans == 1


def test_compress_recipe_saves_a_model_that_reloads_with_equal_logits(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "compressed"
    result = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                   "--param_reduction", "0.5", "--output_dir", str(out)])
    assert result["reduction"] == pytest.approx(0.5, abs=0.01)
    card = (out / "README.md").read_text()
    assert "model-index" in card and "nuclear_norm_coef" in card
    reloaded = smooth_hf.from_pretrained(out)
    assert reloaded.lowrank_config.ranks
    x = torch.randn(4, 1, 12, 12)
    again = smooth_hf.from_pretrained(out)
    assert torch.equal(logits_of(reloaded, {"pixel_values": x}), logits_of(again, {"pixel_values": x}))


def test_compress_recipe_sweep_writes_table_and_plot(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "sweep"
    results = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                    "--budgets", "0.3,0.5", "--recalibrate_batchnorm", "32", "--batchnorm_data_free",
                                    "--output_dir", str(out)])
    (rows,) = results.values()
    assert [r["budget"] for r in rows] == [0.0, 0.3, 0.5]
    assert all("accuracy_bn_recalibrated" in r and "accuracy_bn_data_free" in r for r in rows[1:])
    assert "+ BN data-free |" in (out / "results.md").read_text().splitlines()[0]
    assert (out / "accuracy_vs_params_removed.png").stat().st_size > 1000
    assert "| 50% |" in (out / "results.md").read_text()


def test_compress_recipe_rejects_ambiguous_rules(trained):
    with pytest.raises(ValueError, match="exactly one of"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--param_reduction", "0.5",
                              "--rank_ratio", "0.5"])
    with pytest.raises(ValueError, match="not both"):
        compress_recipe.main(["--model_name_or_path", str(trained), "--output_dir", "x", "--param_reduction", "0.5",
                              "--recalibrate_batchnorm", "32", "--batchnorm_data_free"])


def test_compress_recipe_data_free_batchnorm_card(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "data-free"
    compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist, "--param_reduction",
                          "0.5", "--batchnorm_data_free", "--output_dir", str(out)])
    reloaded = smooth_hf.from_pretrained(out)
    assert reloaded.lowrank_report.batchnorm_recalibrated and reloaded.lowrank_report.batchnorm_data_free
    assert "synthesised from the dense model's own BatchNorm statistics" in (out / "README.md").read_text()


def test_main_job_end_to_end(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "main"
    results = smooth_vs_plain.main([
        "--output_dir", str(out), "--dataset_name", tiny_fmnist,  # the default model: a ViT from scratch, tiny here
        "--config_overrides", "image_size=12,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--max_train_samples", "48", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--budgets", "0.3,0.5", "--save_budget", "0.5",
        "--bn_recalibration_samples", "32",
    ])
    assert set(results) == {"plain", "smooth"}
    printed = capsys.readouterr().out
    assert "| parameters removed | plain |" in printed and "| 50% |" in printed
    assert (out / "accuracy_vs_params_removed.png").is_file()
    reloaded = smooth_hf.from_pretrained(out / "smooth-lowrank-50")
    assert reloaded.lowrank_report.reduction == pytest.approx(0.5, abs=0.01)


def test_image_transform_handles_channels_and_sizes():
    grey = np.full((12, 12), 255, dtype=np.uint8)
    out = ImageTransform(channels=3, mean=(0.5,), std=(0.5,), image_size=16)({"image": [grey], "label": [1]})
    assert out["pixel_values"][0].shape == (3, 16, 16) and torch.allclose(out["pixel_values"][0], torch.ones(3, 16, 16))
    assert out["labels"] == [1]


def test_train_recipe_trains_a_transformers_vit_from_scratch(tiny_fmnist, tmp_path):
    out = tmp_path / "vit"
    metrics = train_recipe.main([
        "--model_type", "vit", "--config_overrides",
        "image_size=12,patch_size=4,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--dataset_name", tiny_fmnist, "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--first_order_coef", "1", "--report_to", "none", "--use_cpu",
        "--save_strategy", "no",
    ])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    model = smooth_hf.auto.load_dense(out)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 3


def _benchmark(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_protocol_benchmark_runs_end_to_end_and_reports_every_column(tiny_fmnist, tmp_path):
    """A smoke run of benchmarks/cpu_protocol.py: the published tables come from this code path."""
    protocol = _benchmark("cpu_protocol")
    results = tmp_path / "results"
    payload = protocol.main([
        "--dataset_name", tiny_fmnist, "--channels", "4,8,8", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--per_device_train_batch_size", "32", "--variants", "plain,recommended", "--budgets", "0.5",
        "--bn_recalibration_samples", "16", "--bn_data_free_samples", "8", "--bn_data_free_steps", "2",
        "--work_dir", str(tmp_path / "work"), "--results_dir", str(results),
    ])
    assert set(payload["results"]) == {"lowrank_global", "lowrank_uniform", "magnitude", "filter_l1"}
    (row,) = [r for r in payload["results"]["lowrank_global"]["recommended"] if r["budget"] == 0.5]
    assert {"accuracy", "accuracy_bn_recalibrated", "accuracy_bn_data_free"} <= set(row)
    assert row["removed"] == pytest.approx(0.5, abs=0.02)  # a 5k-parameter model: one rank is ~1.5%
    table = (results / "cpu_protocol.md").read_text()
    assert "recommended + BN data-free" in table and "augmentation off" in table
    assert (results / "cpu_protocol_lowrank_global.png").stat().st_size > 1000


def test_transformers_path_smooth_configs_parse_both_syntaxes():
    parse = _benchmark("transformers_path").smooth_configs
    assert parse("1:10,0.1:1:2") == [
        {"first_order_coef": 1.0, "nuclear_norm_coef": 10.0, "second_order_coef": 0.0},
        {"first_order_coef": 0.1, "nuclear_norm_coef": 1.0, "second_order_coef": 2.0},
    ]
    assert parse("fo=1+nn=5,nn=10+warmup=0.5") == [
        {"first_order_coef": 1.0, "nuclear_norm_coef": 5.0, "second_order_coef": 0.0},
        {"first_order_coef": 0.0, "nuclear_norm_coef": 10.0, "second_order_coef": 0.0, "penalty_warmup_ratio": 0.5},
    ]
    with pytest.raises(Exception, match="unknown key 'nuc'"):
        parse("nuc=3")


def test_compress_recipe_whitened_calibrates_on_training_images_and_records_them(trained, tiny_fmnist, tmp_path):
    out = tmp_path / "whitened"
    result = compress_recipe.main(["--model_name_or_path", str(trained), "--dataset_name", tiny_fmnist,
                                   "--param_reduction", "0.5", "--method", "whitened", "--calibration_samples", "40",
                                   "--output_dir", str(out)])
    assert result["reduction"] == pytest.approx(0.5, abs=0.01)
    saved = json.loads((out / "compression_config.json").read_text())
    assert saved["method"] == "whitened" and saved["calibration_samples"] == 40
    assert tiny_fmnist in saved["calibration_dataset"] and "training split" in saved["calibration_dataset"]
    assert "whitened truncation" in (out / "README.md").read_text()
    assert smooth_hf.from_pretrained(out).lowrank_config.method == "whitened"


def _tiny_text_model(folder: Path) -> str:
    """A tiny BERT and its word-level tokenizer, saved like a Hub checkpoint (stands in for all-MiniLM-L6-v2)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["good", "bad", "film", "great", "awful", "plot", "the", "a", "is", "was", "fun", "dull"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def test_whitening_benchmark_runs_every_part_tiny(tiny_fmnist, tmp_path):
    """A smoke run of benchmarks/whitening.py (all four parts) on a tiny BERT, 40 sentences and a tiny CNN."""
    bench = _benchmark("whitening")
    cache = tmp_path / "cache"
    (cache / "pang_lee").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [f'"{1 if i % 2 else -1}","{" ".join(rng.choice(["good", "bad", "film", "the", "plot", "fun"], 5))} . \n"'
            for i in range(40)]
    (cache / "pang_lee" / "polarity-en-pang&lee2.csv").write_text("\ufeff" + "\r\n".join(rows) + "\r\n", encoding="utf-8")
    model = smooth_hf.auto.build_model("resnet14_cifar", num_labels=3, num_channels=1,
                                       config_overrides="channels=[4,8,8],layers=[1,1,1]")
    smooth_hf.auto.save_dense(model, tmp_path / "cnn" / "plain" / "dense")
    out = tmp_path / "results"
    payload = bench.main([
        "--parts", "embed,polarity,cnn,timing", "--output_dir", str(out), "--cache_dir", str(cache),
        "--run_dir", str(tmp_path / "runs"), "--text_model", _tiny_text_model(tmp_path / "bert"),
        "--calibration_sentences", "8", "--calibration_batch_size", "4", "--embed_sentences", "8",
        "--embed_budgets", "0.05", "--neighbours", "3", "--text_max_steps", "1", "--text_batch_size", "8",
        "--text_smooth", "1:1", "--polarity_budgets", "0.05", "--timing_repeats", "1", "--timing_budget", "0.05",
        "--cnn_models", str(tmp_path / "cnn"), "--cnn_dataset", tiny_fmnist, "--cnn_calibration_images", "16",
        "--cnn_eval_samples", "16", "--cnn_budgets", "0.5",
    ])
    embed = payload["parts"]["embed"]["results"]
    assert [r["budget"] for r in embed["whitened"]] == [0.05] and 0 < embed["whitened"][0]["cosine"] <= 1.0 + 1e-6
    assert 0 <= embed["svd"][0]["neighbour_agreement"] <= 1
    polarity = payload["parts"]["polarity"]["results"]
    assert set(polarity) == {"plain, svd", "plain, whitened", "smooth (fo=1, nn=1), svd", "smooth (fo=1, nn=1), whitened"}
    (cnn_row,) = [r for r in payload["parts"]["cnn"]["results"]["plain, whitened"] if r["budget"] == 0.5]
    assert {"accuracy", "accuracy_bn_recalibrated"} <= set(cnn_row)
    assert payload["parts"]["timing"]["results"]["whitened"]["median"] > 0
    table = (out / "whitening.md").read_text()
    assert "cosine, whitened" in table and "Time to compress" in table and "plain, whitened" in table
    assert (out / "whitening_polarity.png").stat().st_size > 1000 and (out / "whitening_cnn.png").is_file()

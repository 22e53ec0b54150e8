"""Smoke runs of the benchmark scripts at tiny scale: the published tables come from these code paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark, save_tiny_fmnist, tiny_bert, tiny_resnet14

from smooth_hf.checkpoint.dense import save_dense


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The scripts set torch's thread count (--threads); later tests compare logits bit for bit with a child
    process, which only holds with the same thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_metadata(meta: dict, script: str) -> None:
    """Every result states where it came from: date, the command that reproduces it, the machine."""
    assert meta["command"].startswith(f"python benchmarks/{script}.py ")
    assert meta["date"] and meta["arguments"]
    assert {"cpu", "cpus", "torch_threads", "torch", "load_average_at_start"} <= set(meta["machine"])


def test_speed_size_smoke(tmp_path):
    """A timm CNN and a BERT encoder saved as dense folders, a tiny image test set, eager and ONNX Runtime
    (torch.compile is covered by tests/test_deploy.py)."""
    save_dense(tiny_resnet14(channels=(8, 16, 16), layers=(1, 1, 1), num_classes=3), tmp_path / "cnn" / "dense")
    save_dense(tiny_bert().eval(), tmp_path / "bert")
    result = load_benchmark("speed_size").main([
        "--models", str(tmp_path / "cnn" / "dense"), str(tmp_path / "bert"),
        "--param_budgets", "0.1", "--macs_budgets", "0.3", "--keep_budgets", "0.1", "--batch_sizes", "1,4",
        "--runtimes", "eager,onnx", "--eval_dataset", save_tiny_fmnist(tmp_path / "data"), "--image_size", "12",
        "--seq_len", "6", "--threads", "1", "--rounds", "2", "--min_round_ms", "1", "--warmup", "1",
        "--compress_repeats", "1", "--output_dir", str(tmp_path / "results"), "--tag", "_smoke",
    ])
    saved = json.loads((tmp_path / "results" / "speed_size_cpu_smoke.json").read_text())
    check_metadata(saved["meta"], "speed_size")
    assert saved["models"] == json.loads(json.dumps(result["models"]))
    cnn, bert = result["models"]
    assert (cnn["model"], cnn["text"], bert["model"], bert["text"]) == ("cnn", False, "bert", True)
    for model in (cnn, bert):
        rows = {row["variant"]: row for row in model["rows"]}
        assert {"dense", "param0.1", "macs0.3"} <= set(rows)
        assert rows["param0.1"]["params_removed"] >= 0.1 and rows["macs0.3"]["macs_removed"] >= 0.3
        for key in ("eager_b1", "eager_b4", "onnx_b1", "onnx_b4"):
            assert rows["dense"]["speedup"][key] == 1.0 and rows["param0.1"]["latency_ms"][key] > 0
            assert rows["macs0.3"]["max_abs_diff"][key] < 1e-4  # ONNX Runtime computes what PyTorch computes
        # Keeping the slower layers dense can put a budget out of reach (on tiny layers it often does): the
        # variant is then listed with the reason. One that is in reach is timed only at the batch it was made for.
        keep = {f"{rule}0.1+keep@b{b}" for rule in ("param", "macs") for b in (1, 4)}
        assert keep <= set(rows) | set(model["skipped"])
        assert all("at most" in reason for reason in model["skipped"].values())
        for name in keep & set(rows):
            assert set(rows[name]["latency_ms"]) == {f"eager_{name[-2:]}", f"onnx_{name[-2:]}"}
    assert all(0 <= row["accuracy"] <= 1 for row in cnn["rows"])
    assert all(row["accuracy"] is None for row in bert["rows"])  # no text test set: latency and size only
    table = (tmp_path / "results" / "speed_size_cpu_smoke.md").read_text()
    assert "### cnn" in table and "| param0.1 | " in table and "onnx b4 ms (x dense)" in table


def test_step_overhead_smoke(tmp_path):
    result = load_benchmark("step_overhead").main([
        "--model", "resnet14_cifar", "--batch-sizes", "2", "--image-size", "8", "--rounds", "1", "--warmup", "0", "--penalty-reps", "1",
        "--ks", "1", "2", "--efficacy-steps", "2", "--efficacy-batch", "4", "--efficacy-data", "random",
        "--no-alternatives", "--threads", "1", "--out-dir", str(tmp_path), "--tag", "_smoke",
    ])
    check_metadata(result, "step_overhead")
    assert result["arguments"]["output_dir"] == str(tmp_path) and result["machine"]["torch_threads"] == 1
    saved = json.loads((tmp_path / "step_overhead_smoke.json").read_text())
    assert saved["step_time"][0]["batch_size"] == 2 and "efficacy" in saved
    assert "Machine: " in (tmp_path / "step_overhead_smoke.md").read_text()


def test_transformers_path_vit_smoke(tmp_path):
    data = save_tiny_fmnist(tmp_path / "tiny")
    written = load_benchmark("transformers_path").main([
        "--parts", "vit", "--vit_dataset", data, "--vit_train_samples", "32", "--vit_test_samples", "16",
        "--vit_max_steps", "2", "--vit_batch_size", "16", "--vit_smooth", "1:1", "--vit_budgets", "0.5",
        "--output_dir", str(tmp_path / "results"), "--run_dir", str(tmp_path / "runs"), "--num_threads", "1",
    ])
    assert {p.name for p in written} == {"transformers_path_vit.json", "transformers_path_vit.md", "transformers_path_vit.png"}
    payload = json.loads((tmp_path / "results" / "transformers_path_vit.json").read_text())
    check_metadata(payload, "transformers_path")
    assert set(payload["results"]) == {"plain", "smooth (fo=1, nn=1)"}
    assert all(row["removed"] >= row["budget"] for rows in payload["results"].values() for row in rows)


@pytest.mark.parametrize("spelling", ["--threads", "--num_threads"])
def test_common_flags_keep_their_older_spellings(spelling, tmp_path):
    args = load_benchmark("transformers_path").parse_args([spelling, "3", "--out-dir", str(tmp_path)])
    assert args.threads == 3 and args.output_dir == tmp_path


def test_cpu_launch_names_its_launches_and_refuses_others():
    cpu_launch = load_benchmark("cpu_launch")
    assert cpu_launch.parse_args(["--launches", "threads,processes"]).launches == ["threads", "processes"]
    with pytest.raises(SystemExit):
        cpu_launch.parse_args(["--launches", "threads,gpu"])
    assert cpu_launch.LAUNCHES["processes"][1] == 2  # the per-process batch is halved to keep the recipe's batch


def test_quantization_cnn_smoke(tmp_path):
    """The cnn part of benchmarks/quantization.py on a tiny timm CNN: dense, low-rank, PT2E int8 and both (timed at
    the evaluation batch, so that each model compiles once)."""
    import smooth_hf
    from smooth_hf.lowrank import LowRankConfig, compress

    model = tiny_resnet14(channels=(8, 16, 16), layers=(1, 1, 1), num_classes=3)
    save_dense(model, tmp_path / "dense")
    smooth_hf.save_pretrained(compress(model, LowRankConfig(param_reduction=0.5)), tmp_path / "lowrank")
    load_benchmark("quantization").main([
        "--parts", "cnn", "--cnn_dense", str(tmp_path / "dense"), "--cnn_lowrank", str(tmp_path / "lowrank"),
        "--cnn_dataset", save_tiny_fmnist(tmp_path / "data"), "--cnn_eval_samples", "16",
        "--cnn_calibration_images", "16", "--cnn_batch_sizes", "16", "--rounds", "1", "--min_round_ms", "1",
        "--warmup", "1", "--threads", "1", "--output_dir", str(tmp_path / "results"),
    ])
    saved = json.loads((tmp_path / "results" / "quantization.json").read_text())
    check_metadata(saved["meta"], "quantization")
    rows = saved["cnn"]["rows"]
    assert set(rows) == {"dense", "low-rank", "dense compiled", "low-rank compiled", "int8 (PT2E)",
                         "low-rank + int8 (PT2E)"}
    memory = {key: row["memory_bytes"] for key, row in rows.items()}
    assert memory["low-rank + int8 (PT2E)"] < memory["low-rank"] < memory["dense"]
    assert memory["int8 (PT2E)"] < memory["dense"]
    assert all(0 <= row["accuracy"] <= 1 and row["latency_ms"]["b16"] > 0 for row in rows.values())
    assert "| low-rank + int8 (PT2E) |" in (tmp_path / "results" / "quantization.md").read_text()


def test_fsdp2_smoke(tmp_path):
    """Two torchrun launches of 2 processes (DDP, then FSDP2) on a one-layer Llama: each rank's held bytes halve, the
    penalty communicates only under FSDP2, and the projection's bytes are counted in both."""
    result = load_benchmark("fsdp2").main(["--hidden", "64", "--layers", "1", "--vocab", "64", "--seq_len", "8",
                                           "--steps", "2", "--repeats", "1", "--output_dir", str(tmp_path),
                                           "--tag", "_smoke"])
    saved = json.loads((tmp_path / "fsdp2_smoke.json").read_text())
    check_metadata(saved["meta"], "fsdp2")
    summary = saved["summary"]
    assert summary == json.loads(json.dumps(result["summary"]))
    assert all(abs(ratio - 0.5) < 0.01 for ratio in summary["fsdp2_over_ddp_held_bytes"].values())
    penalty = summary["penalty_bytes_per_step"]
    assert penalty["ddp"]["penalty_refresh"] == penalty["ddp"]["penalty_cached"] == 0
    assert penalty["fsdp2"]["penalty_refresh"] > penalty["fsdp2"]["penalty_cached"] > 0
    assert penalty["ddp"]["projection"] > 0 and penalty["fsdp2"]["projection"] > 0
    assert [r["rank"] for r in saved["runs"]["fsdp2"]] == [0, 1]


def test_speed_size_times_channels_last_eager_and_layer_latency_compares_macs_with_time(tmp_path):
    save_dense(tiny_resnet14(channels=(8, 16, 16), layers=(1, 1, 1), num_classes=3), tmp_path / "cnn")
    common = ["--image_size", "12", "--threads", "1", "--output_dir", str(tmp_path / "results")]
    result = load_benchmark("speed_size").main([
        "--models", str(tmp_path / "cnn"), "--param_budgets", "", "--macs_budgets", "0.3", "--keep_budgets", "",
        "--batch_sizes", "2", "--runtimes", "eager,eager_cl,eager_fused", "--eval_dataset", "", "--rounds", "2",
        "--min_round_ms", "1", "--warmup", "1", "--compress_repeats", "1", "--tag", "_cl", *common,
    ])
    rows = {row["variant"]: row for row in result["models"][0]["rows"]}
    assert rows["macs0.3"]["latency_ms"]["eager_cl_b2"] > 0 and rows["dense"]["speedup"]["eager_cl_b2"] == 1.0
    assert rows["macs0.3"]["max_abs_diff"]["eager_cl_b2"] < 1e-4  # the same logits in channels_last
    assert rows["macs0.3"]["max_abs_diff"]["eager_fused_b2"] < 1e-4 and rows["macs0.3"]["latency_ms"]["eager_fused_b2"] > 0
    latency = load_benchmark("layer_latency").main([
        "--models", str(tmp_path / "cnn"), "--rule", "macs_reduction", "--budget", "0.3", "--batch_sizes", "2",
        "--tag", "_smoke", *common,
    ])
    check_metadata(latency["meta"], "layer_latency")
    assert [r["layout"] for r in latency["results"]] == ["contiguous", "channels_last"]
    for entry in latency["results"]:
        assert entry["rows"] and all(r["macs_cut"] < r["macs_dense"] and r["ms_dense"] > 0 for r in entry["rows"])
        assert entry["whole"]["dense_ms"] > 0
    assert "share of time removed" in (tmp_path / "results" / "layer_latency_smoke.md").read_text()


def test_finetune_cut_smoke(tmp_path):
    """Every part of benchmarks/finetune_cut.py on a tiny BERT checkpoint and sentences in the Pang & Lee format."""
    from test_text_models import FILLER, NEGATIVE, POSITIVE, SPECIAL, sentences, tiny_bert_classifier
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)})
    checkpoint = tmp_path / "tiny-bert"
    tiny_bert_classifier(tokenizer.vocab_size).bert.save_pretrained(checkpoint)  # an encoder, as MiniLM's folder
    tokenizer.save_pretrained(checkpoint)
    corpus = tmp_path / "cache" / "pang_lee" / "polarity-en-pang&lee2.csv"
    corpus.parent.mkdir(parents=True)
    rows = sentences(120, 0)
    corpus.write_text("\n".join(f'"{1 if label else -1}","{text}"' for text, label in zip(rows["text"], rows["label"],
                                                                                           strict=True)) + "\n")
    payload = load_benchmark("finetune_cut").main([
        "--parts", "polarity,schedule,cost,embed", "--text_model", str(checkpoint), "--cache_dir", str(tmp_path / "cache"),
        "--text_max_length", "12", "--max_steps", "4", "--every", "2", "--batch_size", "16", "--lr", "1e-3",
        "--plans", "0.5", "--budgets", "0.3,0.5", "--schedules", "0.1:0.6,0:0", "--cost_steps", "2", "--cost_rounds", "1",
        "--embed_budgets", "0.5", "--embed_sentences", "16", "--calibration_sentences", "32", "--threads", "1",
        "--output_dir", str(tmp_path / "results"), "--tag", "_smoke",
    ])
    check_metadata(payload["meta"], "finetune_cut")
    table = payload["polarity"]["table"]
    assert set(table["rows"]) == {"plain -> svd cut", "plain -> whitened cut", "projection (svd) -> svd cut",
                                  "whitened projection -> whitened cut"}
    projected = [r for r in payload["polarity"]["runs"].values() if r["plan"] is not None]
    assert projected and all(r["max_logit_change_at_plan"] < 1e-4 for r in projected)  # the cut at the plan: exact
    assert all(r["rows"][0]["accuracy"] == r["rows"][-1]["accuracy"] for r in projected)
    assert set(payload["schedule"]["schedules"]) == {"0.1:0.6", "0:0"}
    assert set(payload["cost"]["ratio_to_plain"]) == {"plain", "projection (svd)", "whitened projection"}
    assert set(payload["embed"]["rows"]) == {"training-free whitened cut",
                                            "trained with whitened projection (plan 50%) -> whitened cut"}
    markdown = (tmp_path / "results" / "finetune_cut_smoke.md").read_text()
    assert "| whitened projection -> whitened cut |" in markdown and "s/step" in markdown


def test_llm_scale_counts_the_layers_it_builds_and_fits_its_cost_model_to_what_it_measures():
    """One configuration of benchmarks/llm_scale.py in this process (the smallest shape, svd, streamed), and the
    arithmetic its report extends to 7B and 70B: the same parameters and Linear shapes as the model built, and a
    cost model whose fitted rate gives back the measured time."""
    from torch import nn

    from smooth_hf.lowrank import count_parameters

    llm = load_benchmark("llm_scale")
    model = llm.build("llama-58m", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert count_parameters(model) == llm._parameters("llama-58m") == llm.arithmetic("llama-58m", 16, 128)["parameters"]
    built = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear))
    assert built == sorted(llm._linears("llama-58m"))
    del model
    spec = {"shape": "llama-58m", "dtype": "bfloat16", "method": "svd", "path": "streamed", "device": "",
            "param_reduction": 0.3, "sequences": 16, "length": 128, "batch": 4, "threads": 1}
    rows = [llm.one(spec)]
    assert rows[0]["reduction"] == pytest.approx(0.3, abs=0.01) and rows[0]["peak_rss_bytes"] >= rows[0]["rss_after_build_bytes"]
    rows.append({**rows[0], "dtype": "float32"})  # the fit reads float32 rows
    llm._add_ratios(rows)
    rates = llm.fit_time(rows)
    assert set(rates) == {"svd"}
    assert llm.arithmetic("llama-58m", 16, 128)["operations"]["svd"] * rates["svd"] == pytest.approx(rows[1]["seconds"])
    seventy = llm.arithmetic("llama2-70b", 16, 128)
    assert seventy["parameters"] > 68e9 and seventy["largest_eigenproblem"] == 28672
    payload = {"command": "python benchmarks/llm_scale.py", "machine": {}, "date": "", "rows": rows,
               "seconds_per_operation": rates, "arithmetic": {s: llm.arithmetic(s, 16, 128) for s in ("llama-58m", "llama2-70b")}}
    table = llm.arithmetic_markdown(payload)
    assert "| llama2-70b | 68.98B |" in table and "| llama-58m |" in table

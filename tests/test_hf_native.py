"""Compressed transformers models, the Hugging Face way: model.save_pretrained -> AutoModelFor*.from_pretrained.

What an HF user tries first after ``compress``: ``model.save_pretrained``, the Auto classes, ``pipeline``,
``generate``, ``Trainer``, ``device_map`` and ``dtype=`` at load, mixed-precision models -- and what
happens when ``smooth_hf`` is not imported (a subprocess that never imports it). Tiny configs built in
the test (hidden 32, 2 layers); every comparison is ``torch.equal`` on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
    pipeline,
)

import smooth_hf
from smooth_hf import LowRankConfig, SmoothHfConfig, compress
from smooth_hf.core.files import COMPRESSION_CONFIG_NAME, WEIGHTS_NAME
from smooth_hf.integrations.transformers import QUANT_METHOD, SmoothHfQuantizer
from smooth_hf.lowrank import LowRankLinear, apply_ranks
from smooth_hf.lowrank.guard import guard_keys, is_guard

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot", "the", "a", "very"]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def tiny_t5_config() -> T5Config:
    return T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=32)


def from_saved_dense(model_cls, config, tmp_path: Path, **load_kwargs):
    """A model as users get one: saved, then loaded with from_pretrained (e.g. dtype=float16)."""
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path / "dense")
    return model_cls.from_pretrained(tmp_path / "dense", **load_kwargs).eval()


IDS = torch.randint(0, 12, (2, 7), generator=torch.Generator().manual_seed(1))
DECODER_IDS = torch.randint(0, 12, (2, 4), generator=torch.Generator().manual_seed(2))


def run(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "t5":
            return model(input_ids=IDS, decoder_input_ids=DECODER_IDS).logits
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def gpt2():
    model = compress(tiny_gpt2(), LowRankConfig(rank_ratio=0.5))
    return model, run(model, "gpt2")


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_model_save_pretrained_then_auto_class_is_exact(name, tmp_path):
    auto, model = {
        "gpt2": (AutoModelForCausalLM, lambda: tiny_gpt2()),
        "bert": (AutoModelForSequenceClassification, lambda: tiny_bert()),
        "t5": (AutoModelForSeq2SeqLM, lambda: from_saved_dense(T5ForConditionalGeneration, tiny_t5_config(), tmp_path)),
    }[name]
    model = compress(model(), LowRankConfig(param_reduction=0.3))
    expected = run(model, name)

    model.save_pretrained(tmp_path / "ckpt")  # transformers' own save, nothing of smooth_hf called by the user
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type  # the base architecture, untouched
    section = config["quantization_config"]
    assert section["quant_method"] == QUANT_METHOD and section["ranks"] == model.lowrank_config.ranks

    loaded = auto.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(run(loaded, name), expected)
    assert loaded.lowrank_config.ranks == model.lowrank_config.ranks
    assert isinstance(loaded.get_submodule(next(iter(model.lowrank_config.ranks))), LowRankLinear)
    assert isinstance(loaded.hf_quantizer, SmoothHfQuantizer)
    # Saving the reloaded model writes the same checkpoint again.
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_bytes() == (tmp_path / "ckpt" / "config.json").read_bytes()


def test_generate_after_reload(gpt2, tmp_path):
    model, _ = gpt2
    model.save_pretrained(tmp_path / "g")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(IDS), "pad_token_id": 0}
    assert torch.equal(loaded.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


def test_smooth_hf_and_transformers_write_the_same_checkpoint(gpt2, tmp_path):
    model, expected = gpt2
    model.save_pretrained(tmp_path / "hf")
    smooth_hf.save_pretrained(model, tmp_path / "smooth")
    for file in ("config.json", "generation_config.json"):
        assert (tmp_path / "hf" / file).read_bytes() == (tmp_path / "smooth" / file).read_bytes(), file
    a, b = load_file(tmp_path / "hf" / WEIGHTS_NAME), load_file(tmp_path / "smooth" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Each loader reads the other's folder.
    assert torch.equal(run(smooth_hf.from_pretrained(tmp_path / "hf"), "gpt2"), expected)
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path / "smooth"), "gpt2"), expected)
    assert (tmp_path / "smooth" / COMPRESSION_CONFIG_NAME).is_file() and not (tmp_path / "hf" / COMPRESSION_CONFIG_NAME).exists()


def test_saving_does_not_edit_the_model(gpt2, tmp_path):
    model, expected = gpt2
    before = (model.config.architectures, model.config.dtype, dict(model.lowrank_config.ranks))
    smooth_hf.save_pretrained(model, tmp_path / "s")
    assert (model.config.architectures, model.config.dtype, dict(model.lowrank_config.ranks)) == before
    assert torch.equal(run(model, "gpt2"), expected)


def test_compress_leaves_a_config_shared_with_a_dense_sibling_alone(tmp_path):
    """transformers does not copy the config a model is built from; the ranks written into the compressed model's
    must not make a dense model built from the same object save as compressed (its reload would then fail)."""
    config = tiny_bert().config
    compressed, dense = BertForSequenceClassification(config).eval(), BertForSequenceClassification(config).eval()
    compress(compressed, LowRankConfig(param_reduction=0.3))
    assert dense.config is config and getattr(config, "quantization_config", None) is None
    assert compressed.bert.config is compressed.config is not config  # one config inside the compressed model
    dense.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in reloaded.modules())
    assert torch.equal(run(reloaded, "bert"), run(dense, "bert"))


def test_card_of_a_model_reloaded_by_transformers_counts_every_layer(tmp_path):
    """Reloaded by an Auto class the model has no report; the card rebuilt from it must still count the layers that
    stayed dense (the tied decoder of a masked LM here), not say that every layer was factorised."""
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    model = compress(BertForMaskedLM(tiny_bert().config).eval(), LowRankConfig(param_reduction=0.3))

    def factorised_line(folder: Path) -> str:
        card = (folder / "README.md").read_text()
        return next(line for line in card.splitlines() if "Linear / Conv layers are factorised" in line)

    saved = smooth_hf.save_pretrained(model, tmp_path / "saved")
    reloaded = AutoModelForMaskedLM.from_pretrained(saved)
    line = factorised_line(smooth_hf.save_pretrained(reloaded, tmp_path / "resaved"))
    assert line == factorised_line(saved) and line.split()[0] != line.split()[2]  # "13 of 14 ...", not "14 of 14"


def test_checkpoint_from_a_head_model_loads_into_the_base_model(gpt2, tmp_path):
    model, _ = gpt2
    model.save_pretrained(tmp_path / "g")
    base = AutoModel.from_pretrained(tmp_path / "g")  # GPT2Model: names lose the "transformer." prefix
    assert base.lowrank_config.ranks == {k.removeprefix("transformer."): v for k, v in model.lowrank_config.ranks.items()}
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, model.transformer(IDS).last_hidden_state)


def test_guards_mark_every_factorised_layer_and_a_plain_load_state_dict_skips_them(gpt2, tmp_path):
    model, expected = gpt2
    model.save_pretrained(tmp_path / "g")
    weights = load_file(tmp_path / "g" / WEIGHTS_NAME)
    assert {k for k, v in weights.items() if is_guard(v)} == set(guard_keys(model.lowrank_config.ranks))
    # The manual path: build, apply_ranks, load_state_dict on the file. The guards are not "unexpected";
    # the only missing name is GPT-2's lm_head, tied to the embedding and stored once.
    fresh = apply_ranks(tiny_gpt2(), model.lowrank_config.ranks)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]
    assert torch.equal(run(fresh.eval(), "gpt2"), expected)


# ---------------------------------------------------------------------------------------------- what else reads it


def test_pipeline_runs_on_a_saved_folder(tmp_path):
    model = compress(tiny_bert(), LowRankConfig(rank_ratio=0.5))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")

    classify = pipeline("text-classification", model=str(tmp_path / "clf"), device="cpu", top_k=None)
    got = {d["label"]: d["score"] for d in classify(["the film was very good"])[0]}
    with torch.no_grad():
        probs = model(**tokenizer("the film was very good", return_tensors="pt")).logits.softmax(-1)[0]
    assert got == pytest.approx({"LABEL_0": probs[0].item(), "LABEL_1": probs[1].item()}, abs=1e-6)


def test_device_map_and_dtype_at_load(gpt2, tmp_path):
    model, expected = gpt2
    model.save_pretrained(tmp_path / "g")
    for device_map in ("cpu", "auto", {"": "cpu"}):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", device_map=device_map)
        assert torch.equal(run(loaded, "gpt2"), expected), device_map
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    half.float()  # transformers refuses .float() / .half() on quantized models: a low-rank model is not one
    assert {p.dtype for p in half.parameters()} == {torch.float32}


def test_trainer_evaluates_and_trains_a_reloaded_model(gpt2, tmp_path):
    from datasets import Dataset

    model, _ = gpt2
    model.save_pretrained(tmp_path / "g")
    data = Dataset.from_dict({"input_ids": IDS.repeat(2, 1).tolist(), "labels": IDS.repeat(2, 1).tolist()})
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, use_cpu=True,
                report_to=[], save_strategy="no", learning_rate=1e-2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    factor = loaded.transformer.h[0].attn.c_attn.up.weight.detach().clone()
    trainer = smooth_hf.SmoothTrainer(model=loaded, args=smooth_hf.SmoothTrainingArguments(**args),
                                      train_dataset=data, eval_dataset=data)
    assert trainer.evaluate()["eval_loss"] > 0
    trainer.train()
    assert not torch.equal(factor, loaded.transformer.h[0].attn.c_attn.up.weight), "the factors did not train"
    trainer.save_model(str(tmp_path / "trained"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert torch.equal(run(again, "gpt2"), run(loaded.eval(), "gpt2"))
    # The plain Trainer accepts the in-memory compressed model too (its "quantized model" checks pass).
    assert Trainer(model=model, args=TrainingArguments(**args), eval_dataset=data).evaluate()["eval_loss"] > 0


# ---------------------------------------------------------------------------------------------- dtypes


def test_t5_float32_wo_in_a_float16_model_survives(tmp_path):
    model = from_saved_dense(T5ForConditionalGeneration, tiny_t5_config(), tmp_path, dtype=torch.float16)
    compress(model, LowRankConfig(param_reduction=0.3))
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.up.weight"] == torch.float32  # transformers' island
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wi.up.weight"] == torch.float16
    expected = run(model, "t5")
    model.save_pretrained(tmp_path / "t5")
    smooth_hf.save_pretrained(model, tmp_path / "t5-smooth")
    for loaded in (AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5"), smooth_hf.from_pretrained(tmp_path / "t5-smooth")):
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
        assert torch.equal(run(loaded, "t5"), expected)


def test_bf16_llama_with_float32_lm_head_survives(tmp_path):
    model = from_saved_dense(LlamaForCausalLM, tiny_llama_config(), tmp_path, dtype=torch.bfloat16)
    model.lm_head.float()
    compress(model, LowRankConfig(param_reduction=0.3))
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["lm_head.up.weight"] == torch.float32 and dtypes["model.layers.0.mlp.up_proj.up.weight"] == torch.bfloat16

    def logits(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 head needs autocast
            return m(input_ids=IDS).logits

    expected = logits(model)
    model.save_pretrained(tmp_path / "llama")
    section = json.loads((tmp_path / "llama" / "config.json").read_text())["quantization_config"]
    assert section["dtype"] == "bfloat16" and section["dtypes"] == {"lm_head.down.weight": "float32",
                                                                    "lm_head.up.weight": "float32"}
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), smooth_hf.from_pretrained(tmp_path / "llama")):
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
        assert torch.equal(logits(loaded), expected)
    # An explicit other dtype= wins over the recorded islands, as for any transformers model.
    as_fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------- refusals


def test_weights_without_their_factors_are_an_error(gpt2, tmp_path):
    model, _ = gpt2
    model.save_pretrained(tmp_path / "g")
    weights = load_file(tmp_path / "g" / WEIGHTS_NAME)
    dropped = "transformer.h.1.mlp.c_fc.up.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "g" / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack the low-rank factors .*mlp\.c_fc\.up\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match=r"lack the low-rank factors") as info:
        smooth_hf.from_pretrained(tmp_path / "g")
    assert str(tmp_path / "g") in str(info.value)


def test_legacy_folder_without_quantization_config_still_loads(gpt2, tmp_path):
    """Folders saved before config.json carried the ranks: compression_config.json alone, no guards."""
    model, expected = gpt2
    folder = smooth_hf.save_pretrained(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(folder / WEIGHTS_NAME).items() if not is_guard(v)}
    save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    assert torch.equal(run(smooth_hf.from_pretrained(folder), "gpt2"), expected)


def test_two_configs_that_disagree_are_an_error(gpt2, tmp_path):
    model, _ = gpt2
    folder = smooth_hf.save_pretrained(model, tmp_path / "s")
    data = json.loads((folder / COMPRESSION_CONFIG_NAME).read_text())
    data["ranks"]["transformer.h.0.mlp.c_fc"] -= 1
    (folder / COMPRESSION_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different saves"):
        smooth_hf.from_pretrained(folder)


def test_config_section_round_trips_and_refuses_bad_values():
    section = SmoothHfConfig(lowrank=LowRankConfig(rank_ratio=0.5, ranks={"a": 2}), dtype="float16",
                             dtypes={"a.up.weight": "float32"})
    again = SmoothHfConfig.from_dict(json.loads(json.dumps(section.to_dict())))
    assert again == section and again.ranks == {"a": 2}
    with pytest.raises(ValueError, match="not a torch dtype"):
        SmoothHfConfig(lowrank=LowRankConfig(rank_ratio=0.5), dtype="float17")
    with pytest.raises(ValueError, match="Unknown LowRankConfig keys: rank_ration"):
        SmoothHfConfig.from_dict({"quant_method": QUANT_METHOD, "rank_ration": 0.5})


def test_asking_transformers_to_compress_while_loading_says_what_to_do(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"cannot compress a model while it loads.*smooth_hf\.compress"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=SmoothHfConfig(
            lowrank=LowRankConfig(rank_ratio=0.5)))


def test_card_shows_the_transformers_path_first(gpt2, tmp_path):
    model, _ = gpt2
    card = (smooth_hf.save_pretrained(model, tmp_path / "s") / "README.md").read_text()
    how_to = card[card.index("## How to use"):]
    assert how_to.index("import smooth_hf") < how_to.index(f'GPT2LMHeadModel.from_pretrained("{tmp_path / "s"}")')
    assert "quantization_config" in how_to and "size-mismatch error" in how_to


# ---------------------------------------------------------------------------------------------- without smooth_hf

WITHOUT_SMOOTH_HF = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForCausalLM
    out = {}
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
        out["raised"] = None
    except Exception as err:
        out["raised"], out["message"] = type(err).__name__, str(err)
    out["smooth_hf_imported"] = "smooth_hf" in sys.modules
    print("RESULT " + json.dumps(out))
    """
)


def test_loading_without_import_smooth_hf_fails_loudly(gpt2, tmp_path):
    model, _ = gpt2
    model.save_pretrained(tmp_path / "g")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_SMOOTH_HF, str(tmp_path / "g")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["smooth_hf_imported"] is False
    # What the user sees: transformers' warning names the method, its load report lists every factorised
    # layer's weight as a size mismatch, and the load stops instead of returning random weights.
    assert "Unknown quantization type, got smooth_hf" in proc.stderr
    assert "MISMATCH" in proc.stderr and "torch.Size([1])" in proc.stderr
    assert out["raised"] == "RuntimeError" and "ignore_mismatched_sizes" in out["message"]


# ---------------------------------------------------------------------------------------------- the Hub

PUSH_AND_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import smooth_hf  # noqa: F401  (registers the quantization method)
    from transformers import AutoModelForCausalLM

    args = json.loads(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(args["local"])
    url = model.push_to_hub(args["repo_id"])
    loaded = AutoModelForCausalLM.from_pretrained(args["repo_id"])
    ids = load_file(args["io"])["ids"]
    with torch.no_grad():
        save_file({"logits": loaded(input_ids=ids).logits}, args["result"])
    print("RESULT " + json.dumps({"url": str(url), "class": type(loaded.transformer.h[0].attn.c_attn).__name__}))
    """
)


def test_push_to_hub_and_load_by_repo_id(gpt2, tmp_path):
    from hub_server import FakeHub
    from test_hub_e2e import TOKEN, USER, run_client

    model, expected = gpt2
    model.save_pretrained(tmp_path / "local")
    save_file({"ids": IDS}, tmp_path / "io.safetensors")
    repo_id = f"{USER}/gpt2-native"
    with FakeHub(tmp_path / "hub", token=TOKEN, user=USER) as hub:
        out = run_client(PUSH_AND_LOAD, {"local": str(tmp_path / "local"), "repo_id": repo_id,
                                         "io": str(tmp_path / "io.safetensors"),
                                         "result": str(tmp_path / "out.safetensors")}, hub.url, tmp_path)
        files = hub.files(repo_id)
    assert out["class"] == "LowRankLinear"
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], expected)
    assert {"config.json", WEIGHTS_NAME} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == QUANT_METHOD

"""LoRA (peft) on a compressed transformers model, through the calls a user makes: ``get_peft_model`` on the loaded
compressed model, a training step, ``save_pretrained`` of the adapter, ``PeftModel.from_pretrained`` on a freshly
loaded compressed base, ``merge_and_unload``; the merged model is still the compressed model and saves as one."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed_model, logits
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import smooth_hf
from smooth_hf.lowrank import LowRankLayer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, _ = compressed_model("bert")
    return smooth_hf.save_pretrained(model, tmp_path_factory.mktemp("bert") / "compressed")


def test_lora_trains_saves_reloads_and_merges_into_the_compressed_model(folder, tmp_path):
    compressed, inputs = compressed_model("bert")
    base = AutoModelForSequenceClassification.from_pretrained(folder)
    # the classifier is not adapted: task_type="SEQ_CLS" trains it in full (peft's modules_to_save)
    factorised = {name for name, m in base.named_modules() if isinstance(m, LowRankLayer)} - {"classifier"}
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    adapted = {name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for name, _ in model.named_parameters() if ".lora_A." in name}
    # "all-linear" puts one adapter on each factor of a factorised layer, none on the pair as a whole
    assert factorised and all({f"{name}.down", f"{name}.up"} <= adapted for name in factorised)
    assert not adapted & factorised

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    model.eval()
    trained = logits(model, inputs)
    assert not torch.allclose(trained, logits(compressed, inputs))  # the step changed the model
    model.save_pretrained(tmp_path / "adapter")

    fresh = AutoModelForSequenceClassification.from_pretrained(folder)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, inputs), trained, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), trained, rtol=0, atol=1e-5)
    # the adapters went into the factors: same layers, same ranks, no more parameters than the compressed model
    assert {n: m.rank for n, m in merged.named_modules() if isinstance(m, LowRankLayer)} == compressed.lowrank_config.ranks
    assert smooth_hf.count_parameters(merged) == smooth_hf.count_parameters(compressed)
    saved = smooth_hf.from_pretrained(smooth_hf.save_pretrained(merged, tmp_path / "merged"))
    torch.testing.assert_close(logits(saved, inputs), logits(merged, inputs), rtol=0, atol=0)

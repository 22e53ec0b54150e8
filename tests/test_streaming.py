"""Block-streamed compression (smooth_hf.lowrank.streaming): the same ranks, and factors to float32 round-off, as
compressing the model whole, one block of statistics at a time, dense weights released as their factors replace them."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
from conftest import tiny_resnet14
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import smooth_hf.lowrank.offload as offload
import smooth_hf.lowrank.streaming as streaming
from smooth_hf.lowrank import LowRankConfig, compress
from smooth_hf.lowrank.blocks import find_blocks
from smooth_hf.lowrank.targeting import find_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def llama(dtype: torch.dtype = torch.float32, layers: int = 3) -> nn.Module:
    """Grouped-query attention (k/v narrower than q), untied LM head: the shapes of Llama and Qwen2."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2() -> nn.Module:
    """HF Conv1D layers (weights stored transposed) and a tied LM head."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


def bert() -> nn.Module:
    """An encoder with a pooler and a classifier outside the blocks."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def text_batches(n: int = 3, length: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, length - 3 :] = 0  # padding: the masks must travel with the blocks' inputs
        batches.append({"input_ids": torch.randint(0, 96, (2, length), generator=g), "attention_mask": mask})
    return batches


CONFIGS = {
    "svd": LowRankConfig(param_reduction=0.3),
    "whitened": LowRankConfig(param_reduction=0.3, method="whitened"),
    "sensitivity": LowRankConfig(param_reduction=0.3, method="whitened", rank_allocation="sensitivity",
                                 sensitivity_samples=2),
    "embeddings": LowRankConfig(param_reduction=0.3, method="whitened", factorise_embeddings=True),
}
MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def compressed(model: nn.Module, config: LowRankConfig, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    data = text_batches() if config.method == "whitened" else None
    return compress(model, config, calibration_data=data, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_the_blocks_are_found_without_naming_an_architecture(name):
    model = MODELS[name]()
    layers = {n: m.weight.numel() for n, m in find_layers(model)}
    blocks = find_blocks(model, layers)
    expected = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}[name]
    assert blocks.names == [f"{expected}.{i}" for i in range(len(blocks.names))] and len(blocks.names) >= 2
    assert blocks.owner(f"{expected}.1.mlp.down_proj" if name == "llama" else f"{expected}.1.x") == 1
    assert blocks.owner("lm_head") is None


def test_models_without_repeated_blocks_are_compressed_whole():
    cnn = tiny_resnet14()
    assert find_blocks(cnn, {n: m.weight.numel() for n, m in find_layers(cnn)}) is None
    with pytest.raises(ValueError, match="streaming=True, but the model has no repeated blocks"):
        compress(cnn, LowRankConfig(param_reduction=0.3), streaming=True)
    with pytest.raises(ValueError, match="sequential=True cuts a model block after block"):
        compress(cnn, LowRankConfig(param_reduction=0.3, method="whitened", sequential=True),
                 calibration_data=[torch.randn(2, 1, 12, 12)])
    compress(cnn, LowRankConfig(param_reduction=0.3))  # the default compresses it whole
    assert cnn.lowrank_report.reduction >= 0.3


def test_streaming_false_compresses_whole_what_could_stream():
    model = llama(layers=2)
    with pytest.raises(ValueError, match="sequential=True cuts a model block after block, but streaming=False"):
        compress(model, LowRankConfig(param_reduction=0.3, method="whitened", sequential=True),
                 calibration_data=text_batches(), streaming=False)
    with pytest.raises(ValueError, match="rank_allocation='sensitivity' runs the whole model"):  # streamed
        compress(model, LowRankConfig(param_reduction=0.3, method="whitened", rank_allocation="sensitivity"),
                 calibration_data=text_batches(), device="cpu")
    # Whole, the model itself is on the device: the sensitivity allocation runs there.
    compress(model, LowRankConfig(param_reduction=0.3, method="whitened", rank_allocation="sensitivity",
                                  sensitivity_samples=2), calibration_data=text_batches(), device="cpu", streaming=False)
    assert model.lowrank_report.reduction == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_streamed_cut_chooses_the_same_ranks_and_factors_as_the_whole_model(name, config):
    model = MODELS[name]()
    whole = compressed(model, CONFIGS[config], streaming=False)
    streamed = compressed(model, CONFIGS[config], streaming=True)
    assert streamed.lowrank_config == whole.lowrank_config and whole.lowrank_config.ranks
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # the same float64 math on the same statistics; the vectors waited in float32
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert streamed.lowrank_report.to_dict() == whole.lowrank_report.to_dict()
    batch = text_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(streamed(**batch).logits, whole(**batch).logits, rtol=1e-5, atol=1e-6)


def test_blocks_sharing_an_input_share_one_gram_and_each_block_is_released_before_the_next(monkeypatch):
    """q/k/v (and gate/up) read one tensor: one Gram for them. When block i + 1 is decomposed, block i's Grams are
    gone, and once a layer is cut its dense weight is not held by compress any more."""
    model = llama()
    seen = []  # (layer, weak reference to its Gram)
    real = streaming.whiten

    def spying(matrix, gram, damping, **kwargs):
        seen.append(weakref.ref(gram))
        return real(matrix, gram, damping, **kwargs)

    monkeypatch.setattr(streaming, "whiten", spying)
    decompositions_per_block, alive_before = {}, []
    real_block_grams = streaming._block_grams

    def block_grams(block, layers, inputs, keep_outputs):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in seen))  # Grams of earlier blocks still held
        grams = real_block_grams(block, layers, inputs, keep_outputs)
        decompositions_per_block[len(decompositions_per_block)] = len({id(g) for g in grams.values()})
        return grams

    monkeypatch.setattr(streaming, "_block_grams", block_grams)
    dense = {name: weakref.ref(m) for name, m in find_layers(model)}
    compress(model, LowRankConfig(param_reduction=0.3, method="whitened"), calibration_data=text_batches(),
             streaming=True)
    assert alive_before == [0, 0, 0], "a block's Gram matrices outlived it"
    # 7 layers a block, 4 distinct inputs: q/k/v, o, gate/up, down
    assert decompositions_per_block == {0: 4, 1: 4, 2: 4}
    gc.collect()
    cut = [name for name in model.lowrank_config.ranks]
    assert cut and all(dense[name]() is None for name in cut), "a cut layer's dense weight is still referenced"


def test_decompositions_wait_on_disk_when_memory_is_short(monkeypatch, tmp_path):
    model = llama()
    in_memory = compressed(model, CONFIGS["whitened"], streaming=True)
    written = []
    real_put = offload.DecompositionStore.put

    def put(self, name, tensors):
        real_put(self, name, tensors)
        written.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(offload, "DEFAULT_RAM_BYTES", 0)
    monkeypatch.setattr(offload.DecompositionStore, "put", put)
    on_disk = compressed(model, CONFIGS["whitened"], streaming=True, offload_folder=tmp_path)
    assert written and written[-1], "nothing was written to the offload folder"
    assert list(tmp_path.iterdir()) == [], "the offloaded files were not removed"
    for key, value in in_memory.state_dict().items():
        assert torch.equal(on_disk.state_dict()[key], value)


def test_the_vectors_wait_in_float32_unless_the_model_is_float64(tmp_path):
    vectors = torch.randn(40, 6, dtype=torch.float64)
    with offload.DecompositionStore(tmp_path, ram_bytes=0) as store:
        store.put("layer", {"u": vectors, "index": torch.arange(3)})
        assert store.disk_bytes == 40 * 6 * 4 + 3 * 8  # half the float64 bytes; integers as they are
        back = store.pop("layer")
    assert back["u"].dtype == torch.float64 and back["index"].dtype == torch.int64
    assert torch.equal(back["u"], vectors.float().double()) and not torch.equal(back["u"], vectors)
    # A float64 model keeps its vectors in float64: its streamed cut is the whole-model cut, bit for bit.
    model = llama(torch.float64)
    whole = compressed(model, CONFIGS["whitened"], streaming=False)
    streamed = compressed(model, CONFIGS["whitened"], streaming=True)
    assert whole.lowrank_config.ranks and streamed.lowrank_config == whole.lowrank_config
    for key, value in whole.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], value), key


def test_a_device_given_streams_the_model_through_it_and_leaves_it_where_it_was():
    """device=... runs the passes through accelerate's cpu_offload and moves each block there and back; on this CPU
    the device is the CPU, so the code path runs and the result must equal the plain one."""
    model = llama()
    plain = compressed(model, CONFIGS["whitened"], streaming=True)
    through = compressed(model, CONFIGS["whitened"], streaming=True, device="cpu")
    assert all(p.device.type == "cpu" for p in through.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in through.modules()), "accelerate's hooks were left on the model"
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(through.state_dict()[key], value)


def test_bf16_models_are_cut_without_upcasting_the_model(monkeypatch):
    """The per-layer math is float64, the vectors wait in float32 (not bf16), the factors come back in the model's
    dtype, and the model never holds a float32 copy: every parameter stays bf16. An svd cut of the bf16 weights equals
    the float32 cut of the same (bf16-rounded) weights, rounded to bf16."""
    stores = []

    class Recorded(offload.DecompositionStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self.dtype)

    monkeypatch.setattr(streaming, "DecompositionStore", Recorded)
    model = llama(torch.bfloat16)
    cut = compressed(model, CONFIGS["svd"], streaming=True)
    assert stores == [torch.float32]
    assert {p.dtype for p in cut.parameters()} == {torch.bfloat16}
    reference = compressed(copy.deepcopy(model).float(), CONFIGS["svd"], streaming=True)
    assert reference.lowrank_config.ranks == cut.lowrank_config.ranks
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(cut.state_dict()[key], value.bfloat16(), rtol=0, atol=0)
    whitened = compressed(model, CONFIGS["whitened"], streaming=True)
    assert {p.dtype for p in whitened.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(whitened(**text_batches(1)[0]).logits).all()


def test_sequential_cut_takes_each_blocks_statistics_on_the_cut_blocks_outputs():
    """A brute-force reference: cut block 0 at its planned ranks, then whiten block 1 on what the cut block 0
    outputs. The sequential cut's block 1 is exactly that; the parallel cut's is not."""
    model = llama(layers=2)
    batches = text_batches()
    parallel = compressed(model, LowRankConfig(param_reduction=0.3, method="whitened"), streaming=True)
    sequential = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.3, method="whitened", sequential=True),
                          calibration_data=batches)
    assert sequential.lowrank_config.ranks == parallel.lowrank_config.ranks  # allocated on the dense statistics
    assert sequential.lowrank_config.sequential
    # reference: block 0 as cut (sequential == parallel there: its inputs are the embeddings, untouched)
    reference = copy.deepcopy(model)
    reference.model.layers[0] = copy.deepcopy(parallel.model.layers[0])
    ranks = {n: r for n, r in parallel.lowrank_config.ranks.items() if n.startswith("model.layers.1.")}
    from smooth_hf.lowrank.whitening import collect_input_grams, whitened_decomposition, whitened_factors

    layers = {n: reference.get_submodule(n) for n in ranks}
    grams = collect_input_grams(reference, layers, batches)
    for name, rank in ranks.items():
        u, s, rows = whitened_decomposition(layers[name].weight, grams.grams[name], 0.01)
        up, down = whitened_factors(u, s, rows, rank, torch.float32)
        cut = sequential.get_submodule(name)
        torch.testing.assert_close(cut.up.weight, up, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cut.down.weight, down, rtol=1e-4, atol=1e-5)
    differs = any(not torch.allclose(sequential.get_submodule(n).up.weight, parallel.get_submodule(n).up.weight)
                  for n in ranks)
    assert differs, "the sequential cut of block 1 is the parallel one: its statistics ignored block 0's cut"


class Doubling(nn.Module):
    """Blocks that are not a plain chain: the model doubles the hidden states between two blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * 2
        return self.head(x)


def test_blocks_that_are_not_a_plain_chain_are_compressed_whole(caplog):
    model = Doubling()
    data = [torch.randn(4, 16) for _ in range(2)]
    config = LowRankConfig(rank_ratio=0.5, method="whitened")
    with pytest.raises(ValueError, match="cannot be streamed \\(block 1 does not read block 0's output\\)"):
        compress(copy.deepcopy(model), config, calibration_data=data, streaming=True)
    with caplog.at_level(logging.INFO, logger="smooth_hf.lowrank.compress"):
        whole = compress(copy.deepcopy(model), config, calibration_data=data)
    assert "compressed whole" in caplog.text and whole.lowrank_config.ranks
    reference = compress(copy.deepcopy(model), config, calibration_data=data, streaming=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(whole.state_dict()[key], value)

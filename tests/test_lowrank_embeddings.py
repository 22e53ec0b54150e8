"""Word embeddings as compression targets (``LowRankConfig(factorise_embeddings=True)``): the table is the linear map
from one-hot tokens, cut by truncated SVD or whitened by the calibration data's token counts; saved and reloaded like
every other low-rank layer; never a target unless asked, and never penalised."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits
from torch import nn

import smooth_hf
from smooth_hf.lowrank import LowRankConfig, LowRankEmbedding, calibrate, compress, factorise
from smooth_hf.lowrank.targeting import find_layers
from smooth_hf.lowrank.whitening import output_error, whitened_decomposition, whitened_factors

WORDS = "bert.embeddings.word_embeddings"
VOCAB = 400


def tiny_bert():
    """A BERT whose word embeddings hold most of its parameters, as in a small real one (MiniLM: half)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _batches(n: int = 3, vocab: int = VOCAB, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab // 2, (4, 10), generator=g)  # half of the vocabulary never appears
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(4, dtype=torch.long)})
    return out


def test_factorised_table_is_the_truncated_svd_of_the_lookup():
    torch.manual_seed(0)
    table = nn.Embedding(40, 12, padding_idx=0)
    low = factorise(table, 5)
    assert isinstance(low, LowRankEmbedding) and low.padding_idx == 0 and low.down.padding_idx == 0
    u, s, vh = torch.linalg.svd(table.weight.detach().double())
    best = (u[:, :5] * s[:5]) @ vh[:5]  # Eckart-Young: the best rank-5 table
    torch.testing.assert_close(low.dense_weight().double(), best, atol=1e-5, rtol=0)
    ids = torch.tensor([[0, 3, 39], [7, 7, 1]])
    torch.testing.assert_close(low(ids), low.dense_weight()[ids])
    assert sum(p.numel() for p in low.parameters()) == 5 * (40 + 12)


def test_whitened_table_minimises_the_error_on_the_calibration_tokens():
    """With a diagonal Gram (token counts), the whitened cut is the best rank-r table for the tokens as they occur,
    and never worse on them than plain SVD; its error is the tail of the whitened spectrum (plus the damping's)."""
    torch.manual_seed(0)
    table = torch.randn(30, 8, dtype=torch.float64)  # vocab x dim
    counts = torch.zeros(30, dtype=torch.float64)
    counts[:10] = torch.arange(1, 11, dtype=torch.float64) ** 2  # a few frequent tokens, 20 never seen
    matrix, damping, rank = table.t(), 1e-6, 3
    u, s, rows = whitened_decomposition(matrix, counts, damping)
    up, down = whitened_factors(u, s, rows, rank, torch.float64)
    whitened_error = output_error(matrix, up @ down, counts)
    uu, ss, vv = torch.linalg.svd(matrix, full_matrices=False)
    assert whitened_error < output_error(matrix, (uu[:, :rank] * ss[:rank]) @ vv[:rank], counts)
    assert whitened_error == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-3)
    # the direct computation: a weighted low-rank fit of the seen rows, weights sqrt(count)
    seen = counts > 0
    root = counts[seen].sqrt()
    a, b, c = torch.linalg.svd(matrix[:, seen] * root, full_matrices=False)
    direct = float((b[rank:] ** 2).sum())
    assert whitened_error == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_bert_with_factorised_embeddings_saves_and_reloads_with_equal_logits(tmp_path, method):
    model = tiny_bert().eval()
    batches = _batches()
    config = LowRankConfig(param_reduction=0.3, factorise_embeddings=True, method=method)
    compress(model, config, calibration_data=batches if method == "whitened" else None)
    assert isinstance(model.get_submodule(WORDS), LowRankEmbedding)
    assert WORDS in model.lowrank_config.ranks and model.lowrank_report.reduction >= 0.3
    (row,) = [r for r in model.lowrank_report.layers if r.name == WORDS]
    assert row.kind == "embedding" and row.shape == (16, VOCAB, 1, 1)
    model.save_pretrained(tmp_path / "hf")  # the transformers path
    smooth_hf.save_pretrained(model, tmp_path / "smooth")
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    for folder in ("hf", "smooth"):
        reloaded = smooth_hf.from_pretrained(tmp_path / folder)
        assert isinstance(reloaded.get_submodule(WORDS), LowRankEmbedding)
        torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_whitened_embeddings_favour_the_tokens_the_data_use():
    """Tokens the calibration data never use weigh little: on text made of the seen tokens, the whitened cut of the
    table is closer to the dense model than the plain one, at the same ranks."""
    dense = tiny_bert().eval()
    batches = _batches()
    grams = calibrate(dense, LowRankConfig(param_reduction=0.3, factorise_embeddings=True, method="whitened"), batches)
    counts = grams.grams[WORDS]
    assert counts.shape == (VOCAB,) and counts[VOCAB // 2 :].sum() == 0  # counts, not a vocab x vocab matrix
    ranks = {WORDS: 4}
    plain, whitened = copy.deepcopy(dense), copy.deepcopy(dense)
    compress(plain, LowRankConfig(rank_ratio=0.25, factorise_embeddings=True, target_modules=["word_embeddings"]))
    compress(whitened, LowRankConfig(rank_ratio=0.25, factorise_embeddings=True, target_modules=["word_embeddings"],
                                     method="whitened"), calibration_data=grams)
    assert plain.lowrank_config.ranks == whitened.lowrank_config.ranks == ranks
    seen = torch.cat([b["input_ids"] for b in batches]).flatten()
    shuffled = seen[torch.randperm(len(seen), generator=torch.Generator().manual_seed(1))][:40].reshape(4, 10)
    held_out = {"input_ids": shuffled, "attention_mask": torch.ones_like(shuffled)}  # other sentences, the same tokens
    reference = logits(dense, held_out)
    assert (logits(whitened, held_out) - reference).norm() < (logits(plain, held_out) - reference).norm()


def test_embeddings_are_targets_only_when_asked():
    model = tiny_bert()
    assert not any(isinstance(m, nn.Embedding) for _, m in find_layers(model))  # penalties, default compression
    with_embeddings = dict(find_layers(model, embeddings=True))
    assert WORDS in with_embeddings
    # skip_first_last leaves out the first and last Linear, not an embedding
    skipped = [n for n, _ in find_layers(model, skip_first_last=True, embeddings=True)]
    linears = [n for n, _ in find_layers(model)]
    assert WORDS in skipped and linears[0] not in skipped and linears[-1] not in skipped
    compress(model, LowRankConfig(param_reduction=0.2))
    assert isinstance(model.get_submodule(WORDS), nn.Embedding) and WORDS not in model.lowrank_config.ranks
    rescaling = nn.Embedding(10, 4, max_norm=1.0)  # its forward renormalises rows: not a plain lookup
    assert find_layers(nn.ModuleDict({"e": rescaling}), embeddings=True) == []


def test_embeddings_with_a_compute_budget_are_refused():
    with pytest.raises(ValueError, match="does not count multiply-adds"):
        LowRankConfig(macs_reduction=0.5, factorise_embeddings=True)
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="without example_inputs"):
        compress(model, LowRankConfig(param_reduction=0.2, factorise_embeddings=True),
                 example_inputs={"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

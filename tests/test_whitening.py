"""Whitened (activation-aware) truncation: the math against direct computations, the calibration batch forms,
bad calibration data, data-aware allocation, and a whitened model saved and reloaded."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyConvNet, logits, tiny_bert, tiny_resnet14, tiny_vit
from torch import nn

import smooth_hf
from smooth_hf.core.files import COMPRESSION_CONFIG_NAME
from smooth_hf.lowrank import LowRankConfig, calibrate, compress
from smooth_hf.lowrank.layers import truncated_svd_factors, weight_matrix
from smooth_hf.lowrank.whitening import (
    collect_input_grams,
    output_error,
    whitened_decomposition,
    whitened_factors,
)

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def anisotropic_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``(n, d)`` float64 inputs whose features have very different scales, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, d, dtype=torch.float64)


def whitened_weight(w: torch.Tensor, x: torch.Tensor, rank: int, damping: float) -> torch.Tensor:
    u, s, rows = whitened_decomposition(w, x.t() @ x, damping)
    up, down = whitened_factors(u, s, rows, rank, torch.float64)
    return up @ down


def svd_weight(w: torch.Tensor, rank: int) -> torch.Tensor:
    up, down = truncated_svd_factors(w, rank)
    return up @ down


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)], ids=["wide", "tall"])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_linear_whitened_cut_attains_the_minimum_output_error_and_beats_plain_svd(rank, shape):
    w = torch.randn(*shape, dtype=torch.float64)
    x = anisotropic_inputs(200, shape[1])  # rows are input vectors; X = x^T
    best = torch.linalg.svdvals(w @ x.t())[rank:].square().sum()  # Eckart-Young on W X: the minimum over rank-r W'
    whitened = whitened_weight(w, x, rank, damping=1e-12)
    error = ((w - whitened) @ x.t()).square().sum()
    assert error == pytest.approx(float(best), rel=1e-6)
    assert error < ((w - svd_weight(w, rank)) @ x.t()).square().sum()
    assert torch.linalg.matrix_rank(whitened) == rank


def test_damped_cut_is_exactly_the_ridge_optimum():
    """With damping, the cut minimises ||(W - W') X||^2 + lam ||W - W'||^2: Eckart-Young on [W X, sqrt(lam) W]."""
    w, x, rank, damping = torch.randn(6, 10, dtype=torch.float64), anisotropic_inputs(40, 10), 3, 0.05
    gram = x.t() @ x
    lam = damping * float(gram.diagonal().mean())
    best = torch.linalg.svdvals(torch.cat([w @ x.t(), lam**0.5 * w], dim=1))[rank:].square().sum()
    whitened = whitened_weight(w, x, rank, damping)
    objective = ((w - whitened) @ x.t()).square().sum() + lam * (w - whitened).square().sum()
    assert objective == pytest.approx(float(best), rel=1e-9)


def test_rank_deficient_gram_gives_finite_factors_that_fit_the_data():
    """Fewer samples than features: no Cholesky exists; the damped eigen-whitening still fits the data exactly."""
    w = torch.randn(10, 16, dtype=torch.float64)
    x = anisotropic_inputs(4, 16)  # rank-4 Gram of a 16-feature layer
    whitened = whitened_weight(w, x, rank=4, damping=1e-8)
    assert torch.isfinite(whitened).all()
    scale = (w @ x.t()).square().sum()
    assert ((w - whitened) @ x.t()).square().sum() / scale < 1e-6  # rank 4 >= rank of the data: nothing lost on it
    assert ((w - svd_weight(w, 4)) @ x.t()).square().sum() / scale > 1e-2  # plain SVD loses a lot there
    # In the directions the data never excite, the damped cut stays close to W rather than blowing up.
    assert (w - whitened).norm() < 2 * w.norm()


@pytest.mark.parametrize("out", [14, 6], ids=["tall", "wide"])
def test_eigen_fallback_gives_the_same_cut_as_cholesky(monkeypatch, out):
    """Where round-off defeats Cholesky, the eigen-decomposition takes over; any square root gives the same W'
    (a wide weight needs no square root at all: it is cut from W (G + λI) W^T)."""
    w, x = torch.randn(out, 10, dtype=torch.float64), anisotropic_inputs(5, 10)  # rank-deficient Gram
    cholesky = whitened_weight(w, x, 3, damping=1e-3)
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (real(a)[0], torch.tensor(1)))  # "not positive definite"
    torch.testing.assert_close(whitened_weight(w, x, 3, damping=1e-3), cholesky, rtol=1e-9, atol=1e-9)


def test_layer_that_saw_only_zeros_falls_back_to_plain_svd():
    w = torch.randn(5, 7, dtype=torch.float64)
    u, s, rows = whitened_decomposition(w, torch.zeros(7, 7, dtype=torch.float64), 0.01)
    assert torch.allclose(u[:, :2] * s[:2] @ rows[:2], svd_weight(w, 2), atol=1e-10)


def test_damping_must_be_positive():
    with pytest.raises(ValueError, match="damping must be > 0"):
        whitened_decomposition(torch.randn(3, 4), torch.eye(4), 0.0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="whitening_damping"):
            LowRankConfig(rank_ratio=0.5, method="whitened", whitening_damping=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        LowRankConfig(rank_ratio=0.5, method="whiten")


# ---------------------------------------------------------------------------------------------- conv through unfold


CONVS = {
    "stride-padding": dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
    "dilation-rect-kernel": dict(in_channels=2, out_channels=4, kernel_size=(3, 2), dilation=2, padding=(2, 1)),
    "same": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),  # asymmetric padding
    "reflect": dict(in_channels=2, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("kwargs", CONVS.values(), ids=CONVS.keys())
def test_conv_gram_through_unfold_gives_the_conv_output_error(kwargs):
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(3, kwargs["in_channels"], 9, 8, dtype=torch.float64)
    grams = collect_input_grams(conv, {"conv": conv}, [x[:2], x[2:]])
    w = weight_matrix(conv)
    approx = svd_weight(w, 2)
    with torch.no_grad():
        diff = conv._conv_forward(x, (w - approx).reshape(conv.weight.shape), None)  # the layer's own padding
    assert output_error(w, approx, grams.grams["conv"]) == pytest.approx(float(diff.square().sum()), rel=1e-9)
    assert grams.samples == 3 and grams.batches == 2


def test_whitened_conv_layer_loses_exactly_the_tail_of_its_spectrum():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2))
    x = torch.randn(6, 3, 10, 10) * torch.tensor([3.0, 1.0, 0.1])[None, :, None, None]
    dense = copy.deepcopy(model)
    config = LowRankConfig(rank_ratio=0.25, method="whitened", whitening_damping=1e-10)
    compress(model, config, calibration_data=[x])
    layer = model[0]
    grams = calibrate(dense, config, [x])
    with torch.no_grad():
        error = (model(x) - dense(x)).double().square().sum()
    u, s, _ = whitened_decomposition(weight_matrix(dense[0]), grams.grams["0"], 1e-10)
    assert float(error) == pytest.approx(float(s[layer.rank :].square().sum()), rel=1e-3)
    svd_model = compress(copy.deepcopy(dense), LowRankConfig(rank_ratio=0.25))
    with torch.no_grad():
        assert error < (svd_model(x) - dense(x)).double().square().sum()


# ---------------------------------------------------------------------------------------------- batch forms


def _images(n: int = 8, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(3))


BATCH_FORMS = {
    "tensor": lambda x: [x[:4], x[4:]],
    "(inputs, labels)": lambda x: [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(4, dtype=torch.long))],
    "pixel_values dict": lambda x: [{"pixel_values": x[:4], "labels": torch.zeros(4, dtype=torch.long)}, {"pixel_values": x[4:]}],
}


def narrow_resnet14() -> nn.Module:
    """timm's resnet14_cifar at widths 8-16-32: the same layers, whitened in a fraction of the time."""
    return tiny_resnet14(channels=(8, 16, 32))


@pytest.mark.parametrize(
    ("build", "form"),
    [(TinyConvNet, form) for form in BATCH_FORMS.values()] + [(narrow_resnet14, BATCH_FORMS["pixel_values dict"])],
    ids=[f"nn.Module-{name}" for name in BATCH_FORMS] + ["timm-pixel_values dict"],
)
def test_image_models_take_every_batch_form(build, form):
    torch.manual_seed(0)
    model = build().eval()
    x = _images(8, size=16)
    with torch.no_grad():
        before = model(x)
    compress(model, LowRankConfig(rank_ratio=0.5, method="whitened"), calibration_data=form(x))
    assert model.lowrank_config.calibration_samples == 8
    assert model.lowrank_config.method == "whitened" and model.lowrank_config.ranks
    with torch.no_grad():
        assert torch.isfinite(model(x)).all() and model(x).shape == before.shape
    assert no_hooks_left(model)


def test_transformers_models_take_keyword_dicts_with_labels_dropped():
    bert = tiny_bert().eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 50, (4, 6), generator=g), "attention_mask": torch.ones(4, 6, dtype=torch.long),
         "labels": torch.zeros(4, dtype=torch.long)}
        for _ in range(2)
    ]
    compress(bert, LowRankConfig(param_reduction=0.05, method="whitened"), calibration_data=batches)
    assert bert.lowrank_config.calibration_samples == 8
    vit = tiny_vit().eval()
    compress(vit, LowRankConfig(rank_ratio=0.5, method="whitened", exclude_modules=["projection"]),
             calibration_data=[{"pixel_values": _images(4)}])
    assert vit.lowrank_config.calibration_samples == 4


def test_gpt2_conv1d_layers_are_whitened_on_their_input_features():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    config = LowRankConfig(rank_ratio=0.25, method="whitened", target_modules=["c_fc"])
    compress(model, config, calibration_data=[{"input_ids": ids}])
    grams = calibrate(dense, config, [{"input_ids": ids}])
    w, approx = weight_matrix(dense.transformer.h[0].mlp.c_fc), model.transformer.h[0].mlp.c_fc.dense_weight()
    whitened_error = output_error(w, approx.detach(), grams.grams["transformer.h.0.mlp.c_fc"])
    svd_error = output_error(w, svd_weight(w.detach(), model.transformer.h[0].mlp.c_fc.rank), grams.grams["transformer.h.0.mlp.c_fc"])
    assert whitened_error < svd_error


# ---------------------------------------------------------------------------------------------- bad data


def _bad_cases():
    x = _images(4)
    nan = x.clone()
    nan[1, 0, 2, 3] = float("nan")
    return {
        "no data": (None, "needs calibration data"),
        "empty": ([], "gave no batches"),
        "wrong keys": ([{"image": x}], "could not run on calibration batch 0"),
        "NaN": ([x, {"pixel_values": nan}], "batch 1 has NaN or Inf"),
        "not a batch": ([42], "could not run on calibration batch 0"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_calibration_data_is_a_clear_error_and_leaves_the_model_as_it_was(case):
    data, message = _bad_cases()[case]
    model = TinyConvNet().train()
    model.head.eval()  # a mixed train/eval state that must survive
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        compress(model, LowRankConfig(rank_ratio=0.5, method="whitened"), calibration_data=data)
    assert state_equal(model.state_dict(), state)
    assert model.training and not model.head.training and model.stem.training
    assert not hasattr(model, "lowrank_config") and no_hooks_left(model)


def test_text_model_given_image_batches_says_what_to_give():
    model = tiny_bert().eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="dicts of keyword inputs for transformers models"):
        compress(model, LowRankConfig(rank_ratio=0.5, method="whitened"), calibration_data=[{"text": ["a b"]}])
    assert state_equal(model.state_dict(), state) and no_hooks_left(model)


def test_calibration_data_with_plain_svd_is_refused():
    with pytest.raises(ValueError, match="only used by method='whitened'"):
        compress(TinyConvNet(), LowRankConfig(rank_ratio=0.5), calibration_data=[_images(2)])


def test_a_targeted_layer_the_forward_never_reaches_is_named():
    model = TinyConvNet()
    model.unused = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"no calibration input reached 1 targeted layer\(s\) \(unused\)"):
        compress(model, LowRankConfig(rank_ratio=0.5, method="whitened"), calibration_data=[_images(2)])
    compress(model, LowRankConfig(rank_ratio=0.5, method="whitened", exclude_modules=["unused"]),
             calibration_data=[_images(2)])


def test_multihead_attention_out_proj_needs_no_calibration_input():
    """nn.MultiheadAttention reads out_proj.weight itself: the layer stays dense and is not asked for data."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0])

    model = Attention().eval()
    compress(model, LowRankConfig(rank_ratio=0.25, method="whitened"), calibration_data=[torch.randn(4, 5, 16)])
    assert set(model.lowrank_config.ranks) == {"head"}


# ---------------------------------------------------------------------------------------------- allocation


class TwoBranches(nn.Module):
    """Two identical-shape layers on different halves of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :16]) + self.b(x[:, 16:])


def test_whitened_budget_goes_to_the_layer_whose_inputs_span_few_directions():
    torch.manual_seed(0)
    model = TwoBranches()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(256, 16, generator=g), torch.randn(256, 2, generator=g) @ torch.randn(2, 16, generator=g)], 1)
    svd = compress(copy.deepcopy(model), LowRankConfig(param_reduction=0.4))
    assert abs(svd.lowrank_config.ranks["a"] - svd.lowrank_config.ranks["b"]) <= 1  # same weights statistics
    whitened = compress(model, LowRankConfig(param_reduction=0.4, method="whitened"), calibration_data=[x])
    ranks = whitened.lowrank_config.ranks
    assert ranks["b"] <= 2 < ranks["a"]  # b only ever sees a 2-D subspace: rank 2 loses nothing on it


def test_statistics_collected_once_serve_several_budgets():
    model = TinyConvNet()
    batches = [_images(4), _images(4)]
    config = LowRankConfig(rank_ratio=0.5, method="whitened")
    grams = calibrate(model, config, batches)
    from_grams = compress(copy.deepcopy(model), config, calibration_data=grams)
    from_batches = compress(copy.deepcopy(model), config, calibration_data=batches)
    assert from_grams.lowrank_config == from_batches.lowrank_config
    assert state_equal(from_grams.state_dict(), from_batches.state_dict())


# ---------------------------------------------------------------------------------------------- save, reload, card


def test_whitened_model_saves_and_reloads_with_equal_logits_and_records_the_calibration(tmp_path):
    model = narrow_resnet14()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    config = LowRankConfig(param_reduction=0.5, method="whitened", calibration_dataset="fashion_mnist train")
    compress(model, config, calibration_data=[{"pixel_values": x}])
    smooth_hf.save_pretrained(model, tmp_path / "whitened")
    saved = json.loads((tmp_path / "whitened" / COMPRESSION_CONFIG_NAME).read_text())
    assert saved["method"] == "whitened" and saved["calibration_dataset"] == "fashion_mnist train"
    assert saved["calibration_samples"] == 8
    card = (tmp_path / "whitened" / "README.md").read_text()
    assert "whitened truncation" in card and "fashion_mnist train, 8 samples" in card
    assert "output energy on the calibration data" in card
    reloaded = smooth_hf.from_pretrained(tmp_path / "whitened")
    inputs = {"x": x}
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)
    assert reloaded.lowrank_config.method == "whitened"


def test_plain_svd_card_keeps_the_weight_energy_wording(tmp_path):
    model = compress(narrow_resnet14(), LowRankConfig(rank_ratio=0.5))
    smooth_hf.save_pretrained(model, tmp_path / "svd")
    card = (tmp_path / "svd" / "README.md").read_text()
    assert "whitened" not in card and "relative Frobenius-norm error of the layer's weight" in card
    assert json.loads((tmp_path / "svd" / COMPRESSION_CONFIG_NAME).read_text())["method"] == "svd"


def test_config_without_method_reads_as_plain_svd():
    """compression_config.json files written before the method existed still load."""
    assert LowRankConfig.from_dict({"rank_ratio": 0.5, "ranks": {"a": 1}}).method == "svd"


def test_collect_input_grams_handles_large_unfolds_in_chunks(monkeypatch):
    import smooth_hf.lowrank.whitening as whitening

    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    whole = collect_input_grams(conv, {"c": conv}, [x]).grams["c"]
    monkeypatch.setattr(whitening, "_CHUNK_VALUES", 40)  # one image per unfold
    chunked = collect_input_grams(conv, {"c": conv}, [x])
    torch.testing.assert_close(chunked.grams["c"], whole)
    assert chunked.rows["c"] == 2 * 36
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(whole, patches.t() @ patches)


def test_budget_sweep_calibrates_once_and_every_budget_is_whitened(monkeypatch):
    import smooth_hf.evaluation.sweep as sweep

    calls = []
    real = sweep.calibrate
    monkeypatch.setattr(sweep, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = TinyConvNet()
    x = _images(8, size=16)
    seen = []
    rows = sweep.budget_sweep(model, [0.2, 0.4], lambda m: seen.append(getattr(m, "lowrank_config", None)) or 0.5,
                              config_kwargs={"method": "whitened"}, calibration_data=[x])
    assert calls == [1] and [r["budget"] for r in rows] == [0.0, 0.2, 0.4]
    assert [c.method for c in seen[1:]] == ["whitened", "whitened"] and all(c.calibration_samples == 8 for c in seen[1:])

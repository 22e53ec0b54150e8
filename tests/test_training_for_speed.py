"""Training for a compute budget (issue 26): rank projection planned on multiply-adds, cut with the same rule and
input shape by recipes/compress.py with no flag, and the speed-up measured against the dense model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_fmnist, three_conv_net, tiny_resnet14
from test_projection import _Images

from smooth_hf import LowRankConfig, RankProjection, SmoothTrainer, SmoothTrainingArguments, compress
from smooth_hf.evaluation.latency import fold_batchnorm, make_runner, speedups
from smooth_hf.lowrank import count_macs
from smooth_hf.scripts import compress as compress_recipe
from smooth_hf.scripts import train as train_recipe
from smooth_hf.training.cut_plan import CutBudget, MacsProfile, example_inputs_for, parse_shape, plan_ranks
from smooth_hf.training.presets import CNN_SPEED_TRAINING, CNN_TRAINING, cnn_flags

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(4, 1, 10, 10, generator=torch.Generator().manual_seed(3))


def test_a_compute_budget_prices_each_rank_at_its_layers_resolution():
    model = three_conv_net()
    profile = MacsProfile.measure(model, (1, 10, 10))
    # three 3x3 valid convs on 10x10: 8x8, 6x6 and 4x4 outputs; the head: one position
    assert profile.positions == {"0": 64, "2": 36, "4": 16, "7": 1}
    assert profile.total == count_macs(model, torch.zeros(1, 1, 10, 10))
    layers = [(n, m) for n, m in model.named_modules() if n in ("2", "4")]
    _, costs, dense = CutBudget.macs(0.3, profile).layer_costs(layers)
    assert costs == [36 * (8 * 9 + 16), 16 * (16 * 9 + 16)] and dense == [36 * 16 * 72, 16 * 16 * 144]
    # the same spectra planned on parameters and on multiply-adds: the high-resolution layer gives more of its rank
    # when compute is what is priced (it is where the multiply-adds are)
    spectra = [torch.linspace(1, 0.1, 16, dtype=torch.float64)] * 2
    by_params = plan_ranks(layers, CutBudget.parameters(0.2, sum(p.numel() for p in model.parameters())), spectra)
    by_macs = plan_ranks(layers, CutBudget.macs(0.2, profile), spectra)
    assert by_macs[0] < by_params[0] and by_macs[1] > by_params[1], (by_params, by_macs)


def test_projection_for_a_compute_budget_makes_that_cut_lossless():
    model = three_conv_net()
    projection = RankProjection.for_model(model, macs_reduction=0.4, input_shape=(1, 10, 10), every=5, start=0.0,
                                          end=0.5)
    assert projection.budget.rule == "macs_reduction"
    assert projection(10, 10) is not None  # the last step: the whole cut
    example = example_inputs_for((1, 10, 10))
    with torch.no_grad():
        cut = compress(copy.deepcopy(model), LowRankConfig(macs_reduction=0.4), example_inputs=example)
        torch.testing.assert_close(cut(X), model(X), atol=1e-5, rtol=1e-4)
        report = cut.lowrank_report
        assert 1 - report.macs_after / report.macs_before >= 0.4
        # planned for parameters instead, the same compute budget loses something: the plan is what made it exact
        other = three_conv_net()
        RankProjection.for_model(other, 0.3, every=5, start=0.0, end=0.5)(10, 10)
        lossy = compress(copy.deepcopy(other), LowRankConfig(macs_reduction=0.4), example_inputs=example)
        assert (lossy(X) - other(X)).abs().max() > 1e-3


def test_projection_needs_one_budget_and_the_inputs_of_a_compute_budget():
    with pytest.raises(ValueError, match="give one budget"):
        RankProjection.for_model(three_conv_net(), 0.3, macs_reduction=0.3, input_shape=(1, 10, 10))
    with pytest.raises(ValueError, match="give input_shape"):
        RankProjection.for_model(three_conv_net(), macs_reduction=0.3)
    with pytest.raises(ValueError, match="multiply-adds, but at most"):
        RankProjection.for_model(three_conv_net(), macs_reduction=0.99, input_shape=(1, 10, 10))
    for bad in ("1,28", "a,b,c", "0,28,28", ""):
        with pytest.raises(ValueError, match="shape of one input sample"):
            parse_shape(bad)
    assert parse_shape("3, 32, 32") == (3, 32, 32) and parse_shape([128]) == (128,)


def test_bad_compute_budget_settings_are_clear_errors(caplog):
    with pytest.raises(ValueError, match="not both"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_param_reduction=0.5,
                                rank_projection_macs_reduction=0.5)
    with pytest.raises(ValueError, match="not both"):
        SmoothTrainingArguments(output_dir="unused", nuclear_norm_param_reduction=0.5, nuclear_norm_macs_reduction=0.5)
    with pytest.raises(ValueError, match="shape of one input sample"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_macs_reduction=0.5, plan_input_shape="28x28")
    with pytest.raises(ValueError, match="does not count multiply-adds"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_macs_reduction=0.5, factorise_embeddings=True)
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        SmoothTrainingArguments(output_dir="unused", rank_projection_macs_reduction=0.5, load_best_model_at_end=True,
                                eval_strategy="steps", save_strategy="steps")
    with caplog.at_level("WARNING"):
        SmoothTrainingArguments(output_dir="unused", plan_input_shape="1,28,28")
    assert "--plan_input_shape does nothing" in caplog.text


def test_the_trainer_prices_the_plan_on_the_first_training_example(tmp_path):
    args = SmoothTrainingArguments(output_dir=str(tmp_path), rank_projection_macs_reduction=0.3, report_to=[],
                                   use_cpu=True, per_device_train_batch_size=16, num_train_epochs=1, optim="sgd",
                                   learning_rate=0.05, rank_projection_every=3, save_strategy="no", disable_tqdm=True)
    trainer = SmoothTrainer(model=three_conv_net(), args=args, train_dataset=_Images())
    assert args.plan_input_shape == "1,10,10" and trainer.rank_projection.budget.rule == "macs_reduction"
    assert trainer.rank_projection.budget.total == count_macs(three_conv_net(), torch.zeros(1, 1, 10, 10))
    trainer.train()
    model = trainer.model.eval()
    with torch.no_grad():
        cut = compress(copy.deepcopy(model), LowRankConfig(macs_reduction=0.3), example_inputs=torch.zeros(1, 1, 10, 10))
        torch.testing.assert_close(cut(X), model(X), atol=1e-5, rtol=1e-4)


def test_a_given_input_shape_is_what_the_plan_is_priced_on(tmp_path):
    def pooled() -> torch.nn.Module:  # takes any image size
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                                   torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(16, 3))

    args = SmoothTrainingArguments(output_dir=str(tmp_path), rank_projection_macs_reduction=0.3, report_to=[],
                                   use_cpu=True, plan_input_shape="1,32,32")  # served at 32x32, trained at 10x10
    trainer = SmoothTrainer(model=pooled(), args=args, train_dataset=_Images())
    assert trainer.rank_projection.budget.total == count_macs(pooled(), torch.zeros(1, 1, 32, 32))
    assert args.plan_input_shape == "1,32,32"


def test_the_tail_nuclear_norm_plans_for_a_compute_budget_too(tmp_path):
    args = SmoothTrainingArguments(output_dir=str(tmp_path), nuclear_norm_coef=1.0, nuclear_norm_macs_reduction=0.3,
                                   report_to=[], use_cpu=True)
    trainer = SmoothTrainer(model=three_conv_net(), args=args, train_dataset=_Images())
    assert trainer.smoothness.tail_budget.rule == "macs_reduction" and args.plan_input_shape == "1,10,10"
    assert any(rank is not None for rank in trainer.smoothness._kept_ranks())


def test_the_speed_preset_is_the_parameter_recipe_planned_for_compute():
    assert CNN_SPEED_TRAINING["rank_projection_macs_reduction"] == 0.7
    assert "rank_projection_param_reduction" not in CNN_SPEED_TRAINING
    assert {k: v for k, v in CNN_SPEED_TRAINING.items() if k != "rank_projection_macs_reduction"} == \
        {k: v for k, v in CNN_TRAINING.items() if k != "rank_projection_param_reduction"}
    flags = cnn_flags(training=CNN_SPEED_TRAINING)
    assert flags[flags.index("--rank_projection_macs_reduction") + 1] == "0.7"


def test_speedups_time_every_model_against_the_reference():
    model = three_conv_net().eval()
    cut = compress(copy.deepcopy(model), LowRankConfig(macs_reduction=0.5), example_inputs=torch.zeros(1, 1, 10, 10))
    timed = speedups({"dense": model, "cut": cut}, lambda b: torch.zeros(b, 1, 10, 10), batch_sizes=(2,),
                     runtimes=("eager",), rounds=2, min_round_ms=1, warmup=1)
    assert set(timed) == {"dense", "cut"} and timed["dense"]["eager_b2"]["speedup"] == 1.0
    assert timed["cut"]["eager_b2"]["ms"] > 0
    with pytest.raises(ValueError, match="reference model"):
        speedups({"cut": cut}, lambda b: torch.zeros(b, 1, 10, 10))


def test_a_runtime_that_cannot_run_the_models_is_left_out_with_a_warning(caplog):
    class Branching(torch.nn.Module):  # torch.fx cannot trace it: no eager_fused
        def forward(self, x):
            return x if x.sum() > 0 else -x

    timed = speedups({"dense": Branching()}, lambda b: torch.ones(b, 1, 4, 4), batch_sizes=(2,),
                     runtimes=("eager_fused", "eager"), rounds=1, min_round_ms=1, warmup=1)
    assert list(timed["dense"]) == ["eager_b2"]
    assert "the eager_fused runtime is left out: cannot fold the BatchNorms of Branching" in caplog.text


def _batchnorms_left(graph_module: torch.fx.GraphModule) -> int:
    modules = dict(graph_module.named_modules())
    return sum(1 for n in graph_module.graph.nodes
               if (n.op == "call_module" and isinstance(modules[n.target], torch.nn.BatchNorm2d))
               or (n.op == "call_function" and n.target is torch.nn.functional.batch_norm))


def test_folding_batchnorms_keeps_the_logits_of_dense_and_cut_models(caplog):
    """eager_fused: every BatchNorm after a convolution, dense or factorised, folded into it (torch.fx's fuse)."""
    torch.manual_seed(0)
    dense = tiny_resnet14(channels=(8, 16, 16), layers=(1, 1, 1), num_classes=3)
    for bn in (m for m in dense.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics that change outputs
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    dense.eval()
    images = torch.randn(3, 1, 12, 12)
    cut = compress(copy.deepcopy(dense), LowRankConfig(macs_reduction=0.5), example_inputs=images[:1])
    for model in (dense, cut):
        folded = fold_batchnorm(model)
        assert _batchnorms_left(folded) == 0, "a BatchNorm was left"
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the model itself was changed"
        with torch.inference_mode():
            torch.testing.assert_close(make_runner("eager_fused", model, images)(), model(images), rtol=1e-4, atol=1e-5)
    assert "could not be folded" not in caplog.text

    class Subclass(torch.nn.BatchNorm2d):  # traced into, as timm's BatchNormAct2d is: not foldable by torch.fx
        def forward(self, x):
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                  False, 0.0, self.eps)

    after_relu = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
                                      torch.nn.Conv2d(4, 4, 3), Subclass(4)).eval()
    folded = fold_batchnorm(after_relu)
    assert _batchnorms_left(folded) == 2 and "2 BatchNorm(s) of Sequential could not be folded" in caplog.text
    torch.testing.assert_close(folded(images), after_relu(images))

    class Branching(torch.nn.Module):  # control flow on a tensor's value: torch.fx cannot trace it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="torch.fx could not trace it"):
        fold_batchnorm(Branching())


# ---- the recipes as users run them ---------------------------------------------------------------------------
TINY = ["--model_name_or_path", "resnet14_cifar", "--config_overrides", "channels=[4,8,8],layers=[1,1,1]"]


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory) -> str:
    data = save_tiny_fmnist(tmp_path_factory.mktemp("data") / "tiny_fmnist")
    out = tmp_path_factory.mktemp("runs") / "speed"
    train_recipe.main([
        *TINY, "--dataset_name", data, "--output_dir", str(out), "--do_train", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-2", "--rank_projection_macs_reduction", "0.5",
        "--rank_projection_every", "2", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--seed", "3",
    ])
    return str(out)


def test_train_records_the_compute_plan_and_compress_cuts_it_with_no_flag(speed_run, tmp_path):
    saved = json.loads((Path(speed_run) / "training_args.json").read_text())
    assert saved["rank_projection_macs_reduction"] == 0.5 and saved["plan_input_shape"] == "1,12,12"
    result = compress_recipe.main(["--model_name_or_path", speed_run, "--output_dir", str(tmp_path / "cut")])
    report = result["model"].lowrank_report
    assert result["model"].lowrank_config.macs_reduction == 0.5
    assert 1 - report.macs_after / report.macs_before >= 0.5 and report.macs_inputs == "(1, 1, 12, 12)"
    assert result["accuracy"] == pytest.approx(result["dense_accuracy"])  # the cut it was trained for: exact
    assert result["max_logit_change"] < 1e-4


def test_compress_sweeps_the_planned_rule_and_saves_its_cut(speed_run, tmp_path):
    out = tmp_path / "sweep"
    (rows,) = compress_recipe.main(["--model_name_or_path", speed_run, "--budgets", "0.3,0.5", "--macs_reduction",
                                    "0.5", "--output_dir", str(out)]).values()
    assert [r["budget"] for r in rows] == [0.0, 0.3, 0.5]
    assert all(r["macs_removed"] >= r["budget"] for r in rows)
    assert rows[2]["accuracy"] == rows[0]["accuracy"]
    assert (out / "results.md").read_text().startswith("| multiply-adds removed |")
    assert (out / "accuracy_vs_macs_removed.png").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="give --macs_reduction, not --param_reduction"):
        compress_recipe.main(["--model_name_or_path", speed_run, "--budgets", "0.3", "--budget_rule", "macs_reduction",
                              "--param_reduction", "0.3", "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # the cut a sweep saves sets its rule: a parameter sweep of the same model, saved at 30% fewer parameters
    (rows,) = compress_recipe.main(["--model_name_or_path", speed_run, "--budgets", "0.3", "--param_reduction", "0.3",
                                    "--output_dir", str(tmp_path / "params")]).values()
    assert "macs_removed" not in rows[1] and rows[1]["removed"] >= 0.3


def test_compress_without_a_rule_needs_a_model_trained_for_a_cut(tmp_path):
    data = save_tiny_fmnist(tmp_path / "data")
    out = tmp_path / "plain"
    train_recipe.main([*TINY, "--dataset_name", data, "--output_dir", str(out), "--do_train", "--max_steps", "1",
                       "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
    with pytest.raises(ValueError, match="was not trained for a cut"):
        compress_recipe.main(["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()

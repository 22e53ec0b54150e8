"""SmoothTrainer: argument validation, penalty counting (GA, batch, processes), logging, resume."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch
from conftest import TinyConvNet, easy_image_dataset, image_dataset, text_dataset, tiny_bert, tiny_vit
from safetensors.torch import load_file
from transformers import TrainerCallback

from smooth_hf import SmoothTrainer, SmoothTrainingArguments
from smooth_hf.evaluation.metrics import accuracy_metrics
from smooth_hf.training.trainer import PENALTY_STATE_NAME

PENALTIES = {"first_order_coef": 1.0, "second_order_coef": 1.0, "nuclear_norm_coef": 1.0}


def make_args(tmp_path, **overrides) -> SmoothTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, penalty_skip_first_last=False,
    )
    kwargs.update(overrides)
    return SmoothTrainingArguments(**kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("first_order_coef", -1.0, "finite number >= 0"),
        ("nuclear_norm_coef", math.nan, "finite number >= 0"),
        ("second_order_coef", math.inf, "finite number >= 0"),
        ("penalty_normalization", "mean", "must be one of"),
        ("nuclear_norm_every", 0, "integer >= 1"),
        ("penalty_warmup_ratio", 1.5, r"\[0, 1\)"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_fix(tmp_path, field, value, phrase):
    with pytest.raises(ValueError, match=phrase):
        make_args(tmp_path, **{field: value})


def test_unknown_target_pattern_is_an_error(tmp_path, tiny_conv):
    args = make_args(tmp_path, first_order_coef=1.0, penalty_target_modules=["convv"])
    with pytest.raises(ValueError, match="'convv' matches no module"):
        SmoothTrainer(model=tiny_conv, args=args)


def test_targets_that_are_not_factorisable_layers_are_named(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, first_order_coef=1.0, penalty_target_modules=["word_embeddings"])
    with pytest.raises(ValueError, match="word_embeddings \\(Embedding\\)"):
        SmoothTrainer(model=model, args=args)


def test_default_targets_every_layer_but_first_and_last(tmp_path, tiny_conv):
    trainer = SmoothTrainer(model=tiny_conv, args=make_args(tmp_path, first_order_coef=1.0, penalty_skip_first_last=True))
    assert trainer.smoothness.layer_names == ["conv", "proj"]


def train_weights(tmp_path, make_model, dataset, ga, **coefs):
    model = make_model()
    args = make_args(tmp_path, per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga, **coefs)
    SmoothTrainer(model=model, args=args, train_dataset=dataset).train()
    return weights(model)


@pytest.mark.parametrize(
    ("make_model", "dataset"),
    [
        (lambda: (torch.manual_seed(0), TinyConvNet())[1], image_dataset),
        (tiny_vit, image_dataset),
        (tiny_bert, text_dataset),
    ],
    ids=["plain-module", "vit", "bert"],
)
def test_gradient_accumulation_does_not_change_the_update(tmp_path, make_model, dataset):
    ga1 = train_weights(tmp_path, make_model, dataset(), 1, **PENALTIES)
    ga2 = train_weights(tmp_path, make_model, dataset(), 2, **PENALTIES)
    plain = train_weights(tmp_path, make_model, dataset(), 1)
    assert max_diff(ga1, ga2) < 1e-5
    assert max_diff(ga1, plain) > 1e-3  # the penalties did change the update: the test can fail


def test_penalty_counts_once_per_step_whatever_the_batch_size(tmp_path):
    """With lr on the penalty only (a zero-gradient task), the step is the same for batch 2 and 16."""

    class ZeroTask(TinyConvNet):
        def forward(self, x):
            return super().forward(x) * 0.0

    results = []
    for batch in (2, 16):
        torch.manual_seed(0)
        model = ZeroTask()
        args = make_args(tmp_path, per_device_train_batch_size=batch, max_steps=1, **PENALTIES)
        SmoothTrainer(model=model, args=args, train_dataset=image_dataset(n=32)).train()
        results.append(weights(model))
    assert max_diff(*results) < 1e-6
    torch.manual_seed(0)
    assert max_diff(results[0], weights(ZeroTask())) > 1e-3


def test_each_term_is_logged_separately(tmp_path, tiny_conv):
    args = make_args(tmp_path, **PENALTIES)
    trainer = SmoothTrainer(model=tiny_conv, args=args, train_dataset=image_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    for key in ("smooth/first_order", "smooth/second_order", "smooth/nuclear_norm", "smooth/penalty"):
        assert all(key in entry and math.isfinite(entry[key]) for entry in logs), key


def test_penalties_fall_during_training(tmp_path):
    def run(**coefs):
        torch.manual_seed(0)
        model = TinyConvNet(width=16)
        args = make_args(tmp_path, max_steps=30, learning_rate=0.05, logging_steps=30, **coefs)
        trainer = SmoothTrainer(model=model, args=args, train_dataset=image_dataset(n=240))
        trainer.train()
        from smooth_hf.training.smoothness import SmoothnessPenalty

        measure = SmoothnessPenalty(trainer.smoothness.layers, first_order_coef=1.0, nuclear_norm_coef=1.0)
        return measure()[1]

    plain, smooth = run(), run(first_order_coef=5.0, nuclear_norm_coef=5.0, nuclear_norm_every=5)
    assert smooth["first_order"] < 0.8 * plain["first_order"]
    assert smooth["nuclear_norm"] < plain["nuclear_norm"]


def test_timm_model_learns_and_evaluates_with_accuracy(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))
    # Coefficients small enough that the task drives these few steps (the penalties' own tests are elsewhere).
    args = make_args(tmp_path, first_order_coef=0.05, nuclear_norm_coef=0.05, eval_strategy="no", max_steps=12,
                     optim="adamw_torch", learning_rate=0.01, penalty_skip_first_last=True, per_device_eval_batch_size=8)
    test = easy_image_dataset(n=48, seed=2)
    trainer = SmoothTrainer(model=model, args=args, train_dataset=easy_image_dataset(), eval_dataset=test,
                            compute_metrics=accuracy_metrics)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    metrics = trainer.evaluate()
    everything = test[:]
    model.eval()
    with torch.no_grad():
        direct = (model(everything["pixel_values"]).argmax(-1) == everything["labels"]).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(direct)
    assert metrics["eval_accuracy"] >= 0.9 > before + 0.2, (before, metrics["eval_accuracy"])  # chance: 1/3
    assert math.isfinite(metrics["eval_loss"])
    assert trainer.smoothness.layer_names[0] == "stages.0.0.conv1"  # stem conv left out


def test_resume_continues_with_the_same_penalties_and_weights(tmp_path):
    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = TinyConvNet()
        args = make_args(tmp_path, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=3,
                         nuclear_norm_every=4, per_device_train_batch_size=4, **PENALTIES)
        SmoothTrainer(model=model, args=args, train_dataset=image_dataset(n=64)).train(resume_from_checkpoint=resume)
        return weights(model)

    full = run(tmp_path / "full", 8)
    run(tmp_path / "part", 3)  # "interrupted" after the checkpoint at step 3 (last SVD refresh at step 0)
    checkpoint = tmp_path / "part" / "checkpoint-3"
    state = load_file(str(checkpoint / PENALTY_STATE_NAME))
    assert int(state["refreshed_at"]) == 0 and any(k.startswith("direction.") for k in state)
    resumed = run(tmp_path / "part", 8, resume=str(checkpoint))
    assert max_diff(full, resumed) < 1e-5


def test_eval_loss_is_the_task_loss(tmp_path, tiny_conv):
    data = image_dataset()
    plain = SmoothTrainer(model=tiny_conv, args=make_args(tmp_path)).evaluate(data)["eval_loss"]
    smooth = SmoothTrainer(model=tiny_conv, args=make_args(tmp_path, **PENALTIES)).evaluate(data)["eval_loss"]
    assert smooth == pytest.approx(plain)


def test_requires_smooth_training_arguments(tiny_conv, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="SmoothTrainingArguments"):
        SmoothTrainer(model=tiny_conv, args=TrainingArguments(output_dir=str(tmp_path)))


def test_penalty_state_only_written_when_nuclear_norm_is_on(tmp_path, tiny_conv):
    args = make_args(tmp_path, first_order_coef=1.0, save_strategy="steps", save_steps=2)
    SmoothTrainer(model=tiny_conv, args=args, train_dataset=image_dataset()).train()
    assert not os.path.exists(tmp_path / "out" / "checkpoint-2" / PENALTY_STATE_NAME)


LAUNCHES = {  # what `accelerate launch` sets for each kind of config (accelerate.utils.launch)
    "FSDP1 config": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
    "FSDP config without fsdp_version (accelerate's default: 1)": {"ACCELERATE_USE_FSDP": "true"},
    "DeepSpeed ZeRO-3 config": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}


@pytest.mark.parametrize("setup", ["--fsdp with fsdp_config version 1", *LAUNCHES])
def test_flat_sharded_parameters_are_refused_at_start_up(tmp_path, tiny_conv, monkeypatch, setup):
    """FSDP1 and ZeRO-3 hold flat slices of parameters, not row blocks of each weight: refused by constructing the
    trainer, with FSDP2 named. (On CPU accelerate never enables FSDP itself, so the arguments and the variables
    `accelerate launch` sets are what is checked here; tests/test_fsdp.py trains under FSDP2.)"""
    args = make_args(tmp_path, first_order_coef=1.0, **({"fsdp": True, "fsdp_config": {"version": 1}} if
                                                        setup.startswith("--fsdp") else {}))
    for name, value in LAUNCHES.get(setup, {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="not supported with (FSDP1|DeepSpeed ZeRO-3).*FSDP2"):
        SmoothTrainer(model=tiny_conv, args=args)
    if "FSDP" in setup:  # without penalties it is a plain Trainer's business
        SmoothTrainer(model=tiny_conv, args=make_args(tmp_path, **({"fsdp": False} if setup.startswith("--") else {})))


def test_fsdp2_is_accepted_and_whitened_projection_of_conv1d_refused_at_start_up(tmp_path, tiny_conv, monkeypatch):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")  # what recipes/accelerate_configs/fsdp2.yaml sets
    trainer = SmoothTrainer(model=tiny_conv, args=make_args(tmp_path, first_order_coef=1.0,
                                                            rank_projection_param_reduction=0.3))
    assert trainer.smoothness.active and trainer.rank_projection is not None
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                                    num_labels=2, pad_token_id=0))
    args = make_args(tmp_path, rank_projection_param_reduction=0.3, rank_projection_method="whitened")
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.*Drop --rank_projection_method whitened"):
        SmoothTrainer(model=gpt2, args=args)
    SmoothTrainer(model=gpt2, args=make_args(tmp_path, rank_projection_param_reduction=0.3))  # 'svd' works on them


def test_a_batch_without_the_model_inputs_says_what_to_pass(tmp_path, tiny_conv):
    trainer = SmoothTrainer(model=tiny_conv, args=make_args(tmp_path, first_order_coef=1.0))
    with pytest.raises(ValueError, match=r"no \['pixel_values'\] \(it has \['image', 'labels'\]\).*'pixel_values' and 'labels'"):
        trainer.compute_loss(tiny_conv, {"image": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2, dtype=torch.long)})


class FirstStepWeights(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.weights = weights(model)


def test_penalty_warmup_ramps_the_coefficients_linearly(tmp_path):
    """Warm-up over half of 8 steps: the penalty counts 1/4, 2/4, 3/4, then fully; the first update is a quarter."""

    class ZeroTask(TinyConvNet):  # no task gradient: each update is the penalty's alone
        def forward(self, x):
            return super().forward(x) * 0.0

    def run(ratio):
        torch.manual_seed(0)
        model, snapshot = ZeroTask(), FirstStepWeights()
        args = make_args(tmp_path, max_steps=8, max_grad_norm=0.0, penalty_warmup_ratio=ratio, **PENALTIES)
        trainer = SmoothTrainer(model=model, args=args, train_dataset=image_dataset(n=64), callbacks=[snapshot])
        trainer.train()
        return snapshot.weights, [e for e in trainer.state.log_history if "loss" in e]

    torch.manual_seed(0)
    start = weights(ZeroTask())
    ramped, logs = run(0.5)
    full, _ = run(0.0)
    for key in start:
        torch.testing.assert_close(ramped[key] - start[key], 0.25 * (full[key] - start[key]), rtol=1e-4, atol=1e-7)
    assert max_diff(full, start) > 1e-3
    factors = [e["smooth/penalty"] / sum(e[f"smooth/{k.removesuffix('_coef')}"] * c for k, c in PENALTIES.items())
               for e in logs]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1], rel=1e-3)


def test_cached_direction_is_refreshed_when_the_step_counter_restarts(tiny_conv):
    from smooth_hf.training.smoothness import SmoothnessPenalty

    penalty = SmoothnessPenalty.for_model(tiny_conv, nuclear_norm_coef=1.0, nuclear_norm_every=10)
    penalty(step=95)
    assert penalty._refreshed_at == 95
    penalty(step=0)  # a new train() starts counting from 0 again
    assert penalty._refreshed_at == 0


def test_idle_cores_are_named_with_the_launch_flag_that_uses_them(tmp_path, monkeypatch, caplog):
    """`accelerate launch` runs a one-process CPU job with OMP_NUM_THREADS=1: the user is told, not left at half speed."""
    import smooth_hf.training.config as training_args

    monkeypatch.setattr(training_args, "_has_accelerator", lambda: False)
    monkeypatch.setattr(training_args, "usable_cores", lambda: [0, 1, 2, 3])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with caplog.at_level("WARNING", logger="smooth_hf.training.config"):
            SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
        assert "--num_cpu_threads_per_process 4" in caplog.text
        caplog.clear()
        torch.set_num_threads(2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of two threads on four cores: nothing idle
        with caplog.at_level("WARNING", logger="smooth_hf.training.config"):
            SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
        assert "num_cpu_threads_per_process" not in caplog.text
    finally:
        torch.set_num_threads(threads)


def test_channels_last_trains_the_same_model_and_saves_it_contiguous(tmp_path):
    """channels_last is a memory layout only: the same steps give the same weights, the rank projection and the
    penalties act the same, and checkpoints (safetensors refuses strided tensors) and the trained model come back in
    the usual layout."""

    def run(channels_last: bool, out):
        torch.manual_seed(0)
        model = timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(8, 8, 16), layers=(1, 1, 1))
        args = make_args(tmp_path, output_dir=str(out), max_steps=6, channels_last=channels_last, save_strategy="steps",
                         save_steps=3, per_device_train_batch_size=8, first_order_coef=0.5,
                         rank_projection_param_reduction=0.3, rank_projection_every=2)
        trainer = SmoothTrainer(model=model, args=args, train_dataset=easy_image_dataset())
        layouts = []

        class Probe(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                layouts.append(model.stages[0][0].conv1.weight.is_contiguous(memory_format=torch.channels_last))

        trainer.add_callback(Probe())
        trainer.train()
        return model, layouts

    plain, plain_layouts = run(False, tmp_path / "contiguous")
    fast, fast_layouts = run(True, tmp_path / "channels_last")
    assert all(fast_layouts) and not any(plain_layouts)  # it really trained in the other layout
    assert max_diff(weights(plain), weights(fast)) < 1e-4
    assert all(p.is_contiguous() for p in fast.parameters())  # handed back in the usual layout
    saved = load_file(str(tmp_path / "channels_last" / "checkpoint-6" / "model.safetensors"))
    assert max_diff({k: saved[k] for k in saved}, {k: v for k, v in weights(fast).items() if k in saved}) == 0


def test_channels_last_is_refused_where_torch_computes_it_wrong(tmp_path, caplog):
    """torch 2.14's CPU kernels get a strided 1x1 convolution's weight gradient wrong in channels_last when it has
    few input channels (a 4-channel shortcut here): such a layer is refused, any layer whose gradients differ between
    the layouts is found, and training then stays in the usual layout."""
    from smooth_hf.core.memory_format import channels_last_mismatches

    model = timm.create_model("resnet14_cifar", in_chans=1, num_classes=3, channels=(4, 8, 8), layers=(1, 1, 1))
    broken = channels_last_mismatches(model)
    assert broken == ["stages.1.0.downsample.0"]  # refused without running it (it can corrupt memory)
    # and a probe of a layer that runs, with its gradient broken on purpose, is caught by the comparison
    original = torch.nn.Conv2d._conv_forward

    def wrong_in_channels_last(self, x, weight, bias):
        out = original(self, x, weight, bias)
        return out * 1.5 if weight.is_contiguous(memory_format=torch.channels_last) and self.kernel_size == (3, 3) else out

    torch.nn.Conv2d._conv_forward = wrong_in_channels_last  # a kernel that computes differently in one layout
    try:
        faulty = channels_last_mismatches(model)
    finally:
        torch.nn.Conv2d._conv_forward = original
    assert {"stages.0.0.conv1", "stages.2.0.conv2", "stages.1.0.downsample.0"} <= set(faulty)
    with caplog.at_level("WARNING"):
        trainer = SmoothTrainer(model=model, args=make_args(tmp_path, channels_last=True),
                                train_dataset=easy_image_dataset())
    assert trainer.channels_last == (not broken)
    if broken:
        assert "channels_last is off" in caplog.text and "stages.1.0.downsample.0" in caplog.text
    trainer.train()
    assert all(p.is_contiguous() for p in model.parameters())


def test_transformers_model_trains_on_smooth_hf_datasets_transformed_when_read(tmp_path):
    """The README's transformers snippet: smooth_hf.data's splits turn "image"/"label" into the model's inputs when
    read, so the Trainer must not drop those columns first (they are not forward()'s argument names)."""
    from conftest import save_tiny_fmnist

    from smooth_hf.data.images import prepare_image_splits
    from smooth_hf.data.processors import image_input_config

    model = tiny_vit(num_labels=3, image_size=12)
    data = prepare_image_splits(save_tiny_fmnist(tmp_path / "data"), image_input_config(model))
    args = SmoothTrainingArguments(output_dir=str(tmp_path / "out"), first_order_coef=1, max_steps=2,
                                   per_device_train_batch_size=8, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SmoothTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                            compute_metrics=accuracy_metrics)
    assert args.remove_unused_columns is False
    trainer.train()
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0

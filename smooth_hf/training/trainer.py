"""``SmoothTrainer``: a ``transformers.Trainer`` that adds smoothness penalties to the task loss, and projects the
weights onto a planned low-rank cut after optimizer steps when asked (``rank_projection_param_reduction`` or
``rank_projection_macs_reduction``).

Only hooks are overridden (``compute_loss``, ``log``, checkpoint save/load) and a callback added (``on_step_end``,
for the projection); the training loop,
Accelerate, mixed precision, gradient accumulation and distributed training are the Trainer's own.

How the penalty is counted -- once per optimizer step, whatever the batch size, the number of
gradient-accumulation micro-batches or the number of processes:

* it is added on the **last micro-batch** of each accumulation window only (when Accelerate is about
  to sync gradients), so it is computed once per step, not once per micro-batch;
* the Trainer divides a per-batch-mean loss by the number of accumulation steps before ``backward``;
  the penalty is pre-multiplied by exactly that factor, so its gradient reaches the weights at full
  strength (``tests/test_trainer.py`` checks GA=1 vs GA=2 give the same weights);
* under DDP every rank adds the same penalty (its weights are identical) and gradients are averaged
  across ranks, so the penalty counts once, not once per rank. (``compute_loss``'s
  ``average_tokens_across_devices`` rescaling applies to the task loss only: the penalty is added
  after it.)
* under FSDP2 (Accelerate's ``fsdp_version: 2``) every rank computes the same penalty value from its own block of each
  weight (:mod:`smooth_hf.training.sharded`), and the penalty's gradient reaches each block whole, beside the task
  gradient that FSDP averages, so again it counts once. Rank projection acts on each rank's block. FSDP1 and DeepSpeed
  ZeRO-3, whose flat parameter slices hold no row block of a weight, are refused at start-up.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..core.libraries import is_hf_conv1d, is_transformers_model
from ..core.memory_format import channels_last_mismatches
from ..lowrank.targeting import find_layers
from ..lowrank.timing import default_rank_multiple
from .calibration import RecentBatches, RunningGrams
from .config import SmoothTrainingArguments
from .cut_plan import CutBudget, MacsProfile, format_shape, sample_shape
from .projection import RankProjection
from .sharded import split_inputs_error
from .shards import broadcast_buffers, is_split, sum_over_processes
from .smoothness import SmoothnessPenalty

__all__ = ["PENALTY_STATE_NAME", "SmoothTrainer"]

logger = logging.get_logger(__name__)

PENALTY_STATE_NAME = "smooth_penalty_state.safetensors"


# Heads whose loss is a mean over samples and ignores ``num_items_in_batch``.
_MEAN_LOSS_HEADS = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification", "ForMultipleChoice")


def _mean_loss_classifier(model: nn.Module) -> bool:
    return is_transformers_model(model) and type(model).__name__.endswith(_MEAN_LOSS_HEADS)


def _transformed_when_read(dataset: Any) -> bool:
    """A ``datasets.Dataset`` (or each split of a dict) whose rows go through a ``with_transform`` function."""
    if isinstance(dataset, dict):
        return any(_transformed_when_read(d) for d in dataset.values())
    spec = getattr(dataset, "format", None)
    return isinstance(spec, dict) and spec.get("type") == "custom"


class SmoothTrainer(Trainer):
    """``Trainer`` + smoothness penalties (see :class:`SmoothTrainingArguments`).

    Works with transformers models (their own loss is used) and with timm / plain ``nn.Module``
    image classifiers, which are called as ``model(pixel_values)`` and trained with cross-entropy
    on ``labels``. The penalised layers are resolved once, here, and listed in the log.
    """

    def __init__(self, model: nn.Module | None = None, args: SmoothTrainingArguments | None = None, **kwargs: Any):
        if args is None or not isinstance(args, SmoothTrainingArguments):
            raise TypeError("SmoothTrainer needs args=SmoothTrainingArguments(...) (a TrainingArguments subclass)")
        if model is None:
            raise ValueError("SmoothTrainer needs a model instance (model_init is not supported)")
        # Keep the dataset's columns when dropping the ones forward() does not name would break the inputs: a timm
        # model's forward takes only the image, and a dataset transformed when read (smooth_hf.data's) turns its
        # "image" and "label" columns into the model's inputs.
        transformed = [name for name in ("train_dataset", "eval_dataset") if _transformed_when_read(kwargs.get(name))]
        plain_module = not is_transformers_model(model)
        if args.remove_unused_columns and (plain_module or transformed):
            why = "Non-transformers model" if plain_module else " and ".join(transformed) + " built with with_transform"
            logger.info("%s: setting remove_unused_columns=False", why)
            args.remove_unused_columns = False
        if plain_module and args.label_names is None:  # and say where the labels are
            args.label_names = ["labels"]
        if args.plans_a_cut and args.plan_rank_multiple is None:  # resolved now, and so recorded in training_args.json
            args.plan_rank_multiple = default_rank_multiple(args.device)
            if args.plan_rank_multiple > 1 and args.should_log:  # a GPU: said, as a CPU run of the same command plans otherwise
                logger.warning(f"Planning the cut with ranks in multiples of {args.plan_rank_multiple}, as compress() "
                               f"rounds them on {args.device.type} (--plan_rank_multiple 1 to plan any rank)")
        # A compute budget is priced on one sample's shape, measured once here (and recorded in training_args.json).
        macs = _macs_profile(model, args, kwargs.get("train_dataset")) if args.plans_for_compute else None
        self.smoothness = SmoothnessPenalty.for_model(
            model,
            target_modules=args.penalty_target_modules,
            exclude_modules=args.penalty_exclude_modules,
            skip_first_last=args.penalty_skip_first_last,
            nuclear_norm_coef=args.nuclear_norm_coef,
            first_order_coef=args.first_order_coef,
            second_order_coef=args.second_order_coef,
            normalization=args.penalty_normalization,
            nuclear_norm_every=args.nuclear_norm_every,
            nuclear_norm_param_reduction=args.nuclear_norm_param_reduction,
            nuclear_norm_macs_reduction=args.nuclear_norm_macs_reduction,
            macs_profile=macs,
            rank_multiple=args.plan_rank_multiple or 1,
        )
        self.rank_projection, self._recent_batches, self._running_grams = None, None, None
        if args.projection_rule is not None:  # on the layers the penalties act on (and the embeddings, if asked)
            reduction = getattr(args, f"rank_projection_{args.projection_rule}")
            budget = (CutBudget.macs(reduction, macs) if args.projection_rule == "macs_reduction"
                      else CutBudget.parameters(reduction, self.smoothness.model_parameters))
            layers = self.smoothness.layers
            if args.factorise_embeddings:
                layers = find_layers(model, args.penalty_target_modules, args.penalty_exclude_modules,
                                     args.penalty_skip_first_last, embeddings=True)
            self.rank_projection = RankProjection(
                layers, budget, every=args.rank_projection_every, start=args.rank_projection_start,
                end=args.rank_projection_end, rank_multiple=args.plan_rank_multiple, method=args.rank_projection_method,
            )
            if args.rank_projection_method == "whitened":  # statistics of the layers' inputs on recent batches
                self._recent_batches = RecentBatches(args.rank_projection_calibration_batches)
                self._running_grams = RunningGrams(layers, reduce=sum_over_processes)  # every process's batches
        self._check_sharding(args)  # before the Trainer builds anything: arguments, launcher environment
        self.channels_last = args.channels_last and _can_train_channels_last(model, args.device)
        if self.channels_last:  # before the optimizer exists, so that its state takes the same layout
            model = model.to(memory_format=torch.channels_last)
        super().__init__(model=model, args=args, **kwargs)
        if self.rank_projection is not None:
            self.add_callback(_ProjectAfterStep(self))
        if self.channels_last:
            self.add_callback(_ContiguousAfterTraining())
        self._check_sharding(args)  # and the accelerator the Trainer set up
        if _mean_loss_classifier(model):
            # These heads return a per-batch *mean* loss yet accept **kwargs, so the Trainer would assume
            # it is already scaled for gradient accumulation and skip dividing it: GA=2 would double the
            # task gradient (measured with BertForSequenceClassification, transformers 5.23).
            self.model_accepts_loss_kwargs = False
        self._penalty_sums: dict[str, float] = defaultdict(float)
        self._penalty_steps = 0
        if self.smoothness.active:
            names = self.smoothness.layer_names
            logger.info(f"Smoothness penalties on {len(names)} layers: {names[:3]} ... {names[-2:]}")

    def _check_sharding(self, args: SmoothTrainingArguments) -> None:
        """Penalties and projection work on whole weights (DDP, ZeRO-1/2) and on FSDP2's row blocks: refuse at start-up
        the sharded setups they cannot work on, FSDP1 and DeepSpeed ZeRO-3, whose flat parameter slices hold no row
        block of a weight matrix, and what FSDP2 splits where a whitened projection cannot act."""
        if not self.smoothness.active and self.rank_projection is None:
            return
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        env = os.environ
        zero3 = is_deepspeed_zero3_enabled() or (
            env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        )
        if zero3:
            raise ValueError(
                "smoothness penalties and rank projection are not supported with DeepSpeed ZeRO-3: it partitions each "
                "parameter as a flat slice, so no process holds a block of rows of a weight matrix to difference or "
                "decompose. Use FSDP2 to shard the model (accelerate launch --config_file "
                "recipes/accelerate_configs/fsdp2.yaml, docs/training.md), or DDP / DeepSpeed ZeRO-1/2, which keep "
                "whole weights on every process."
            )
        version = _fsdp_version(args, getattr(self, "accelerator", None))
        if version == 1:
            raise ValueError(
                "smoothness penalties and rank projection are not supported with FSDP1: it flattens each module's "
                "parameters into one sharded vector, so no process holds a block of rows of a weight matrix. Use FSDP2 "
                "(fsdp_version: 2 in the Accelerate config, as recipes/accelerate_configs/fsdp2.yaml; or "
                "fsdp_config={'version': 2}), which these work on, or DDP."
            )
        projection = self.rank_projection
        if version == 2 and projection is not None and projection.method == "whitened":
            split_inputs = [name for name, module in projection.layers if is_hf_conv1d(module)]
            if split_inputs:
                raise split_inputs_error(split_inputs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._recent_batches is not None:  # whitened projection: its next statistics come from these batches
            self._recent_batches.add(inputs)
        if _fsdp_version(self.args, self.accelerator) == 2:
            # FSDP2 keeps each process's buffers (BatchNorm statistics) its own; DDP gives every process rank 0's before
            # each forward. Doing the same makes the evaluation and the saved model those of a DDP run.
            with torch.no_grad():
                broadcast_buffers(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def projection_grams(self) -> dict[str, torch.Tensor] | None:
        """The input statistics a whitened projection plans with, refreshed on the recent batches (None: 'svd')."""
        if self._running_grams is None:
            return None
        return self._running_grams.refresh(self.accelerator.unwrap_model(self.model), self._recent_batches)

    # ---- loss -------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if is_transformers_model(self.accelerator.unwrap_model(model)):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        else:
            missing = [key for key in ("pixel_values", "labels") if key not in inputs]
            if missing:
                raise ValueError(
                    f"SmoothTrainer calls a non-transformers model as model(pixel_values) and trains it with cross-"
                    f"entropy on labels, but the batch has no {missing} (it has {sorted(inputs)}). Make the dataset or "
                    "the data collator return 'pixel_values' and 'labels' (smooth_hf.data.ImageTransform does), and "
                    "keep remove_unused_columns=False."
                )
            logits = model(inputs["pixel_values"])
            loss = F.cross_entropy(logits, inputs["labels"])
            outputs = {"loss": loss, "logits": logits}

        # Eval loss stays the task loss, comparable with a plain model's.
        if model.training and self.smoothness.active and self.accelerator.sync_gradients:
            loss = loss + self._penalty(num_items_in_batch).to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _penalty(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        step = self.state.global_step
        total, terms = self.smoothness(step)
        ramp = self._warmup_factor(step)
        for key, value in terms.items():
            self._penalty_sums[key] += value
        self._penalty_sums["penalty"] += float(total.detach()) * ramp
        self._penalty_steps += 1
        return total * ramp * self._ga_compensation(num_items_in_batch)

    def _warmup_factor(self, step: int) -> float:
        if self.args.penalty_warmup_ratio <= 0 or not self.state.max_steps:
            return 1.0
        warmup_steps = max(1, math.ceil(self.args.penalty_warmup_ratio * self.state.max_steps))
        return min(1.0, (step + 1) / warmup_steps)

    def _ga_compensation(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        """Undo the division by the accumulation steps that ``training_step`` applies to this loss."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:  # the Trainer's own rule (transformers >= 4.46)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 if scaled else float(self.current_gradient_accumulation_steps)

    # ---- logging ----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; add each penalty term, averaged over the steps since the last log.
        if "loss" in logs and self._penalty_steps:
            for key, value in self._penalty_sums.items():
                logs[f"smooth/{key}"] = round(value / self._penalty_steps, 6)
            self._penalty_sums.clear()
            self._penalty_steps = 0
        super().log(logs, start_time)

    # ---- checkpoints: the cached nuclear-norm directions are training state --------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.channels_last and state_dict is None:
            # safetensors refuses strided tensors; the checkpoint is written in the usual layout
            state_dict = {k: v.contiguous() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}
        super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.smoothness.active:
            state = self.smoothness.state_dict()  # on every process: directions FSDP2 split are gathered whole
            if state and self.args.should_save:
                folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
                save_file(state, os.path.join(folder, PENALTY_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PENALTY_STATE_NAME)
        if self.smoothness.active and os.path.isfile(path):
            self.smoothness.load_state_dict(load_file(path))


def _fsdp_version(args: SmoothTrainingArguments, accelerator: Any) -> int | None:
    """The FSDP version this run shards with (None: no FSDP): the accelerator's, once the Trainer has built it; before,
    the arguments' (``fsdp`` / ``fsdp_config``) or what ``accelerate launch`` with an FSDP config sets."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None:
        return int(plugin.fsdp_version)
    if args.fsdp:
        return int((getattr(args, "fsdp_plugin_args", None) or {}).get("fsdp_version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate launch's own default
    return None


def _macs_profile(model: nn.Module, args: SmoothTrainingArguments, dataset: Any) -> MacsProfile:
    """Multiply-adds per layer on ``args.plan_input_shape``, or on the shape of the first training example (then
    recorded there, so that training_args.json says what the plan was priced on)."""
    if args.plan_input_shape is None:
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise ValueError("a compute budget (*_macs_reduction) is priced on the input shape: give plan_input_shape "
                             "(e.g. 3,32,32), or a train_dataset whose examples hold pixel_values or input_ids")
        # Reading an augmented example draws random numbers; the Trainer seeds them afterwards, in its __init__.
        args.plan_input_shape = format_shape(sample_shape(dataset[0]))
    profile = MacsProfile.measure(model, args.plan_input_shape)
    if args.should_log:
        logger.info(f"Planning the cut on multiply-adds for inputs of shape ({args.plan_input_shape}): "
                    f"{profile.total:,} per sample")
    return profile


class _ProjectAfterStep(TrainerCallback):
    """Runs the trainer's :class:`RankProjection` after every optimizer step (``on_step_end``).

    Under DDP every process projects its own (identical) weights; rank 0's result is then broadcast, so that a
    decomposition that differs in the last bit between devices cannot make the replicas drift apart. Under FSDP2 each
    process projects its own block of each weight (nothing to broadcast).
    """

    def __init__(self, trainer: SmoothTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        projection = self.trainer.rank_projection
        if not projection.is_due(state.global_step, state.max_steps):
            return control
        ranks = projection(state.global_step, state.max_steps, self.trainer.projection_grams())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for _, module in projection.layers:
                if not is_split(module):
                    torch.distributed.broadcast(module.weight.data, src=0)
        self.trainer.smoothness.invalidate()  # its cached nuclear-norm directions are of the old weights
        if state.global_step >= state.max_steps:
            kept = {name: rank for (name, _), rank in zip(projection.layers, ranks, strict=True)}
            logger.info(f"Rank projection: final ranks {kept}")
        return control


def _can_train_channels_last(model: nn.Module, device: torch.device) -> bool:
    broken = channels_last_mismatches(model, device)
    if broken:
        logger.warning(
            f"channels_last is off: on {device} this torch computes wrong gradients in channels_last for "
            f"{len(broken)} convolution(s) of the model ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}; "
            "smooth_hf.core.memory_format). Training goes on in the usual layout, correct and slower."
        )
    return not broken


class _ContiguousAfterTraining(TrainerCallback):
    """``channels_last`` is a training speed-up only: the trained model goes back to the usual layout, so that
    saving it (safetensors wants contiguous tensors), compressing or exporting it sees an ordinary model."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            model.to(memory_format=torch.contiguous_format)
        return control

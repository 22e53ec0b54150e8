"""``SmoothTrainingArguments``: ``TrainingArguments`` plus the smoothness penalties."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from ..core.machine import usable_cores
from ..core.validation import check_count, check_fraction
from .cut_plan import format_shape, parse_shape
from .projection import METHODS, check_schedule
from .smoothness import COEFFICIENTS, NORMALIZATIONS, check_coefficients

__all__ = ["PLAIN", "SmoothTrainingArguments"]

# The settings that make a run plain: no penalty and no rank projection. Everything that compares smooth with plain
# training (the main job, the benchmarks, the recipes' flags) derives its baseline from this one dict.
PLAIN = {**dict.fromkeys(COEFFICIENTS, 0.0), "rank_projection_param_reduction": None,
         "rank_projection_macs_reduction": None}
# The options that plan a cut during training, by the LowRankConfig rule of that cut.
_CUT_OPTIONS = {"rank_projection": ("rank_projection_param_reduction", "rank_projection_macs_reduction"),
                "nuclear_norm": ("nuclear_norm_param_reduction", "nuclear_norm_macs_reduction")}

logger = logging.get_logger(__name__)
_PROJECTION_SCHEDULE = ("rank_projection_every", "rank_projection_start", "rank_projection_end")


@dataclass
class SmoothTrainingArguments(TrainingArguments):
    """Arguments for :class:`smooth_hf.SmoothTrainer`: every ``TrainingArguments`` field, plus these.

    With all three coefficients at 0 and no rank projection the trainer is a plain ``Trainer`` (the "plain" baseline).
    """

    nuclear_norm_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the nuclear-norm penalty (drives weights towards low rank). 0 = off. "
                  "Measured settings per model family: smooth_hf.training.presets; higher compresses further and costs "
                  "dense accuracy."},
    )
    first_order_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the first-order finite-difference penalty along the output- and "
                  "input-channel axes. 0 = off. About 1 with penalty_normalization=scale_free; with the nuclear norm it "
                  "also recovered dense accuracy in the benchmarks."},
    )
    second_order_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the second-order finite-difference penalty along the output- and "
                  "input-channel axes. 0 = off."},
    )
    penalty_normalization: str = field(
        default="scale_free",
        metadata={"help": "How layer terms are weighted. 'scale_free': each term divided by a scale of its "
                  "own weight and averaged over layers (size- and scale-independent); 'relative': the same terms "
                  "times the squared norm of the weight, held constant, so that a step moves each weight by a "
                  "fraction of its own size, whatever its initial scale; 'sum': plain sums added over layers.", "choices": list(NORMALIZATIONS)},
    )
    penalty_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Layers to penalise: module names or name suffixes (peft convention). Default: "
                  "every Linear, Conv2d and HF Conv1D. A pattern that matches nothing is an error."},
    )
    penalty_exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Layers to leave unpenalised, same syntax as penalty_target_modules."},
    )
    penalty_skip_first_last: bool = field(
        default=True,
        metadata={"help": "Leave the first and last targeted layer (usually the stem and the classifier "
                  "head) unpenalised: they are small and the most sensitive."},
    )
    nuclear_norm_every: int = field(
        default=25,
        metadata={"help": "Recompute the nuclear norm's gradient direction U V^T every N optimizer steps and use "
                  "the surrogate <W, U V^T> in between (1 = exact every step; cost and accuracy of the "
                  "default: BENCHMARKS.md)."},
    )
    nuclear_norm_param_reduction: float | None = field(
        default=None,
        metadata={"help": "Penalise only the tail of each spectrum: the singular values that a later "
                  "LowRankConfig(param_reduction=p) cut would remove, re-planned from the current weights at every "
                  "nuclear_norm_every refresh. None = the whole nuclear norm (the paper's penalty)."},
    )
    nuclear_norm_macs_reduction: float | None = field(
        default=None,
        metadata={"help": "As nuclear_norm_param_reduction, for a later LowRankConfig(macs_reduction=p) cut: "
                  "multiply-adds on inputs of plan_input_shape."},
    )
    rank_projection_param_reduction: float | None = field(
        default=None,
        metadata={"help": "Train for a cut: every rank_projection_every steps, replace each penalised layer's weight "
                  "by its truncated SVD at the ranks that LowRankConfig(param_reduction=p) would keep, the cut growing "
                  "from 0 to p between rank_projection_start and rank_projection_end, and always p at the last step, "
                  "so that compressing at p afterwards changes nothing (smooth_hf.RankProjection). Works with or "
                  "without the penalties. None = off."},
    )
    rank_projection_macs_reduction: float | None = field(
        default=None,
        metadata={"help": "Train for a compute budget: as rank_projection_param_reduction, with the ranks that "
                  "LowRankConfig(macs_reduction=p) keeps, i.e. p of the multiply-adds of every Linear/Conv layer "
                  "removed on inputs of plan_input_shape (each rank priced at its layer's output resolution), so the "
                  "cut goes where the time goes. recipes/compress.py then cuts with the same rule and shape. None = "
                  "off."},
    )
    rank_projection_method: str = field(
        default="svd",
        metadata={"help": "How rank projection truncates, as the later cut will (LowRankConfig.method): 'svd' (each "
                  "weight's truncated SVD, ranks allocated on its spectrum) or 'whitened' (each weight's best rank-r "
                  "approximation for the inputs it sees on recent training batches, ranks allocated on the whitened "
                  "spectra), for a cut made with method='whitened'; recipes/compress.py then cuts that way.",
                  "choices": ["svd", "whitened"]},
    )
    rank_projection_calibration_batches: int = field(
        default=2,
        metadata={"help": "rank_projection_method='whitened': at each projection the inputs of every projected layer "
                  "are collected on this many of the most recent training batches (forward passes in eval mode), and "
                  "added to a running sum of the earlier ones, halved at each projection."},
    )
    factorise_embeddings: bool = field(
        default=False,
        metadata={"help": "Rank projection plans and projects the word embeddings (plain nn.Embedding layers) too, "
                  "as LowRankConfig(factorise_embeddings=True) cuts them: half of a small BERT's parameters are its "
                  "word embeddings. recipes/compress.py cuts them too. Not with a compute budget."},
    )
    rank_projection_every: int = field(
        default=10, metadata={"help": "Optimizer steps between two projections (rank_projection_*_reduction)."}
    )
    rank_projection_start: float = field(
        default=0.1, metadata={"help": "Fraction of the training steps at which the projected cut starts to grow."}
    )
    rank_projection_end: float = field(
        default=0.6, metadata={"help": "Fraction of the training steps from which the projected cut is the full "
                               "rank_projection_*_reduction."}
    )
    plan_rank_multiple: int | None = field(
        default=None,
        metadata={"help": "Round the ranks that rank_projection_*_reduction and nuclear_norm_*_reduction plan "
                  "up to a multiple of this, as LowRankConfig(rank_multiple=...) rounds the later cut, so that "
                  "training keeps exactly what that cut keeps. None = what compress() uses by default on the "
                  "training device (smooth_hf.lowrank.timing.default_rank_multiple); give the rank_multiple you will "
                  "compress with when you compress elsewhere."},
    )
    plan_input_shape: str | None = field(
        default=None,
        metadata={"help": "The shape of one input sample that rank_projection_macs_reduction and "
                  "nuclear_norm_macs_reduction price multiply-adds on: channels,height,width for images (e.g. "
                  "3,32,32), the number of tokens for text. None = the shape of the first training example, "
                  "recorded in training_args.json; give the shape the model will serve when it differs."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "recipes/train.py: train into an output_dir that holds an earlier run (its files are "
                  "replaced); without it the recipe refuses, to keep two runs apart (the flag transformers 4 had; "
                  "the Trainer itself does not read it)."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Train with the conv weights (and so the activations) in channels_last memory format: "
                  "faster convolutions on CPUs (oneDNN) and on GPUs in fp16/bf16 (BENCHMARKS.md, section 4). The "
                  "model is handed back, and checkpoints are saved, in the usual contiguous format."},
    )
    penalty_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Ramp the penalty coefficients linearly from 0 over this fraction of the "
                  "training steps (0 = full strength from the first step)."},
    )

    def __post_init__(self) -> None:
        check_coefficients(self, flag="--")
        if self.penalty_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"--penalty_normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.penalty_normalization!r}"
            )
        if not isinstance(self.nuclear_norm_every, int) or self.nuclear_norm_every < 1:
            raise ValueError(
                f"--nuclear_norm_every must be an integer >= 1 (1 = exact SVD every step), got {self.nuclear_norm_every!r}"
            )
        for options in _CUT_OPTIONS.values():
            given = [name for name in options if getattr(self, name) is not None]
            for name in given:
                check_fraction(getattr(self, name), f"--{name}")
            if len(given) > 1:
                raise ValueError(f"give --{given[0]} or --{given[1]}, not both: training plans for one cut, of the "
                                 "parameters or of the multiply-adds")
        if self.plan_input_shape is not None:
            self.plan_input_shape = format_shape(parse_shape(self.plan_input_shape, "--plan_input_shape"))
            if not self.plans_for_compute:
                logger.warning("--plan_input_shape does nothing without --rank_projection_macs_reduction or "
                               "--nuclear_norm_macs_reduction (no compute budget is planned)")
        check_schedule(self.rank_projection_every, self.rank_projection_start, self.rank_projection_end, flag="--")
        if self.rank_projection_method not in METHODS:
            raise ValueError(f"--rank_projection_method must be one of {', '.join(METHODS)}, got "
                             f"{self.rank_projection_method!r}")
        check_count(self.rank_projection_calibration_batches, "--rank_projection_calibration_batches")
        if self.factorise_embeddings and self.plans_for_compute:
            raise ValueError("--factorise_embeddings does not count multiply-adds (a lookup costs none): plan a "
                             "parameter budget with it (--rank_projection_param_reduction), or leave the embeddings "
                             "dense")
        unused = [f"--{name}" for name in ("rank_projection_method", "factorise_embeddings")
                  if getattr(self, name) not in ("svd", False)]
        if unused and self.projection_rule is None:
            logger.warning("%s do(es) nothing without rank projection (--rank_projection_*_reduction)", ", ".join(unused))
        if self.projection_rule is not None and self.load_best_model_at_end:
            raise ValueError(
                f"--load_best_model_at_end with --rank_projection_{self.projection_rule}: the best checkpoint can be one from "
                "before the cut reached its plan (the projection grows it until --rank_projection_end), and a model "
                "from there loses accuracy when it is cut, while the run's records say it was trained for the cut. "
                "Drop --load_best_model_at_end: the model at the last step is the one trained for the cut."
            )
        schedule = [f"--{f.name}" for f in fields(self) if f.name in _PROJECTION_SCHEDULE and getattr(self, f.name) != f.default]
        if schedule and self.projection_rule is None:
            logger.warning("%s do(es) nothing without --rank_projection_param_reduction or "
                           "--rank_projection_macs_reduction (no rank projection)", ", ".join(schedule))
        if self.plan_rank_multiple is not None:
            check_count(self.plan_rank_multiple, "--plan_rank_multiple")
            if not self.plans_a_cut:
                logger.warning("--plan_rank_multiple does nothing without --rank_projection_param_reduction, "
                               "--rank_projection_macs_reduction or a nuclear_norm_*_reduction (no cut is planned "
                               "during training)")
        if not 0.0 <= self.penalty_warmup_ratio < 1.0:
            raise ValueError(f"--penalty_warmup_ratio must be in [0, 1), got {self.penalty_warmup_ratio!r}")
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # `accelerate launch` / torchrun with several processes on a machine without GPUs: without use_cpu the
            # Trainer sets up a process group yet trains every process alone on all the data; with it, gloo DDP.
            logger.info("%s processes launched and no accelerator: setting use_cpu=True (DDP over gloo)",
                        os.environ["WORLD_SIZE"])
            self.use_cpu = True
        _warn_if_cores_idle()
        super().__post_init__()

    @property
    def projection_rule(self) -> str | None:
        """``"param_reduction"`` or ``"macs_reduction"``: the budget rank projection plans for (None: no projection)."""
        return next((name.removeprefix("rank_projection_") for name in _CUT_OPTIONS["rank_projection"]
                     if getattr(self, name) is not None), None)

    @property
    def plans_a_cut(self) -> bool:
        """Whether training plans a cut (rank projection or the tail-only nuclear norm)."""
        return any(getattr(self, name) is not None for options in _CUT_OPTIONS.values() for name in options)

    @property
    def plans_for_compute(self) -> bool:
        """Whether the planned cut is a multiply-add budget (priced on plan_input_shape)."""
        return any(getattr(self, options[1]) is not None for options in _CUT_OPTIONS.values())

    @property
    def steers_to_low_rank(self) -> bool:
        """Whether training does anything a plain ``Trainer`` would not: a penalty, or rank projection."""
        return any(getattr(self, key) != value for key, value in PLAIN.items())


def _warn_if_cores_idle() -> None:
    """Training on the CPU with fewer threads than cores: ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` for a
    one-process run unless told otherwise, which a user cannot see and which leaves the other cores idle."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(usable_cores()) // max(processes, 1)
    if _has_accelerator() or torch.get_num_threads() >= cores:
        return
    logger.warning(
        "training on the CPU with %d thread(s) per process while %d core(s) per process are free: `accelerate "
        "launch` sets OMP_NUM_THREADS=1 unless asked otherwise. Pass `accelerate launch --num_cpu_threads_per_process "
        "%d ...`, or launch one process per core (recipes/accelerate_configs/cpu_2proc.yaml, docs/training.md, 'Launching').",
        torch.get_num_threads(), cores, cores,
    )


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()

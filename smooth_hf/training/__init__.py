"""Training for a cut: penalties that make weights smooth and low rank, rank projection, and the Trainer.

trl's layout: :mod:`~smooth_hf.training.config` (``SmoothTrainingArguments``) and
:mod:`~smooth_hf.training.trainer` (``SmoothTrainer``), over pure parts a custom loop can use alone:
:mod:`~smooth_hf.training.penalties` (the math), :mod:`~smooth_hf.training.smoothness` (``SmoothnessPenalty``),
:mod:`~smooth_hf.training.projection` (``RankProjection``), :mod:`~smooth_hf.training.cut_plan` (the ranks a
planned cut keeps) and :mod:`~smooth_hf.training.presets` (measured recipes). Under FSDP2 both compute on the rows of
each weight a process holds: :mod:`~smooth_hf.training.shards` (the pieces and their collectives) and
:mod:`~smooth_hf.training.sharded` (the math on them).
"""

from .config import SmoothTrainingArguments
from .projection import RankProjection
from .smoothness import SmoothnessPenalty
from .trainer import SmoothTrainer

__all__ = ["RankProjection", "SmoothTrainer", "SmoothTrainingArguments", "SmoothnessPenalty"]

"""smooth_hf: smooth training and low-rank compression without fine-tuning, for HF and timm models.

    from smooth_hf import SmoothTrainer, SmoothTrainingArguments, LowRankConfig, compress
"""

__version__ = "0.1.0"

from . import models  # noqa: F401  (registers resnet18_cifar / resnet14_cifar with timm)
from .penalties import first_order, nuclear_norm, second_order
from .smoothness import SmoothnessPenalty
from .targeting import find_layers
from .trainer import SmoothTrainer
from .training_args import SmoothTrainingArguments

__all__ = [
    "SmoothTrainer",
    "SmoothTrainingArguments",
    "SmoothnessPenalty",
    "__version__",
    "find_layers",
    "first_order",
    "nuclear_norm",
    "second_order",
]

"""smooth_hf: smooth training and low-rank compression without fine-tuning, for HF and timm models.

    from smooth_hf import SmoothTrainer, SmoothTrainingArguments, LowRankConfig, compress
    import smooth_hf; smooth_hf.save_pretrained(model, dir); smooth_hf.from_pretrained(dir)

Importing smooth_hf also registers the quantization method "smooth_hf" with transformers, so a compressed
transformers model saves with model.save_pretrained and loads with AutoModelFor*.from_pretrained / pipeline.

The package root only re-exports; the layers below it (docs/architecture.md) import downwards only:
scripts > hub > checkpoint > integrations > training, evaluation > lowrank > core, data, models.
"""

from ._version import __version__
from .checkpoint.card import ModelCardInfo
from .checkpoint.compressed import save_pretrained
from .hub import from_pretrained, push_to_hub
from .integrations.transformers import SmoothHfConfig  # registers the "smooth_hf" quantization method
from .lowrank import CompressionReport, LowRankConfig, apply_ranks, compress, count_macs, count_parameters
from .lowrank.batchnorm import DataFreeRecalibration, recalibrate_batchnorm, synthesize_batchnorm_inputs
from .lowrank.targeting import find_layers
from .models import resnet_cifar  # noqa: F401  (registers resnet18_cifar / resnet14_cifar with timm)
from .training.config import SmoothTrainingArguments
from .training.penalties import first_order, nuclear_norm, second_order
from .training.projection import RankProjection
from .training.smoothness import SmoothnessPenalty
from .training.trainer import SmoothTrainer

__all__ = [
    "CompressionReport",
    "DataFreeRecalibration",
    "LowRankConfig",
    "ModelCardInfo",
    "RankProjection",
    "SmoothHfConfig",
    "SmoothTrainer",
    "SmoothTrainingArguments",
    "SmoothnessPenalty",
    "__version__",
    "apply_ranks",
    "compress",
    "count_macs",
    "count_parameters",
    "find_layers",
    "first_order",
    "from_pretrained",
    "nuclear_norm",
    "push_to_hub",
    "recalibrate_batchnorm",
    "save_pretrained",
    "second_order",
    "synthesize_batchnorm_inputs",
]

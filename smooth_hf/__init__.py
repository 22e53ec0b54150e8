"""smooth_hf: smooth training and low-rank compression without fine-tuning, for HF and timm models.

    from smooth_hf import SmoothTrainer, SmoothTrainingArguments, LowRankConfig, compress
    import smooth_hf; smooth_hf.save_pretrained(model, dir); smooth_hf.from_pretrained(dir)

Importing smooth_hf also registers the quantization method "smooth_hf" with transformers, so a compressed
transformers model saves with model.save_pretrained and loads with AutoModelFor*.from_pretrained / pipeline.
"""

__version__ = "0.1.0"

from . import modeling_resnet_cifar  # noqa: F401  (registers resnet18_cifar / resnet14_cifar with timm)
from .batchnorm import DataFreeRecalibration, recalibrate_batchnorm, synthesize_batchnorm_inputs
from .hf_quantizer import SmoothHfConfig  # registers the "smooth_hf" quantization method with transformers
from .hub import from_pretrained, push_to_hub, save_pretrained
from .lowrank import CompressionReport, LowRankConfig, apply_ranks, compress, count_macs, count_parameters
from .model_card import ModelCardInfo
from .penalties import first_order, nuclear_norm, second_order
from .projection import RankProjection
from .smoothness import SmoothnessPenalty
from .targeting import find_layers
from .trainer import SmoothTrainer
from .training_args import SmoothTrainingArguments

__all__ = [
    "CompressionReport",
    "DataFreeRecalibration",
    "LowRankConfig",
    "ModelCardInfo",
    "SmoothHfConfig",
    "SmoothTrainer",
    "SmoothTrainingArguments",
    "RankProjection",
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

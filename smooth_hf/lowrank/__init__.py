"""Low-rank compression without fine-tuning: truncated SVD of every targeted layer, or its whitened
(activation-aware) form that uses a few calibration batches (``LowRankConfig(method="whitened")``).

``compress(model, LowRankConfig(param_reduction=0.7))`` replaces Linear / Conv2d / HF Conv1D layers
by two thin factors in place (``LowRankConfig(macs_reduction=0.6)`` with ``compress(...,
example_inputs=x)`` budgets multiply-adds instead, and ``keep_slower_dense=True`` keeps the layers
that would not run faster factorised); ``apply_ranks`` rebuilds that structure on a fresh model so a saved
compressed state dict loads strictly. Every low-rank layer is a :class:`LowRankLayer`.
"""

from .allocation import allocate_ranks
from .base import LowRankLayer
from .compress import compress
from .config import LowRankConfig
from .cost import count_macs
from .layers import LowRankConv2d, LowRankEmbedding, LowRankLinear, factorise, low_rank_layer_like
from .report import CompressionReport, LayerReport, count_parameters
from .structure import apply_ranks, check_compressed
from .whitening import InputGrams, calibrate

__all__ = [
    "CompressionReport",
    "InputGrams",
    "LayerReport",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLayer",
    "LowRankLinear",
    "allocate_ranks",
    "apply_ranks",
    "calibrate",
    "check_compressed",
    "compress",
    "count_macs",
    "count_parameters",
    "factorise",
    "low_rank_layer_like",
]

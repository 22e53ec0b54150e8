"""Low-rank compression without fine-tuning: truncated SVD of every targeted layer.

``compress(model, LowRankConfig(param_reduction=0.7))`` replaces Linear / Conv2d / HF Conv1D layers
by two thin factors in place; ``apply_ranks`` rebuilds that structure on a fresh model so a saved
compressed state dict loads strictly.
"""

from .allocation import allocate_ranks
from .compress import CompressionReport, LayerReport, apply_ranks, compress, count_parameters
from .config import CONFIG_NAME, LowRankConfig
from .layers import LowRankConv2d, LowRankLinear

__all__ = [
    "CONFIG_NAME",
    "CompressionReport",
    "LayerReport",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "allocate_ranks",
    "apply_ranks",
    "compress",
    "count_parameters",
]

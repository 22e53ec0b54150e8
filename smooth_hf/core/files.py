"""The names of the files smooth_hf writes and reads, decided once.

The first five are Hugging Face's own (what ``save_pretrained`` writes and ``from_pretrained`` reads); the others
are smooth_hf's: the compression record and report next to a compressed model, and the records
``recipes/train.py`` leaves next to a trained one for ``recipes/compress.py``.
"""

from __future__ import annotations

__all__ = [
    "CARD_NAME",
    "COMPRESSION_CONFIG_NAME",
    "DATA_RECORD_NAME",
    "GENERATION_CONFIG_NAME",
    "HF_CONFIG_NAME",
    "PENALTY_STATE_NAME",
    "PICKLE_SUFFIXES",
    "REPORT_NAME",
    "SHARD_INDEX_NAME",
    "TRAINING_ARGS_NAME",
    "WEIGHTS_NAME",
]

WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SHARD_INDEX_NAME = "model.safetensors.index.json"  # transformers' sharded save (max_shard_size), read by transformers
CARD_NAME = "README.md"

COMPRESSION_CONFIG_NAME = "compression_config.json"  # LowRankConfig with every layer's rank
REPORT_NAME = "compression_report.json"  # parameter counts and the per-layer table
TRAINING_ARGS_NAME = "training_args.json"  # recipes/train.py: the SmoothTrainingArguments of the run
DATA_RECORD_NAME = "data_args.json"  # recipes/train.py: the data, split and seed the model was trained on
PENALTY_STATE_NAME = "smooth_penalty_state.safetensors"  # in Trainer checkpoints: the cached nuclear-norm directions

# Extensions of pickle-based checkpoints: loading them can execute arbitrary code, so a folder holding
# any of them is refused rather than half-trusted.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

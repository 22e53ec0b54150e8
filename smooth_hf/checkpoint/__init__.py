"""Checkpoint folders on disk: building a model from a name or folder, dense and compressed saves, the model card.

:mod:`~smooth_hf.checkpoint.build` (models from names), :mod:`~smooth_hf.checkpoint.dense` (trained models),
:mod:`~smooth_hf.checkpoint.compressed` (compressed models), :mod:`~smooth_hf.checkpoint.transformers` (through
transformers' own save and load), :mod:`~smooth_hf.checkpoint.folders` (checks and atomic moves),
:mod:`~smooth_hf.checkpoint.card` (the model card). The Hub is :mod:`smooth_hf.hub`.
"""

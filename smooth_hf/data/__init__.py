"""Data: datasets as the recipes read them, and the transforms that turn them into a model's inputs.

* :mod:`~smooth_hf.data.images`: image classification through ``datasets`` (the Hub, image folders, saved
  datasets, Fashion-MNIST from Debian's files); splits and seeded subsets;
* :mod:`~smooth_hf.data.transforms`: :class:`ImageTransform`, images -> ``pixel_values`` (and augmentation);
* :mod:`~smooth_hf.data.processors`: what a model expects (its image processor or timm data config).
"""

from .images import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    TensorExamples,
    dataset_card_fields,
    dataset_display_name,
    dataset_identity,
    fashion_mnist_arrays,
    held_as_tensors,
    image_channels,
    label_names,
    load_fashion_mnist_local,
    load_image_classification,
    prepare_image_splits,
    read_idx,
    select_subset,
)
from .processors import default_image_processor, image_input_config, image_processor_for
from .transforms import ImageTransform

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "ImageTransform",
    "TensorExamples",
    "dataset_card_fields",
    "dataset_display_name",
    "dataset_identity",
    "default_image_processor",
    "fashion_mnist_arrays",
    "held_as_tensors",
    "image_channels",
    "image_input_config",
    "image_processor_for",
    "label_names",
    "load_fashion_mnist_local",
    "load_image_classification",
    "prepare_image_splits",
    "read_idx",
    "select_subset",
]

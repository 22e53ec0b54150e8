"""The bottom layer: facts about models and weights that every other layer needs, importing nothing above.

libraries (transformers, timm or plain?), weights (a layer's weight as a matrix), dtypes, batches (feeding a batch
to a model), machine (CPU cores), memory_format (channels_last), validation (option checks), files (file names).
"""

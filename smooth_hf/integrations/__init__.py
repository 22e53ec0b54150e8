"""What other libraries need to handle compressed models: transformers' quantization hook (``transformers``)."""

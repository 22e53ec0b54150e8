"""Model definitions smooth_hf registers with timm (the paper's CIFAR-style ResNets)."""

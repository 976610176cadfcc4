"""Data: CoOp-style dataset folders, few-shot splits, Fashion-MNIST, the image-feature cache."""

"""Pixels to pixels: per-image preprocessing, Keras-style geometric and photometric augmentation."""

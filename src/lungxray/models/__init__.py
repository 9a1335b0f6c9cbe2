"""The architectures (a registry of packed ensembles) and their optional fused CPU kernels."""

"""Optional C kernels for CPU training, compiled on first use; every one has a pure-PyTorch twin."""

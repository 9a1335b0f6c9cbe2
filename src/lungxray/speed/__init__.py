"""Speed: benchmarks against the machine's peak, and the per-machine choice of how training runs."""

"""lungxray: train, evaluate, ensemble and serve from-scratch CNNs for chest X-ray classification."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

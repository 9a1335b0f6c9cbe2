"""lungxray: train, evaluate, ensemble and serve from-scratch CNNs for chest X-ray classification.

The public API (see `lungxray.api`)::

    import lungxray
    model = lungxray.load("runs/reference")            # a bundle folder
    model.predict(["a.png", "b.dcm"])                  # labels, probabilities, uncertainty, refer flags
    run = lungxray.train("configs/smoke.yaml", out="runs/mine", epochs=3)
    lungxray.evaluate("runs/mine", data="other-hospital/")
    lungxray.audit("data/covid19-dataset").verdict        # can borders, thumbnails or file facts tell classes apart?

Importing the package is cheap: torch is imported on the first call that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from lungxray.api import Evaluation, Model, Run, audit, evaluate, load, train

if TYPE_CHECKING:
    from lungxray.evaluation.audit import AuditResult
    from lungxray.inference.predictor import Predictions
    from lungxray.io.decode import ImageDecodeError

__all__ = [
    "AuditResult",
    "Evaluation",
    "ImageDecodeError",
    "Model",
    "Predictions",
    "Run",
    "__version__",
    "audit",
    "evaluate",
    "load",
    "train",
]

_LAZY = {
    "AuditResult": "lungxray.evaluation.audit",
    "ImageDecodeError": "lungxray.io.decode",
    "Predictions": "lungxray.inference.predictor",
}


def __getattr__(name: str) -> Any:
    """Public names whose modules import torch (or PIL) load on first access, keeping `import lungxray` light."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lungxray' has no attribute {name!r}")

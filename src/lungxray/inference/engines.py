"""The choice of engine, above both engines: the PyTorch bundle (predictor.py) or its ONNX export (onnx.py).

Kept out of predictor.py so that the base Predictor does not import its own subclass (the predict <-> export
circle of issue 20); callers that let a user pick the engine (the CLI, `lungxray.load`, the server) come here.
"""

from __future__ import annotations

from pathlib import Path

from lungxray.inference.onnx import OnnxPredictor
from lungxray.inference.predictor import Predictor

__all__ = ["ENGINES", "load_predictor"]

ENGINES = ("torch", "onnx")


def load_predictor(run_dir: str | Path, device: str = "cpu", engine: str = "torch",
                   onnx_path: str | Path | None = None) -> Predictor:
    """A Predictor for `engine`: "torch" runs the bundle; "onnx" runs RUN/model.onnx in ONNX Runtime (exported,
    parity-checked, on first use or when stale; see `onnx.OnnxPredictor`). Both give the same Predictions.
    `onnx_path` (implies "onnx") runs another export of this bundle instead, e.g. an int8 one."""
    if engine == "onnx" or onnx_path is not None:
        return OnnxPredictor.load(run_dir, device, onnx_path=onnx_path)
    if engine != "torch":
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    return Predictor.load(run_dir, device)

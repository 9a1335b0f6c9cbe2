"""Opt-in int8 ONNX models: static quantization of the wide convolutions, written only when it agrees with fp32.

Why: batch-1 latency of the 10-member reference halves (docs/performance.md, "Inference"), while a grouped
layer with few channels per group gets slower in int8, so only the wide ones are quantized. The file keeps the
fp32 graph contract of `lungxray.inference.onnx` and records its measured agreement with fp32 in its metadata.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungxray.inference.bundle import load_bundle
from lungxray.inference.onnx import INPUT_NAME, ONNX_NAME, export_checked, open_session, run_session
from lungxray.inference.predictor import Predictor
from lungxray.io.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["Agreement", "AgreementError", "agreement", "export_int8", "int8_images", "quantization_info",
           "quantize_int8"]

_QUANT_KEY = "lungxray.quantization"
INT8_MIN_GROUP_CHANNELS = 32
INT8_CALIBRATION_IMAGES = 64
INT8_MAX_PROB_DIFF = 0.05  # limits an int8 file must meet against fp32 before it is written
INT8_MIN_LABEL_AGREEMENT = 0.98


@dataclass(frozen=True)
class Agreement:
    """How closely an approximate model follows the fp32 one on real images."""

    images: int
    max_prob_diff: float  # max |calibrated probability difference| over images and classes
    label_agreement: float  # fraction of images with the same predicted label


class AgreementError(RuntimeError):
    """The quantized model strays from the fp32 one by more than the limits."""


def agreement(reference: str | Path, candidate: str | Path, images: np.ndarray) -> Agreement:
    """Compare the `probs` output of two ONNX files on uint8 (N, S, S) images."""
    ref = run_session(open_session(reference), images)[0]
    got = run_session(open_session(candidate), images)[0]
    return Agreement(len(images), float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean()))


def int8_images(predictor: Predictor, data: str | Path, calibration: int = INT8_CALIBRATION_IMAGES,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, check) images preprocessed under the bundle's contract, from a dataset folder.

    Calibration images are an evenly spaced sample of DATA/train (of DATA itself when it has no train/ folder),
    `calibration` of them or half of a smaller set;
    the agreement check runs on the training images not used for calibration. Never on DATA/test: the check
    needs no labels, but it decides whether a file is written, and nothing is decided on the test split.
    """
    from lungxray.inference.predictor import expand_paths

    root = Path(data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    paths = expand_paths([train_dir])
    if not paths:
        raise ValueError(f"no images under {train_dir} to calibrate the int8 model on")
    count = min(calibration, max(1, len(paths) // 2))  # at least half of a small set is left for the check
    chosen = set(np.linspace(0, len(paths) - 1, count).round().astype(int).tolist())
    check_paths = [q for i, q in enumerate(paths) if i not in chosen]
    if not check_paths:
        raise ValueError(f"no images under {root} left to check the int8 model on")

    def load(ps: list[Path]) -> np.ndarray:
        return np.stack([predictor.preprocess(q) for q in ps])

    return load([paths[i] for i in sorted(chosen)]), load(check_paths)


def _int8_nodes(model: Any) -> list[str]:
    """Conv nodes worth quantizing: those with >= INT8_MIN_GROUP_CHANNELS input channels per group.

    ONNX Runtime's int8 convolution (QLinearConv, VNNI) ran the 10-member reference's wide layers ~2.5x faster
    than fp32, but grouped layers with few channels per group 3-6x *slower* (16 channels: 6.4 ms against 2.4 ms;
    the 1-channel stem 5.4 ms against 1.0 ms), so quantizing every Conv made the whole model slower than fp32.
    """
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and len(shapes.get(n.input[1], [])) == 4
            and shapes[n.input[1]][1] >= INT8_MIN_GROUP_CHANNELS]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, check: np.ndarray, *,
                  max_prob_diff: float = INT8_MAX_PROB_DIFF,
                  min_label_agreement: float = INT8_MIN_LABEL_AGREEMENT) -> tuple[Path, Agreement]:
    """Static int8 quantization (QDQ, per-channel weights, min/max calibration) of an exported fp32 model.

    Only the wide convolutions are quantized (`_int8_nodes`); normalisation, the stem, softmax and the ensemble
    mean stay fp32. The file lands only when its agreement with the fp32 model on `check` is within the limits
    (`AgreementError` otherwise); the agreement is also written into its metadata.
    """
    fp32_path, out = Path(fp32_path), Path(out_path)
    result: Agreement | None = None

    def write(tmp: Path) -> None:
        nonlocal result
        nodes = _quantize_static(fp32_path, tmp, calibration)
        result = agreement(fp32_path, tmp, check)
        if not (result.max_prob_diff <= max_prob_diff and result.label_agreement >= min_label_agreement):
            raise AgreementError(
                f"int8 model disagrees with fp32 on {result.images} images: max |probability difference| "
                f"{result.max_prob_diff:.3g} (limit {max_prob_diff:g}), same label on "
                f"{100 * result.label_agreement:.1f}% (limit {100 * min_label_agreement:g}%)")
        _stamp_metadata(fp32_path, tmp, {"scheme": "int8 static, QDQ, per-channel weights, min/max calibration",
                                         "nodes": nodes, "calibration_images": len(calibration),
                                         "agreement": asdict(result)})

    path = atomic_write(out, write)
    assert result is not None
    return path, result


def _quantize_static(fp32_path: Path, out: Path, calibration: np.ndarray) -> list[str]:
    """Write the int8 model of `fp32_path` to `out`, calibrated on `calibration` in batches of 8; the names of
    the quantized nodes. onnx and onnxruntime.quantization are imported here, on the opt-in int8 path only."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: calibration[start : start + 8, None].astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="lungxray-int8-") as work:
        folded = Path(work) / "folded.onnx"  # BatchNorm folded into the convs, shapes inferred
        quant_pre_process(str(fp32_path), str(folded))
        nodes = _int8_nodes(onnx.load(str(folded)))
        if not nodes:
            raise AgreementError(f"{fp32_path}: no convolution with >= {INT8_MIN_GROUP_CHANNELS} input "
                                 f"channels per group, int8 would not be faster")
        quantize_static(str(folded), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax)
    return nodes


def _stamp_metadata(fp32_path: Path, path: Path, quantization: dict[str, Any]) -> None:
    """Give the int8 file the fp32 file's metadata (contract, fingerprint) plus how it was quantized."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.load(str(fp32_path)).metadata_props)
    entry = model.metadata_props.add()
    entry.key, entry.value = _QUANT_KEY, json.dumps(quantization)
    onnx.save(model, str(path))


def export_int8(run_dir: str | Path, out_path: str | Path, data: str | Path, opset: int = 17,
                ) -> tuple[Path, float, Agreement]:
    """Export the bundle (parity-checked fp32), then quantize it with calibration images from `data`.

    Returns the int8 file, the fp32 parity figure and the int8 model's agreement with the fp32 one.
    """
    predictor = Predictor(load_bundle(run_dir, "cpu"))
    calibration, check = int8_images(predictor, data)
    with tempfile.TemporaryDirectory(prefix="lungxray-export-") as work:
        fp32, diff = export_checked(run_dir, Path(work) / ONNX_NAME, opset)
        path, result = quantize_int8(fp32, out_path, calibration, check)
    log.info("int8 %s: max |probability difference| %.3g against fp32 on %d images, same label on %.1f%%",
             path, result.max_prob_diff, result.images, 100 * result.label_agreement)
    return path, float(diff or 0.0), result


def quantization_info(path: str | Path) -> dict[str, Any] | None:
    """What `quantize_int8` wrote into a file's metadata (None for an fp32 export)."""
    found = open_session(path).get_modelmeta().custom_metadata_map.get(_QUANT_KEY)
    return json.loads(found) if found else None

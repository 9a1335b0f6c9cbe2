"""Decode one image file into the model's input, identically for training, prediction and serving.

Every entry point of the project (dataset loading, ``predict``, the web server) calls :func:`decode_image`,
so a model never sees pixels preprocessed differently from the ones it was trained on. Decoding is
deliberately conservative: anything unreadable raises :class:`ImageDecodeError` (a ``ValueError``) whose
message names the file and what is wrong, never a library-specific exception, so callers need exactly one
``except`` clause.

Conventions (documented here because they change pixel values):

- Output of :func:`read_grayscale` is float32 in [0, 1] at full resolution, EXIF orientation applied.
- Colour is reduced to ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B``), the weights of PIL's
  ``convert("L")`` and so of Keras' ``color_mode="grayscale"``.
- Alpha is composited on **black** (value * alpha): transparent regions carry no X-ray signal, and black is
  what an X-ray shows where nothing attenuated the beam.
- Integer data is scaled by its bit depth: 8-bit / 255, 16-bit (PIL ``I;16*`` modes, ``uint16`` arrays)
  / 65535. Wider integer data (PIL mode ``I``, ``int32``/``int64`` arrays) has no declared depth: values in
  [0, 255] are divided by 255, values in [0, 65535] by 65535, anything else is min-max normalised. Float data
  already in [0, 1] is kept, other float data is min-max normalised; NaN/inf is refused.
- DICOM: modality LUT (rescale slope/intercept or LUT), then the first VOI LUT if present, else the first
  window centre/width (LINEAR, LINEAR_EXACT or SIGMOID), else min-max over the image (a viewer's auto-window);
  MONOCHROME1 is inverted so that bone is always bright. Multi-frame data is refused.
- Images with more than :data:`MAX_PIXELS` pixels are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageDecodeError",
    "decode_image",
    "is_dicom_bytes",
    "read_grayscale",
    "to_model_input",
]

MAX_PIXELS: int = 50_000_000
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
# Bumped whenever decoding changes pixel values: it is part of every dataset cache key (lungxray.data).
DECODER_VERSION = "1"

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Source = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray


class ImageDecodeError(ValueError):
    """An input that is not a decodable single-frame image; the message is ``"<name>: <what is wrong>"``."""


def is_dicom_bytes(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble, whatever their file name."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _default_name(source: object) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>"


def read_grayscale(source: Source, name: str | None = None) -> np.ndarray:
    """Decode ``source`` to a full-resolution float32 (H, W) array in [0, 1].

    ``source`` may be a path, the bytes of a file, a PIL image or an array ((H, W) or (H, W, 1|2|3|4)).
    ``name`` is used in error messages (default: the path, or a placeholder for in-memory input).
    Raises :class:`ImageDecodeError` for any input that cannot be decoded, and nothing else.
    """
    label = name if name is not None else _default_name(source)
    try:
        gray = _read(source, label)
        if gray.ndim != 2 or gray.size == 0:
            raise ImageDecodeError(f"{label}: decoded to an empty or non-2-D image of shape {gray.shape}")
        return gray
    except ImageDecodeError:
        raise
    except Exception as exc:  # any library failure on malformed input becomes the one documented error
        detail = str(exc).strip() or "no detail"
        raise ImageDecodeError(f"{label}: cannot decode ({type(exc).__name__}: {detail})") from exc


def to_model_input(gray: np.ndarray, size: int = 256) -> np.ndarray:
    """Stretch a [0, 1] image to ``size`` x ``size`` (like Keras ``target_size``) and quantise to uint8.

    The aspect ratio is not kept, because the reference pipeline did not keep it and models trained on it
    expect stretched anatomy. Resampling is PIL's antialiased bilinear (its filter widens when shrinking), so
    downscaling a 3000-pixel radiograph does not alias.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    arr = np.asarray(gray)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty (H, W) image, got shape {arr.shape}")
    arr = np.clip(np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0), 0.0, 1.0)
    if arr.shape != (size, size):
        resized = Image.fromarray(arr, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(resized, dtype=np.float32)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def decode_image(source: Source, size: int = 256, name: str | None = None) -> np.ndarray:
    """The one preprocessing path of the project: :func:`read_grayscale` then :func:`to_model_input`."""
    return to_model_input(read_grayscale(source, name), size)


# --------------------------------------------------------------------------------------------------- sources


def _read(source: Source, name: str) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return _array_to_gray(source, name)
    if isinstance(source, Image.Image):
        return _pil_to_gray(source, name)
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
        force_dicom = path.suffix.lower() in DICOM_SUFFIXES
    elif isinstance(source, bytes | bytearray | memoryview):
        data, force_dicom = bytes(source), False
    else:
        raise ImageDecodeError(f"{name}: unsupported input type {type(source).__name__}")
    if not data:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    if force_dicom or is_dicom_bytes(data):
        return _dicom_to_gray(data, name)
    return _pil_to_gray(_open_image(data, name), name)


def _open_image(data: bytes, name: str) -> Image.Image:
    """Open an image header without PIL's own bomb check, so no warning is ever emitted.

    ``Image.open`` warns (rather than raises) between ``Image.MAX_IMAGE_PIXELS`` and twice that; the only way
    to avoid the warning without touching global warning filters is to run the format factories ourselves and
    apply :data:`MAX_PIXELS` (lower than PIL's threshold) before anything is decoded. Falls back to
    ``Image.open`` if PIL's registry ever changes shape.
    """
    Image.init()
    registry: Any = getattr(Image, "OPEN", None)
    formats: Any = getattr(Image, "ID", None)
    if not isinstance(registry, dict) or not isinstance(formats, list):
        return Image.open(io.BytesIO(data))
    prefix, failures = data[:16], []
    for fmt in formats:
        factory, accept = registry[fmt]
        if accept is not None:
            verdict = accept(prefix)
            if isinstance(verdict, str) or not verdict:
                continue
        try:
            return factory(io.BytesIO(data), None)
        except Exception as exc:  # a malformed header of format `fmt`; another format may still match
            if accept is not None:  # its magic bytes matched: worth reporting
                failures.append(f"{fmt}: {exc}")
    if failures:
        raise ImageDecodeError(f"{name}: corrupt image header ({'; '.join(failures)})")
    raise ImageDecodeError(f"{name}: not a recognised image format (first bytes {data[:8]!r})")


def _check_pixels(name: str, pixels: int) -> None:
    if pixels > MAX_PIXELS:
        raise ImageDecodeError(f"{name}: image has {pixels} pixels, more than the limit of {MAX_PIXELS}")


def _pil_to_gray(im: Image.Image, name: str) -> np.ndarray:
    """PIL image (any mode) -> float32 gray; ``.load()`` here so truncation surfaces as our error."""
    _check_pixels(name, im.size[0] * im.size[1])
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG plus previews, frame 0 is the picture
        raise ImageDecodeError(f"{name}: multi-frame image ({frames} frames) is not supported")
    im.load()
    im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode in ("1", "L", "I", "F", "LA", "RGB", "RGBA") or mode.startswith("I;16"):
        arr = np.asarray(im)
    elif mode in ("La", "PA"):
        arr = np.asarray(im.convert("LA"))
    elif mode == "RGBa" or (mode == "P" and "transparency" in im.info):
        arr = np.asarray(im.convert("RGBA"))
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...: PIL knows how to reach RGB
        arr = np.asarray(im.convert("RGB"))
    return _array_to_gray(arr, name)


def _scale(arr: np.ndarray, name: str) -> np.ndarray:
    """Bring any numeric array into float32 [0, 1] following the module's documented bit-depth rules."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype.kind not in "uif":
        raise ImageDecodeError(f"{name}: unsupported pixel type {arr.dtype}")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError(f"{name}: pixel values contain NaN or infinity")
    lo, hi = float(values.min()), float(values.max())
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return values.astype(np.float32)
    if arr.dtype.kind in "ui" and lo >= 0 and hi <= 255:
        return (values / 255.0).astype(np.float32)
    if arr.dtype.kind in "ui" and lo >= 0 and hi <= 65535:
        return (values / 65535.0).astype(np.float32)
    return _minmax(values)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _array_to_gray(arr: np.ndarray, name: str) -> np.ndarray:
    """(H, W) or (H, W, C) with C in 1 (gray), 2 (gray+alpha), 3 (RGB), 4 (RGBA) -> float32 (H, W)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.size == 0 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (2, 3, 4))):
        raise ImageDecodeError(f"{name}: expected an (H, W) or (H, W, 1-4) image, got shape {arr.shape}")
    x = _scale(arr, name)
    if x.ndim == 2:
        return x
    color, alpha = (x[:, :, :-1], x[:, :, -1]) if x.shape[2] in (2, 4) else (x, None)
    gray = color[:, :, 0] if color.shape[2] == 1 else color @ _LUMA
    if alpha is not None:
        gray = gray * alpha  # composite on black
    return np.clip(gray, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ DICOM


def _dicom_to_gray(data: bytes, name: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageDecodeError(f"{name}: not a readable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{name}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; export one frame")
    _check_pixels(name, int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0))
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise ImageDecodeError(f"{name}: cannot decode DICOM pixel data with {what}: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _array_to_gray(apply_color_lut(arr, ds), name)
    if arr.ndim == 3:  # colour; pydicom already converted YBR to RGB
        bits = int(ds.get("BitsStored", 8) or 8)
        return _array_to_gray(arr.astype(np.float64) / float(2**bits - 1), name)
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    gray = _apply_voi(values, ds, name)
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    return gray.astype(np.float32)


def _first(value: Any) -> float:
    """DICOM multi-valued elements (several windows) -> the first, which is the default view."""
    if isinstance(value, str | bytes | int | float):
        return float(value)
    return float(next(iter(value)))


def _window(ds: Any, name: str) -> tuple[float, float] | None:
    """The first (centre, width) pair, or None when absent or unparsable (then the image is auto-windowed)."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (ValueError, TypeError, IndexError):
        logger.debug("%s: ignoring unparsable window %r / %r", name, ds.WindowCenter, ds.WindowWidth)
        return None


def _apply_voi(values: np.ndarray, ds: Any, name: str) -> np.ndarray:
    """VOI LUT, else window centre/width, else min-max: output in [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    if not np.isfinite(values).all():
        raise ImageDecodeError(f"{name}: DICOM pixel values contain NaN or infinity")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
        lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
        top = float(lut.max()) if lut.size else 0.0
        return np.clip(out / top, 0.0, 1.0) if top > 0 else _minmax(out).astype(np.float64)
    window = _window(ds, name)
    if window is not None:
        c, w = window
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function == "SIGMOID" and w > 0:
            return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -700.0, 700.0)))  # no exp overflow
        if function == "LINEAR_EXACT" and w > 0:
            return np.clip((values - c) / w + 0.5, 0.0, 1.0)
        if w >= 1:
            return np.clip((values - (c - 0.5)) / max(w - 1.0, 1e-12) + 0.5, 0.0, 1.0)
        logger.debug("%s: ignoring invalid window width %s", name, w)
    return _minmax(values).astype(np.float64)

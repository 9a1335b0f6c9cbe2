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

Decoding within a budget (hostile uploads, docs/security.md): every decoder checks, from the header and before it
allocates, the pixel count (:data:`MAX_PIXELS`), the working memory it will need (``DecodeLimits.max_decode_bytes``)
and the expansion over the file's size (``max_ratio``: a 43-byte GIF cannot hold a 7000 x 7000 picture; a
decompression bomb is refused, not decoded), and refuses pixel data that does not match its header (DICOM Rows x
Columns x SamplesPerPixel x BitsAllocated x frames). Images much larger than the model input (short side at least
8x the target) are decoded at reduced size where the format allows (JPEG draft mode, JPEG 2000 reduce-on-load, else
a box reduction in the integer domain before any float copy). Working memory of concurrent decodes in one process
is bounded by one shared byte budget (:func:`set_decode_budget`; a decode waits for room, and gives up with
:class:`DecodeBusy`). Paths are read only when they are regular files no larger than ``max_file_bytes``: a FIFO, a
device or a link loop is an error, never a hang.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "DecodeBusy",
    "DecodeLimits",
    "ImageDecodeError",
    "decode_image",
    "decode_limits",
    "is_dicom_bytes",
    "read_file",
    "read_grayscale",
    "set_decode_budget",
    "set_decode_limits",
    "to_model_input",
]

MAX_PIXELS: int = 50_000_000
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
# Bumped whenever decoding changes pixel values: it is part of every dataset cache key (lungxray.data).
DECODER_VERSION = "2"  # 2: images with a short side of 8x the target or more are decoded at reduced size
MB = 1024 * 1024
REDUCE_ABOVE = 8  # decode at reduced size when the short side is at least this many times the target size

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Source = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray


class ImageDecodeError(ValueError):
    """An input that is not a decodable single-frame image; the message is ``"<name>: <what is wrong>"``."""


class DecodeBusy(ImageDecodeError):
    """The process's shared decode budget stayed full for ``DecodeLimits.wait_s``: retry later (HTTP 503)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost; refused from the header before anything is allocated (docs/security.md)."""

    max_pixels: int = MAX_PIXELS
    max_decode_bytes: int = 512 * MB  # estimated working memory of one decode
    max_ratio: float = 400.0  # decoded bytes per byte of file, checked once the decoded size is over ratio_floor
    ratio_floor: int = 16 * MB
    max_file_bytes: int = 128 * MB  # largest file read from a path, and largest inflated DICOM data set
    budget_bytes: int = 768 * MB  # working memory of all decodes running at once in this process
    wait_s: float = 30.0  # how long a decode waits for room in the budget

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_decode_bytes", "max_ratio", "ratio_floor", "max_file_bytes", "budget_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"decode limits: {name} must be positive, got {getattr(self, name)}")
        if self.wait_s < 0:
            raise ValueError(f"decode limits: wait_s must be 0 or more, got {self.wait_s}")


class _Budget:
    """A byte semaphore: decodes reserve their estimated working memory and give it back when done."""

    def __init__(self) -> None:
        self.used = 0
        self.peak = 0
        self.cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, name: str) -> Iterator[None]:
        limits = _LIMITS
        if nbytes > limits.max_decode_bytes:
            raise ImageDecodeError(f"{name}: decoding needs about {nbytes / MB:.0f} MB, more than the limit of "
                                   f"{limits.max_decode_bytes / MB:.0f} MB per image")
        nbytes = min(nbytes, limits.budget_bytes)
        deadline = time.monotonic() + limits.wait_s
        with self.cond:
            while self.used + nbytes > limits.budget_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusy(f"{name}: the decoder is busy with other large images; retry shortly")
                self.cond.wait(left)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self.cond:
                self.used -= nbytes
                self.cond.notify_all()


_LIMITS = DecodeLimits()
_BUDGET = _Budget()


def decode_limits() -> DecodeLimits:
    return _LIMITS


def set_decode_limits(limits: DecodeLimits) -> DecodeLimits:
    """Replace the process-wide limits (the server sets its own); returns the previous ones."""
    global _LIMITS, MAX_PIXELS
    previous, _LIMITS = _LIMITS, limits
    MAX_PIXELS = limits.max_pixels
    return previous


def set_decode_budget(budget_bytes: int) -> DecodeLimits:
    """Bound the working memory of concurrent decodes in this process (e.g. the server's worker threads)."""
    import dataclasses

    return set_decode_limits(dataclasses.replace(_LIMITS, budget_bytes=budget_bytes))


def read_file(path: str | Path, name: str | None = None, limit: int | None = None) -> bytes:
    """The bytes of a regular file no larger than ``limit`` (default ``max_file_bytes``), else ImageDecodeError.

    Opened non-blocking and checked with fstat before reading, so a FIFO, a device (/dev/zero), a socket, a
    dangling link or a link loop is refused at once: never a hang, never a read until memory runs out.
    """
    label = name if name is not None else str(path)
    limit = _LIMITS.max_file_bytes if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"{label}: not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > limit:
            raise ImageDecodeError(f"{label}: file of {info.st_size / MB:.1f} MB is more than the limit of "
                                   f"{limit / MB:g} MB")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise ImageDecodeError(f"{label}: file is more than the limit of {limit / MB:g} MB")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "a special file")


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


def read_grayscale(source: Source, name: str | None = None, reduce_for: int | None = None) -> np.ndarray:
    """Decode ``source`` to a full-resolution float32 (H, W) array in [0, 1].

    ``source`` may be a path, the bytes of a file, a PIL image or an array ((H, W) or (H, W, 1|2|3|4)).
    ``name`` is used in error messages (default: the path, or a placeholder for in-memory input).
    Raises :class:`ImageDecodeError` for any input that cannot be decoded, and nothing else. With
    ``reduce_for=S`` an image whose short side is at least ``REDUCE_ABOVE * S`` is decoded at reduced size (never
    below ``REDUCE_ABOVE / 2 * S``), which is what :func:`decode_image` asks for.
    """
    label = name if name is not None else _default_name(source)
    try:
        gray = _read(source, label, reduce_for)
        if gray.ndim != 2 or gray.size == 0:
            raise ImageDecodeError(f"{label}: decoded to an empty or non-2-D image of shape {gray.shape}")
        return gray
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(f"{label}: out of memory while decoding") from exc
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
    return to_model_input(read_grayscale(source, name, reduce_for=size), size)


# --------------------------------------------------------------------------------------------------- sources


def _read(source: Source, name: str, reduce_for: int | None = None) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return _array_to_gray(source, name)
    if isinstance(source, Image.Image):
        return _pil_to_gray(source, name, reduce_for=reduce_for)
    if isinstance(source, str | Path):
        path = Path(source)
        data = read_file(path, name)
        force_dicom = path.suffix.lower() in DICOM_SUFFIXES
    elif isinstance(source, bytes | bytearray | memoryview):
        data, force_dicom = bytes(source), False
    else:
        raise ImageDecodeError(f"{name}: unsupported input type {type(source).__name__}")
    if not data:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    if force_dicom or is_dicom_bytes(data):
        return _dicom_to_gray(data, name)
    return _pil_to_gray(_open_image(data, name), name, len(data), reduce_for)


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
    limit = _LIMITS.max_pixels
    if pixels <= 0:
        raise ImageDecodeError(f"{name}: the header declares an empty image ({pixels} pixels)")
    if pixels > limit:
        raise ImageDecodeError(f"{name}: image has {pixels} pixels, more than the limit of {limit}")


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} bytes"


def _check_ratio(name: str, decoded: int, stored: int | None) -> None:
    """Refuse a decompression bomb: far more decoded bytes than any real picture packs into the file's size."""
    limits = _LIMITS
    if stored is None or decoded <= limits.ratio_floor or decoded <= limits.max_ratio * max(stored, 1):
        return
    raise ImageDecodeError(
        f"{name}: the header declares {_size(decoded)} of pixels in a file of {_size(stored)} (more "
        f"than the limit of {limits.max_ratio:g}x expansion): a decompression bomb or a truncated file")


_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def _reduction(width: int, height: int, reduce_for: int | None) -> int:
    """The integer factor a huge image is shrunk by before any float copy (1: decode as it is)."""
    if reduce_for is None or reduce_for <= 0 or min(width, height) < REDUCE_ABOVE * reduce_for:
        return 1
    return max(1, min(width, height) // (REDUCE_ABOVE // 2 * reduce_for))


_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F")  # modes Image.reduce takes (others are converted first)


def _pil_estimate(im: Image.Image, factor: int) -> int:
    """Upper bound of the working memory of decoding `im`: PIL's buffer, one converted copy (RGB(A) at 4 bytes a
    pixel for palette, bilevel, CMYK ...), and the numpy/float32 planes at the size they are computed at."""
    w, h = im.size
    pil = w * h * _PIL_BYTES.get(im.mode, 4)
    converted = pil if im.mode in _REDUCIBLE else w * h * 4
    return pil + converted + (w // factor) * (h // factor) * 40


def _pil_to_gray(im: Image.Image, name: str, stored: int | None = None, reduce_for: int | None = None
                 ) -> np.ndarray:
    """PIL image (any mode) -> float32 gray; ``.load()`` here so truncation surfaces as our error."""
    _check_pixels(name, im.size[0] * im.size[1])
    _check_ratio(name, im.size[0] * im.size[1] * len(im.getbands()) * (2 if im.mode.startswith("I;16") else 1)
                 * (4 if im.mode in ("I", "F") else 1), stored)
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG plus previews, frame 0 is the picture
        raise ImageDecodeError(f"{name}: multi-frame image ({frames} frames) is not supported")
    factor = _reduction(*im.size, reduce_for)
    if factor > 1:  # JPEG / JPEG 2000 decode smaller by themselves; im.size is then the size they decode at
        keep = REDUCE_ABOVE // 2 * (reduce_for or 1)
        _draft(im, keep, factor)
        factor = max(1, min(im.size) // keep)  # what is left to reduce after decoding
    with _BUDGET.reserve(_pil_estimate(im, factor), name):
        im.load()
        if factor > 1:
            im = _reduce(im, factor)
        im = ImageOps.exif_transpose(im) or im
        return _pil_pixels(im, name)


def _draft(im: Image.Image, keep: int, factor: int) -> None:
    """Configure reduced decoding before load: JPEG draft (DCT scaling), JPEG 2000 resolution levels."""
    if im.format in ("JPEG", "MPO") and im.mode in ("L", "RGB", "CMYK", "YCbCr"):
        w, h = im.size
        scale = max(1, min(w, h) // keep)
        im.draft(im.mode, (max(1, w // scale), max(1, h // scale)))  # PIL keeps at least the size asked for
    elif im.format == "JPEG2000":
        levels = max(0, min(5, factor.bit_length() - 1))
        im.reduce = levels  # type: ignore[assignment, method-assign]  # the plugin decodes 1 / 2**levels only


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """A box reduction of the decoded integer pixels, before any float copy."""
    if im.mode.startswith("I;16"):  # Pillow cannot reduce 16-bit modes; back to 16 bits keeps the scaling rule
        return im.convert("I").reduce(factor).convert("I;16")
    if im.mode not in _REDUCIBLE:
        im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("PA", "La", "RGBa") else "RGB")
    return im.reduce(factor)


def _pil_pixels(im: Image.Image, name: str) -> np.ndarray:
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
    ds, inflated = _read_dicom(data, name)
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{name}: DICOM file has no pixel data")
    frames = _int_element(ds, "NumberOfFrames", 1, name)
    if frames > 1:
        raise ImageDecodeError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; export one frame")
    rows, cols = _int_element(ds, "Rows", 0, name), _int_element(ds, "Columns", 0, name)
    samples, bits = _int_element(ds, "SamplesPerPixel", 1, name), _int_element(ds, "BitsAllocated", 16, name)
    _check_pixels(name, rows * cols)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise ImageDecodeError(f"{name}: DICOM SamplesPerPixel {samples} / BitsAllocated {bits} is not supported")
    expected = (rows * cols * samples * bits + 7) // 8
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    stored = len(ds.PixelData) if isinstance(ds.PixelData, bytes | bytearray) else 0
    if inflated is not None and inflated > expected + expected // 2 + MB:  # far more than its image needs
        raise ImageDecodeError(f"{name}: deflated DICOM data set inflates to {_size(inflated)}, but its image "
                               f"({rows} x {cols} x {samples} x {bits} bits) needs {_size(expected)}: a "
                               "decompression bomb")
    if syntax is not None and syntax.is_encapsulated:
        _check_ratio(name, expected, stored)
        _check_frame(ds.PixelData, name, rows, cols)
    elif not expected <= stored <= expected + 1:  # native: exactly what the header declares (plus a pad byte)
        raise ImageDecodeError(
            f"{name}: DICOM pixel data is {stored} bytes, but Rows x Columns x SamplesPerPixel x BitsAllocated "
            f"({rows} x {cols} x {samples} x {bits}) declares {expected}")
    with _BUDGET.reserve(rows * cols * (samples * 8 + 32), name):  # pixels, float64 LUT output, float32 result
        return _dicom_pixels(ds, name, (rows, cols) if samples == 1 else (rows, cols, samples))


def _check_frame(pixel_data: bytes, name: str, rows: int, cols: int) -> None:
    """A JPEG or JPEG 2000 frame must declare the image the DICOM header does, before it is decoded (its own
    header could otherwise claim a far larger picture than Rows x Columns)."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(pixel_data, number_of_frames=1))
    except Exception as exc:
        raise ImageDecodeError(f"{name}: corrupt encapsulated DICOM pixel data ({exc})") from exc
    if not frame.startswith((b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP")):
        return  # RLE and other codecs decode into an array of the header's shape
    try:
        size = _open_image(frame, name).size
    except ImageDecodeError:
        return  # a codec Pillow cannot read (lossless JPEG): the decoder's own error will say so
    if size != (cols, rows):
        raise ImageDecodeError(f"{name}: the compressed frame declares {size[0]} x {size[1]} pixels, the DICOM "
                               f"header {cols} x {rows}")


def _int_element(ds: Any, keyword: str, default: int, name: str) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: DICOM {keyword} {value!r} is not a number") from exc
    if number < 0:
        raise ImageDecodeError(f"{name}: DICOM {keyword} {number} is negative")
    return number


def _read_dicom(data: bytes, name: str) -> tuple[Any, int | None]:
    """dcmread, except that a deflated data set is inflated here, bounded, instead of all at once by pydicom;
    returns the data set and, when it was deflated, its inflated size."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    try:
        fp = io.BytesIO(data)
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data), force=True), None
        inflated = _inflate(data[fp.tell():], name)
        ds = pydicom.dcmread(io.BytesIO(inflated), force=True)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the inflated data set is plain explicit little endian
        ds.file_meta = meta
        return ds, len(inflated)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"{name}: not a readable DICOM file ({exc})") from exc


def _inflate(zipped: bytes, name: str) -> bytes:
    limits = _LIMITS
    limit = int(min(limits.max_file_bytes, max(limits.ratio_floor, limits.max_ratio * len(zipped))))
    with _BUDGET.reserve(limit, name):
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            out = inflater.decompress(zipped, limit + 1)
        except zlib.error as exc:
            raise ImageDecodeError(f"{name}: corrupt deflated DICOM data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ImageDecodeError(f"{name}: deflated DICOM data inflates to more than the limit of {_size(limit)} "
                               f"from {_size(len(zipped))}: a decompression bomb")
    return out


def _dicom_pixels(ds: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise ImageDecodeError(f"{name}: cannot decode DICOM pixel data with {what}: {exc}") from exc
    if arr.shape != shape:
        raise ImageDecodeError(f"{name}: DICOM pixel data decoded to shape {arr.shape}, the header declares {shape}")
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

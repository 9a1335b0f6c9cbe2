"""Cheap checks that an input can be a chest radiograph at all, before the model's answer is trusted.

Why: the network answers every input, and confidently so for inputs it has never seen (a uniform grey image gets
covid p = 1.000; a 16x16 DICOM thumbnail p = 0.9999). The feature-space score (`lungxray.sites.ood`) catches most of
those; these checks catch the obvious ones by construction, with a reason a person understands, and cost nothing
beside decoding. Each returns None or a short reason; a reason makes the prediction a referral.

Thresholds (fixed from what a chest film is, not fitted to any data): the shorter side at least
:data:`MIN_SIDE` pixels (below that nothing of the lungs survives; between it and the model's 256 px the
feature-space score judges), an aspect ratio at most :data:`MAX_ASPECT` (chest
films are 0.7-1.4), a 5-95% grey-level spread of at least :data:`MIN_SPREAD` levels of 255 at the model's input
size (films use most of the range), colour saturation below :data:`MAX_CHROMA` (X-rays are grey, even when stored
as RGB), and for DICOM a plain-radiograph `Modality` and, when given, a chest `BodyPartExamined`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIN_SIDE = 64
MAX_ASPECT = 2.0
MIN_SPREAD = 12.0
MAX_CHROMA = 24.0
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "PX"})
CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "TORSO", "BREAST", "RIB")  # BodyPartExamined values that are a chest


def _raw(source: Any) -> bytes | None:
    if isinstance(source, str | Path):
        with open(source, "rb") as fh:  # the decoder has already read it within its budget
            return fh.read()
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return None


def dicom_reason(data: bytes) -> str | None:
    """A DICOM header that says this is not a plain chest radiograph (CT, MR, an ultrasound, a knee...)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # the decoder accepted the file: a header quirk is no reason to refer
        return None
    modality = str(getattr(ds, "Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"DICOM Modality {modality} is not a plain radiograph (expected CR, DX or DR)"
    part = str(getattr(ds, "BodyPartExamined", "") or "").upper()
    if part and not any(word in part for word in CHEST_WORDS):
        return f"DICOM BodyPartExamined {part} is not the chest"
    try:  # the same header gives the geometry: parsed once
        return geometry_reason(int(ds.Columns), int(ds.Rows))
    except (AttributeError, TypeError, ValueError):
        return None


def geometry_reason(width: int, height: int) -> str | None:
    if min(width, height) < MIN_SIDE:
        return f"tiny image ({width}x{height} pixels; a chest film has at least {MIN_SIDE} a side)"
    aspect = max(width, height) / max(min(width, height), 1)
    if aspect > MAX_ASPECT:
        return f"aspect ratio {aspect:.1f}:1 (a chest film is close to square)"
    return None


def colour_reason(im: Image.Image) -> str | None:
    """Mean saturation (max - min of R, G, B) of a small copy: a photograph, a coloured chart or a map."""
    if im.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
        return None
    small = im.copy()
    small.draft("RGB", (128, 128))  # JPEG decodes at reduced size; a no-op elsewhere
    rgb = np.asarray(small.convert("RGB").resize((64, 64)), dtype=np.int16)
    chroma = float((rgb.max(-1) - rgb.min(-1)).mean())
    return f"colour image (mean saturation {chroma:.0f} of 255; radiographs are grey)" if chroma > MAX_CHROMA else None


def header_reason(source: Any) -> str | None:
    """Checks on what the file says about itself: DICOM tags, the original size and aspect, colour."""
    if isinstance(source, np.ndarray):
        return geometry_reason(source.shape[1], source.shape[0]) if source.ndim >= 2 else None
    if isinstance(source, Image.Image):
        return geometry_reason(*source.size) or colour_reason(source)
    data = _raw(source)
    if data is None:
        return None
    from lungxray.io.decode import is_dicom_bytes

    if is_dicom_bytes(data):
        return dicom_reason(data)
    try:
        im = Image.open(io.BytesIO(data))
        return geometry_reason(*im.size) or colour_reason(im)
    except Exception:  # decodable, but not by a plain open: nothing to say
        return None


def pixel_reason(image: np.ndarray) -> str | None:
    """A model input (uint8 (S, S)) with almost no grey-level spread: blank, a flat fill, a test card."""
    lo, hi = np.percentile(image, [5, 95])
    if hi - lo < MIN_SPREAD:
        return f"near-constant image (5-95% grey levels span {hi - lo:.0f} of 255)"
    return None


def input_reason(source: Any, image: np.ndarray) -> str | None:
    """The first reason, if any, why `source` (decoded to the model input `image`) is not a chest radiograph."""
    return pixel_reason(image) or header_reason(source)

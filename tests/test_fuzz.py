"""Property-based fuzzing of the whole input path: bytes -> decode -> preprocess -> (model), as predict runs it.

tests/test_imageio.py already fuzzes `decode_image` with random bytes and mutated PNG/JPEG. Here the target is
`Predictor.preprocess` / `Predictor.predict` under random input contracts (size, standardisation, border crop),
fed with mutations of every format of the bad-input corpus, and DICOM files built field by field from random
values or mutated byte by byte. The only exception any of them may raise is `ImageDecodeError`.

Short by default (derandomised, so CI is reproducible); LUNGXRAY_FUZZ_EXAMPLES=N raises the example count and
LUNGXRAY_FUZZ_RANDOM=1 draws new examples each run. bench/fuzz_decode.py runs the long version.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from test_robustness_input import corrupt_corpus, dicom_bytes, encode, gradient, readable_corpus

from lungxray.inference.bundle import Bundle
from lungxray.inference.predictor import Predictor
from lungxray.io.decode import ImageDecodeError
from lungxray.models.nets import build_model

# pydicom warns about every malformed element it reads or is given; the property is about exceptions
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = int(os.environ.get("LUNGXRAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("LUNGXRAY_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seeds() -> list[bytes]:
    from PIL import Image

    g = gradient(24, 32)
    extra = [encode(Image.fromarray(g), fmt) for fmt in ("BMP", "TIFF", "GIF", "WEBP")]
    extra.append(encode(Image.fromarray(g.astype(np.uint16) * 200), "TIFF"))
    extra.append(dicom_bytes(g.astype(np.uint16) * 16, "MONOCHROME1"))
    return [*readable_corpus().values(), *(c for c, _ in corrupt_corpus().values() if c), *extra]


SEEDS = _seeds()


def _predictor(size: int, standardize: str, crop: float) -> Predictor:
    """A real (untrained) bundle under the given input contract; preprocessing reads only the contract."""
    meta = {"classes": ["covid", "normal", "pneumonia"], "members": 2, "temperature": 1.0, "refer_threshold": 0.5,
            "input": {"size": size, "channels": 1, "mean": 0.5, "std": 0.25, "standardize": standardize,
                      "crop_border": crop}}
    return Predictor(Bundle(model=MODEL, meta=meta, path=Path(".")), torch.device("cpu"))


MODEL = build_model("compact_cnn", num_classes=3, members=2, width=4).eval()
contracts = st.tuples(st.sampled_from([32, 41]), st.sampled_from(["none", "equalize", "clahe"]),
                      st.sampled_from([0.0, 0.1, 0.35]))


def _check(predictor: Predictor, data: bytes, name: str = "fuzz") -> np.ndarray | None:
    """The property: a (size, size) uint8 image, or ImageDecodeError naming the input; nothing else."""
    try:
        out = predictor.preprocess(data, name=name)
    except ImageDecodeError as exc:
        assert str(exc).startswith(f"{name}: "), str(exc)
        return None
    size = predictor.meta["input"]["size"]
    assert out.shape == (size, size) and out.dtype == np.uint8
    return out


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A corpus file with overwritten, inserted or deleted bytes, spliced with another, and/or truncated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op, pos = draw(st.sampled_from(["set", "insert", "delete", "splice"])), draw(st.integers(0, 10**6))
        pos %= max(len(data), 1)
        if op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            other = draw(st.sampled_from(SEEDS))
            data[pos:] = other[pos % max(len(other), 1) :]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(mutated(), contracts)
def test_mutated_files_through_predictor_preprocess(data: bytes, contract: tuple[int, str, float]) -> None:
    _check(_predictor(*contract), data)


@FUZZ
@given(st.binary(max_size=2000), contracts)
def test_random_bytes_through_predictor_preprocess(data: bytes, contract: tuple[int, str, float]) -> None:
    _check(_predictor(*contract), data)


# ------------------------------------------------------------------------------------------------------ DICOM

_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
             RLELossless, JPEGBaseline8Bit]
_PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "", "GARBAGE"]
_NUMBERS = st.one_of(st.integers(-70000, 70000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([0, 1, -1, 1e30, "abc", "", "1\\2", "nan"]))


_FUZZ_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "Rows": st.integers(0, 70000), "Columns": st.integers(0, 70000), "BitsAllocated": st.sampled_from([1, 8, 32, 64]),
    "BitsStored": st.integers(0, 40), "HighBit": st.integers(0, 40), "PixelRepresentation": st.sampled_from([1, 2]),
    "SamplesPerPixel": st.sampled_from([0, 3, 4]), "PhotometricInterpretation": st.sampled_from(_PHOTOMETRIC),
    "NumberOfFrames": st.sampled_from([0, 2, "x"]), "PlanarConfiguration": st.sampled_from([0, 1, 7]),
    "RescaleSlope": _NUMBERS, "RescaleIntercept": _NUMBERS, "WindowCenter": _NUMBERS, "WindowWidth": _NUMBERS,
    "VOILUTFunction": st.sampled_from(["LINEAR_EXACT", "SIGMOID", "BOGUS"]),
    "TransferSyntaxUID": st.sampled_from(_SYNTAXES), "PixelData": st.binary(max_size=3000),
}


@st.composite
def dicom_files(draw: st.DrawFn) -> bytes:
    """A valid small DICOM image, then up to five of its image-describing elements set to drawn values."""
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    values: dict[str, Any] = {
        "Rows": rows, "Columns": cols, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
        "SamplesPerPixel": 1, "PhotometricInterpretation": draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
        "TransferSyntaxUID": draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])),
        "PixelData": draw(st.binary(min_size=2 * rows * cols, max_size=2 * rows * cols)),
    }
    for key in draw(st.sets(st.sampled_from(sorted(_FUZZ_VALUES)), max_size=5)):
        values[key] = draw(_FUZZ_VALUES[key])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = values.pop("TransferSyntaxUID")
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    pixels = values.pop("PixelData")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in values.items():
            with contextlib.suppress(ValueError, TypeError, OverflowError):  # refused by pydicom: element absent
                setattr(ds, key, value)
        if draw(st.booleans()):
            lut = DicomDataset()
            lut.LUTDescriptor = [draw(st.integers(0, 300)), draw(st.integers(-5, 5)), draw(st.sampled_from([8, 16]))]
            lut.LUTData = draw(st.lists(st.integers(0, 65535), max_size=40))
            ds.VOILUTSequence = [lut]
        ds.PixelData = encapsulate([pixels.ljust(2, b"\0")]) if meta.TransferSyntaxUID.is_compressed else pixels
        if meta.TransferSyntaxUID.is_compressed:
            ds["PixelData"].VR = "OB"
        buf = io.BytesIO()
        with contextlib.suppress(Exception):  # a combination pydicom will not write: fuzz the bytes it produced
            ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() or bytes(128) + b"DICM"


@FUZZ
@given(dicom_files(), contracts)
def test_structurally_random_dicom(data: bytes, contract: tuple[int, str, float]) -> None:
    _check(_predictor(*contract), data)


DICOM_SEEDS = [
    dicom_bytes(gradient(16, 24).astype(np.uint16) * 16, "MONOCHROME2"),
    dicom_bytes(gradient(16, 24).astype(np.uint16) * 16, "MONOCHROME1"),
]


@FUZZ
@given(st.sampled_from(DICOM_SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                                              max_size=10), st.one_of(st.none(), st.integers(0, 10**6)))
def test_byte_mutated_dicom_by_suffix(tmp_path_factory: pytest.TempPathFactory, seed: bytes,
                                      edits: list[tuple[int, int]], cut: int | None) -> None:
    """From a .dcm path (decoded as DICOM whatever the bytes) and from bytes (sniffed): either way, one error."""
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path_factory.getbasetemp() / "fuzz.dcm"
    path.write_bytes(bytes(data))
    predictor = _predictor(32, "none", 0.0)
    _check(predictor, bytes(data))
    try:
        predictor.preprocess(path)
    except ImageDecodeError as exc:
        assert str(exc).startswith(f"{path}: ")


def test_a_decoded_fuzz_survivor_predicts_finite_probabilities() -> None:
    """What survives decoding also survives the model: one pass over every seed under every contract."""
    for size in (32, 41):
        predictor = _predictor(size, "clahe", 0.1)
        images = [img for data in SEEDS if (img := _check(predictor, data)) is not None]
        pred = predictor.predict_images(np.stack(images))
        assert np.isfinite(pred.probs).all() and np.allclose(pred.probs.sum(1), 1.0, atol=1e-5)
        assert len(images) >= len(readable_corpus())

"""Hand-made inputs for the tests: DICOM and hostile PNG headers for the decoding, bad-input and server tests,
and a tiny learnable image tensor for the training-loop tests.

Kept in one place so that every test feeds the decoder the same well-formed DICOM and the same
decompression-bomb header, and every fit()-level test the same problem.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", with_pixels: bool = True,
                **extra: object) -> bytes:
    """A minimal uncompressed 16-bit (12 stored) DICOM Part 10 file; (F, H, W) pixels give F frames.

    ``extra`` sets further elements (RescaleSlope, WindowCenter, ...); ``with_pixels=False`` leaves out PixelData.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels.ndim == 3 and pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height 1-bit pixels (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def learnable_problem(n: int = 30, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, size, size) and labels (n,) of 3 classes, each class a bright vertical band."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, :, y * size // 3 : (y + 1) * size // 3] += 150
    return torch.as_tensor(images), torch.as_tensor(labels)

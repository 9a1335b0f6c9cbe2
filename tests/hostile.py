"""The hostile-input corpus of issue 18: small generated files that each reproduce one attack on the decoders.

Shared by the hostile test suites (tests/test_hostile_*.py) and bench/attack_serve.py, which posts the same cases
to a real server at full size. Every generator is cheap by default (a few KB, no large allocation), with a
`scale` where the real attack is bigger (the bench uses the full sizes of the issue's table).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

MB = 1024 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgba_claiming(width: int, height: int, rows: int = 4) -> bytes:
    """An RGBA PNG header of width x height whose data holds only `rows` rows (the bomb's header, not its body)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (rows * (1 + 4 * width)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_rgba_bomb(side: int = 7071) -> bytes:
    """A real, valid all-transparent RGBA PNG of side x side (the issue's 194 KB file: 200 MB of pixels)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 4 * side)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def gif_canvas(width: int = 7000, height: int = 7000) -> bytes:
    """A ~43-byte GIF declaring a width x height canvas with a 1x1 picture in it."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + image + b"\x3b"


def jpeg_claiming(width: int = 7000, height: int = 7000) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim width x height (a truncated scan)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def _dicom(rows: int, cols: int, pixel_bytes: bytes, syntax: str = ExplicitVRLittleEndian, bits: int = 8) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixel_bytes
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_mismatch(pixel_bytes: int = 3000) -> bytes:
    """Rows=1, Columns=3 with far more pixel data than that (the issue's 18 MB file, scaled)."""
    return _dicom(1, 3, b"\x80" * pixel_bytes)


def dicom_deflated_bomb(inflated: int = 4 * MB) -> bytes:
    """A deflated-transfer-syntax DICOM whose data set inflates to about `inflated` bytes (512 MB in the issue).

    The header declares a small 8 x 8 image; the bulk is a private element of zeros after the pixel data, so only
    inflating reveals the size. Streamed through the compressor: building it allocates no `inflated` bytes."""
    small = _dicom(8, 8, b"\x80" * 64, DeflatedExplicitVRLittleEndian)
    meta_end = _meta_end(small)
    body = zlib.decompress(small[meta_end:], -zlib.MAX_WBITS)
    pad = struct.pack("<HH", 0x7FE1, 0x0010) + b"OB\x00\x00" + struct.pack("<I", inflated)  # private element
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * MB
    parts = [compressor.compress(body + pad)]
    parts += [compressor.compress(chunk) for _ in range(inflated // MB)]
    parts += [compressor.compress(b"\x00" * (inflated % MB)), compressor.flush()]
    return small[:meta_end] + b"".join(parts)


def _meta_end(data: bytes) -> int:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return fp.tell()


def dicom_good(rows: int = 64, cols: int = 64) -> bytes:
    return _dicom(rows, cols, (np.arange(rows * cols) % 251).astype(np.uint8).tobytes())


def dicom_deflated_good(rows: int = 64, cols: int = 64) -> bytes:
    return _dicom(rows, cols, (np.arange(rows * cols) % 251).astype(np.uint8).tobytes(), DeflatedExplicitVRLittleEndian)


def good_png(size: int = 300) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    buf = io.BytesIO()
    Image.fromarray(((xx + yy) % 256).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def corpus(full: bool = False) -> dict[str, tuple[bytes, str]]:
    """{case: (bytes, file name)}: the decoder attacks of the issue; `full` builds them at the issue's sizes."""
    return {
        "deflated DICOM bomb": (dicom_deflated_bomb(512 * MB if full else 4 * MB), "bomb.dcm"),
        "DICOM Rows=1 Columns=3, much more pixel data": (dicom_mismatch(18 * MB if full else 3000), "rows.dcm"),
        "GIF with a 7000 x 7000 canvas": (gif_canvas(), "canvas.gif"),
        "RGBA PNG 7071 x 7071": (png_rgba_bomb() if full else png_rgba_claiming(7071, 7071), "rgba.png"),
        "JPEG claiming 7000 x 7000": (jpeg_claiming(), "claim.jpg"),
        "JPEG DICOM frame larger than its header": (dicom_jpeg(64, 64, 1024 if full else 128), "frame.dcm"),
    }


def dicom_jpeg(rows: int, cols: int, frame_side: int) -> bytes:
    """A JPEG Baseline DICOM whose header says rows x cols around a frame_side x frame_side JPEG frame."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    yy, xx = np.mgrid[0:frame_side, 0:frame_side]
    buf = io.BytesIO()
    Image.fromarray(((xx * 3 + yy) % 256).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return _dicom(rows, cols, encapsulate([buf.getvalue()]), JPEGBaseline8Bit)

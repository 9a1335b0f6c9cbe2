"""Issue 18, decoders: every hostile file of the corpus is refused from its header, in one line, cheaply; large
legitimate images decode at reduced size close to the full decode; the shared decode budget bounds concurrency;
only regular files are read."""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hostile
import numpy as np
import pytest
from PIL import Image

from lungxray.io.decode import (
    DecodeBusy,
    ImageDecodeError,
    decode_image,
    decode_limits,
    read_file,
    read_grayscale,
    set_decode_limits,
    to_model_input,
)
from lungxray.serve.app import decode_status

EXPECTED = {  # case -> (pattern of the one-line error, HTTP status the server maps it to)
    "deflated DICOM bomb": (r"inflates to .* a decompression bomb", 413),
    "DICOM Rows=1 Columns=3, much more pixel data": (r"pixel data is 3000 bytes, but Rows x Columns", 422),
    "GIF with a 7000 x 7000 canvas": (r"declares 46\.7 MB of pixels in a file of 35 bytes", 413),
    "RGBA PNG 7071 x 7071": (r"declares 190\.7 MB of pixels .* decompression bomb", 413),
    "JPEG claiming 7000 x 7000": (r"declares 46\.7 MB of pixels in a file of \d+ bytes", 413),
    "JPEG DICOM frame larger than its header": (r"the compressed frame declares 128 x 128 pixels", 422),
}


@pytest.fixture
def limits() -> Iterator[None]:
    previous = decode_limits()
    yield
    set_decode_limits(previous)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_corpus_is_refused_from_the_header(case: str) -> None:
    data, name = hostile.corpus()[case]
    pattern, status = EXPECTED[case]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=pattern) as info:
        decode_image(data, 256, name)
    assert time.perf_counter() - start < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 64 * 1024  # KB: no big allocation
    message = str(info.value)
    assert message.startswith(f"{name}: ") and "\n" not in message
    assert decode_status(info.value) == status


def test_deflated_dicom_decodes_and_its_inflation_is_bounded(limits: None) -> None:
    good = decode_image(hostile.dicom_deflated_good(), 32, "d.dcm")
    np.testing.assert_array_equal(good, decode_image(hostile.dicom_good(), 32, "e.dcm"))
    set_decode_limits(dataclasses.replace(decode_limits(), max_file_bytes=1024 * 1024))
    with pytest.raises(ImageDecodeError, match=r"inflates to more than the limit of 1\.0 MB .* decompression bomb"):
        decode_image(hostile.dicom_deflated_bomb(2 * 1024 * 1024), 32, "b.dcm")


def test_dicom_header_must_match_its_pixel_data() -> None:
    short = hostile._dicom(64, 64, b"\x80" * 100)
    with pytest.raises(ImageDecodeError, match=r"pixel data is 100 bytes, but .* declares 4096"):
        decode_image(short, 32, "short.dcm")
    with pytest.raises(ImageDecodeError, match=r"declares an empty image"):
        decode_image(hostile._dicom(0, 3, b""), 32, "empty.dcm")


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_decode_at_reduced_size_close_to_the_full_decode(fmt: str) -> None:
    yy, xx = np.mgrid[0:1024, 0:768]
    arr = (128 + 80 * np.sin(xx / 60.0) * np.cos(yy / 45.0)).astype(np.uint8)
    data = _encode(arr, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    reduced = decode_image(data, 64, "big")  # short side 768 >= 8 x 64: decoded at reduced size
    full = to_model_input(read_grayscale(data, "big"), 64)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 1.5
    small = decode_image(data, 256, "big")  # short side < 8 x 256: exactly the full decode, as before
    np.testing.assert_array_equal(small, to_model_input(read_grayscale(data, "big"), 256))


def test_one_image_over_the_per_image_limit_is_refused(limits: None) -> None:
    set_decode_limits(dataclasses.replace(decode_limits(), max_decode_bytes=1024 * 1024))
    with pytest.raises(ImageDecodeError, match=r"decoding needs about \d+ MB, more than the limit of 1 MB") as info:
        decode_image(hostile.good_png(600), 32, "p.png")
    assert decode_status(info.value) == 413


def test_the_shared_budget_makes_concurrent_decodes_wait_then_refuses(limits: None) -> None:
    from lungxray.io import decode as imageio

    set_decode_limits(dataclasses.replace(decode_limits(), budget_bytes=8 * 1024 * 1024, wait_s=0.2))
    data = hostile.good_png(300)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with imageio._BUDGET.reserve(8 * 1024 * 1024, "other"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    with pytest.raises(DecodeBusy, match=r"busy") as info:
        decode_image(data, 32, "late.png")
    assert decode_status(info.value) == 503
    release.set()
    thread.join()
    assert decode_image(data, 32, "late.png").shape == (32, 32)  # room again
    assert imageio._BUDGET.used == 0


def test_only_regular_files_are_read(tmp_path: Path, limits: None) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"pipe\.png: not a regular file \(a FIFO\)"):
        decode_image(fifo, 32)
    assert time.perf_counter() - start < 2.0  # no hang waiting for a writer
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(a character device\)"):
        read_file("/dev/zero")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageDecodeError, match=r"dangling\.png: cannot read file \(No such file"):
        decode_image(tmp_path / "dangling.png", 32)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(ImageDecodeError, match=r"loop\.png: cannot read file \(Too many levels of symbolic links"):
        decode_image(tmp_path / "loop.png", 32)
    big = tmp_path / "big.png"
    big.write_bytes(hostile.good_png(64) + b"\0" * 3000)
    set_decode_limits(dataclasses.replace(decode_limits(), max_file_bytes=2048))
    with pytest.raises(ImageDecodeError, match=r"big\.png: file of .* MB is more than the limit"):
        decode_image(big, 32)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_ratio must be positive"):
        dataclasses.replace(decode_limits(), max_ratio=0)


def test_a_compressed_dicom_frame_must_match_the_header() -> None:
    assert decode_image(hostile.dicom_jpeg(64, 64, 64), 32, "ok.dcm").shape == (32, 32)
    with pytest.raises(ImageDecodeError, match=r"the compressed frame declares 128 x 128 pixels, the DICOM header 64"):
        decode_image(hostile.dicom_jpeg(64, 64, 128), 32, "lie.dcm")


@pytest.mark.parametrize("mode", ["I;16", "P", "1", "LA"])
def test_reduced_decoding_keeps_every_mode_and_its_scaling(mode: str) -> None:
    yy, xx = np.mgrid[0:320, 0:300]
    base = Image.fromarray(((xx + yy) % 256).astype(np.uint8))
    if mode == "I;16":
        im = Image.fromarray(((xx + yy) * 50).astype(np.uint16))
    elif mode == "LA":
        im = Image.merge("LA", (base, Image.new("L", base.size, 255)))
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    reduced = decode_image(buf.getvalue(), 32, mode)  # short side 300 >= 8 x 32: decoded at reduced size
    full = to_model_input(read_grayscale(buf.getvalue(), mode), 32)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 3.0, mode

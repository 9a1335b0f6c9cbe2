"""lungxray.io.decode: every supported input decodes the documented way; every bad input gives ImageDecodeError."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from filegen import dicom_bytes, png_claiming
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from lungxray.io.decode import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    read_grayscale,
    to_model_input,
)

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # (32, 64), left dark -> right bright


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _dicom_file(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra: object) -> Path:
    path.write_bytes(dicom_bytes(pixels, photometric, **extra))
    return path


# ------------------------------------------------------------------------------------------------ modes


def test_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"} == IMAGE_SUFFIXES


def test_8bit_gray_png_is_scaled_by_255(tmp_path: Path) -> None:
    gray = read_grayscale(_save(Image.fromarray(RAMP), tmp_path / "a.png"))
    assert gray.dtype == np.float32 and gray.shape == (32, 64)
    np.testing.assert_allclose(gray, RAMP / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_colour_is_reduced_to_luma(tmp_path: Path, mode: str) -> None:
    rgb = Image.new("RGB", (8, 8), (200, 100, 50))
    img = rgb.convert("P") if mode == "P" else rgb
    assert img.mode == mode
    gray = read_grayscale(_save(img, tmp_path / "c.png"))
    expected = np.asarray(img.convert("RGB"), dtype=np.float32) @ [0.299, 0.587, 0.114] / 255
    np.testing.assert_allclose(gray, expected, atol=1e-5)


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, 0
    rgba[0, :, 3] = 255  # first row opaque white, the rest transparent white
    gray = read_grayscale(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    np.testing.assert_allclose(gray[0], 1.0)
    np.testing.assert_allclose(gray[1:], 0.0)
    la = read_grayscale(Image.fromarray(rgba[..., [0, 3]], "LA"))
    np.testing.assert_allclose(la, gray)


def test_16bit_png_is_scaled_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    gray = read_grayscale(_save(img, tmp_path / "deep.png"))
    np.testing.assert_allclose(gray, values / 65535.0, atol=1e-6)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    white = read_grayscale(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "w.jpg"))
    black = read_grayscale(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), tmp_path / "k.jpg"))
    assert white.min() > 0.95 and black.max() < 0.05


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :20] = 255  # left half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    gray = read_grayscale(_save(Image.fromarray(arr), tmp_path / "r.jpg", exif=exif.tobytes(), quality=95))
    assert gray.shape == (40, 20)
    assert gray[:18].mean() > 0.9 and gray[22:].mean() < 0.1  # the left half is now on top


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff"])
def test_bmp_and_tiff(tmp_path: Path, suffix: str) -> None:
    gray = read_grayscale(_save(Image.fromarray(RAMP), tmp_path / f"a{suffix}"))
    np.testing.assert_allclose(gray, RAMP / 255.0, atol=1e-6)


def test_multipage_tiff_is_refused_and_1bit_is_read(tmp_path: Path) -> None:
    pages = [Image.fromarray(RAMP), Image.fromarray(RAMP[::-1])]
    path = _save(pages[0], tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageDecodeError, match=r"pages\.tif: multi-frame image \(2 frames\)"):
        read_grayscale(path)
    bilevel = read_grayscale(_save(Image.fromarray(RAMP > 127), tmp_path / "bw.png"))
    np.testing.assert_array_equal(bilevel, (RAMP > 127).astype(np.float32))


def test_32bit_int_and_float_modes() -> None:
    as_int = read_grayscale(Image.fromarray(np.array([[0, 30000, 65535]], dtype=np.int32)))
    np.testing.assert_allclose(as_int, [[0, 30000 / 65535, 1]], atol=1e-6)
    as_float = read_grayscale(Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)))
    np.testing.assert_allclose(as_float, [[0.0, 0.25, 1.0]])
    wide = read_grayscale(Image.fromarray(np.array([[-5.0, 0.0, 5.0]], dtype=np.float32)))
    np.testing.assert_allclose(wide, [[0.0, 0.5, 1.0]])


# ------------------------------------------------------------------------------------------------ DICOM


def test_dicom_monochrome1_is_monochrome2_inverted(tmp_path: Path) -> None:
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))
    mono2 = read_grayscale(_dicom_file(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    mono1 = read_grayscale(_dicom_file(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    assert mono2.shape == (8, 64)
    assert mono2[0, 0] == 0.0 and mono2[0, -1] == 1.0  # no window: min-max
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_rescale_and_window_are_honoured(tmp_path: Path) -> None:
    pixels = np.tile(np.arange(0, 1001, 10, dtype=np.uint16), (4, 1))  # stored 0..1000
    # modality values -1000..1000; the window covers exactly that range, so the output is a 0..1 ramp
    path = _dicom_file(tmp_path / "w.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0,
                       WindowWidth=2000)
    gray = read_grayscale(path)
    np.testing.assert_allclose(gray[0], pixels[0] / 1000.0, atol=2e-3)
    narrow = read_grayscale(_dicom_file(tmp_path / "n.dcm", pixels, WindowCenter=250, WindowWidth=100))
    assert narrow[0, 0] == 0.0 and narrow[0, -1] == 1.0 and 0.4 < narrow[0, 25] < 0.6  # stored 250 -> mid


def test_dicom_without_suffix_is_detected_by_magic(tmp_path: Path) -> None:
    path = _dicom_file(tmp_path / "IM0001.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    renamed = path.rename(tmp_path / "IM0001")
    assert read_grayscale(renamed).shape == (4, 4)
    assert read_grayscale(renamed.read_bytes()).shape == (4, 4)


def test_multiframe_dicom_is_refused(tmp_path: Path) -> None:
    path = _dicom_file(tmp_path / "cine.dcm", np.zeros((3, 4, 4), np.uint16))
    with pytest.raises(ImageDecodeError, match=r"cine\.dcm: multi-frame DICOM \(3 frames\)"):
        read_grayscale(path)


def test_undecodable_transfer_syntax_is_refused(tmp_path: Path) -> None:
    path = _dicom_file(tmp_path / "ls.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match=r"ls\.dcm: cannot decode DICOM pixel data with transfer syntax"):
        read_grayscale(path)


# ------------------------------------------------------------------------------------ in-memory inputs


def test_bytes_pil_and_array_inputs_agree(tmp_path: Path) -> None:
    img = Image.fromarray(RAMP)
    from_path = read_grayscale(_save(img, tmp_path / "a.png"))
    np.testing.assert_array_equal(read_grayscale(_png_bytes(img)), from_path)
    np.testing.assert_array_equal(read_grayscale(img), from_path)
    np.testing.assert_array_equal(read_grayscale(RAMP), from_path)
    np.testing.assert_allclose(read_grayscale(RAMP.astype(np.uint16) * 257), from_path, atol=1e-6)
    np.testing.assert_allclose(read_grayscale(np.stack([RAMP] * 3, axis=-1)), from_path, atol=1e-5)


def test_to_model_input_stretches_and_quantises() -> None:
    gray = np.linspace(0, 1, 300 * 500, dtype=np.float32).reshape(300, 500)
    out = to_model_input(gray, size=64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out[0, 0] < 5 and out[-1, -1] > 250
    stripes = np.zeros((512, 512), np.float32)
    stripes[:, ::2] = 1.0  # one-pixel stripes must average to grey, not alias to black/white
    assert np.abs(to_model_input(stripes, 64)[:, 1:-1].astype(int) - 128).max() <= 2  # edges: border effect
    with pytest.raises(ValueError):
        to_model_input(np.zeros((3, 3, 3)))


def test_decode_image_is_read_then_resize(tmp_path: Path) -> None:
    path = _save(Image.fromarray(RAMP), tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(path, 32), to_model_input(read_grayscale(path), 32))


# ------------------------------------------------------------------------------------------ bad inputs


def _bad_files(tmp_path: Path) -> dict[str, bytes]:
    jpeg = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    return {
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.png": b"this is not an image\n",
        "random.jpg": np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "bomb.png": png_claiming(20000, 20000),
        "over_limit.png": png_claiming(8000, 8000),  # 64 M pixels: below PIL's limit, above ours
        "fake.dcm": b"\x00" * 200,
    }


@pytest.mark.parametrize("name", list(_bad_files(Path())))
def test_bad_files_raise_decode_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_bad_files(tmp_path)[name])
    with pytest.raises(ImageDecodeError, match=f"^{re.escape(str(path))}: ") as info:
        read_grayscale(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ImageDecodeError, match=f"^upload/{re.escape(name)}: "):
        decode_image(path.read_bytes(), name=f"upload/{name}")


def test_bomb_is_refused_from_the_header_without_warnings() -> None:
    assert MAX_PIXELS < 10000 * 10000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for side in (8000, 10000, 20000):  # below, inside and above PIL's warning band
            with pytest.raises(ImageDecodeError, match="more than the limit"):
                read_grayscale(png_claiming(side, side))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_missing_file_and_wrong_types() -> None:
    with pytest.raises(ImageDecodeError, match=r"nope\.png: cannot read file"):
        read_grayscale("nope.png")
    with pytest.raises(ImageDecodeError, match="unsupported input type"):
        read_grayscale(12345)  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="NaN"):
        read_grayscale(np.array([[0.0, np.nan]]))
    with pytest.raises(ImageDecodeError, match="shape"):
        read_grayscale(np.zeros((2, 2, 7)))


_VALID = [
    _png_bytes(Image.fromarray(RAMP)),
    _png_bytes(Image.fromarray(np.dstack([RAMP, RAMP[::-1], RAMP]), "RGB")),
    _jpeg_bytes(Image.fromarray(RAMP)),
]


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        out = decode_image(data, size=16, name="fuzz")
    except ImageDecodeError:
        return
    assert out.shape == (16, 16) and out.dtype == np.uint8


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(_VALID))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_images_only_raise_decode_error(which: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(_VALID[which])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        out = decode_image(bytes(data), size=16, name="fuzz")
    except ImageDecodeError:
        return
    assert out.shape == (16, 16) and out.dtype == np.uint8

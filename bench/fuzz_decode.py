"""A long fuzz run of the input path predict and serve use: bytes -> decode_image -> prepare (Predictor.preprocess).

The property is the one tests/test_fuzz.py checks briefly: any input yields a (size, size) uint8 image or an
`ImageDecodeError` that names it; nothing else, no hang, no runaway memory. This runs it for a wall-clock budget
with a random mutational fuzzer over the bad-input corpus of tests/test_robustness_input.py (PNG 8/16-bit, RGBA,
palette, CMYK and EXIF JPEG, DICOM MONOCHROME1/2, BMP, TIFF, GIF, WebP and the corrupt files), plus DICOM files
whose image elements are rewritten with hostile values. Any other exception, and any input slower than --slow
seconds, is saved under --out with its traceback, so it can be replayed with `decode_image(path.read_bytes())`.

    .venv/bin/python bench/fuzz_decode.py --seconds 600 --seed 1 --out /tmp/fuzz-findings
    .venv/bin/python bench/fuzz_decode.py --hypothesis 5000     # the property tests, 5000 random examples each

Prints executions, executions per second, the outcome counts (error messages grouped by kind) and the slowest
input. Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus lives with the tests that define its expected outcomes

HOSTILE = [0, 1, -1, 2**15, 2**16 - 1, 2**31 - 1, -(2**31), 1e30, -1e30, float("nan"), float("inf"), "x", "", "1\\2"]
FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
          "PhotometricInterpretation", "NumberOfFrames", "PlanarConfiguration", "RescaleSlope", "RescaleIntercept",
          "WindowCenter", "WindowWidth", "VOILUTFunction"]
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "BOGUS"]


def corpus() -> list[bytes]:
    from PIL import Image
    from test_robustness_input import corrupt_corpus, dicom_bytes, encode, gradient, readable_corpus

    g = gradient(24, 32)
    extra = [encode(Image.fromarray(g), fmt) for fmt in ("BMP", "TIFF", "GIF", "WEBP")]
    extra.append(dicom_bytes(np.tile(np.arange(32, dtype=np.uint16) * 128, (24, 1))))
    return [*readable_corpus().values(), *(c for c, _ in corrupt_corpus().values() if c), *extra]


def mutate(data: bytes, seeds: list[bytes], rng: np.random.Generator) -> bytes:
    """1-8 of: overwrite, flip a bit, insert, delete, duplicate a block, splice another seed; then maybe truncate."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, max(len(buf), 1)))
        op = rng.integers(0, 6)
        if op == 0 and buf:
            buf[pos] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))]))
        elif op == 1 and buf:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        elif op == 3:
            del buf[pos : pos + int(rng.integers(1, 256))]
        elif op == 4:
            buf[pos:pos] = buf[pos : pos + int(rng.integers(1, 512))]
        else:
            other = seeds[int(rng.integers(len(seeds)))]
            buf[pos:] = other[pos % max(len(other), 1) :]
    if rng.random() < 0.3:
        buf = buf[: int(rng.integers(0, len(buf) + 1))]
    return bytes(buf)


def hostile_dicom(rng: np.random.Generator) -> bytes:
    """A valid DICOM image with 1-4 image-describing elements set to hostile values."""
    import pydicom
    from test_robustness_input import dicom_bytes

    rows, cols = int(rng.integers(1, 48)), int(rng.integers(1, 48))
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(rng.integers(0, 4096, (rows, cols)).astype(np.uint16))))
    for field in rng.choice(FIELDS, size=int(rng.integers(1, 5)), replace=False):
        value = PHOTOMETRIC[int(rng.integers(len(PHOTOMETRIC)))] if field == "PhotometricInterpretation" else (
            HOSTILE[int(rng.integers(len(HOSTILE)))])
        try:
            setattr(ds, str(field), value)
        except (ValueError, TypeError, OverflowError):
            continue
    out = io.BytesIO()
    with contextlib.suppress(Exception):  # an unwritable combination: use whatever was written
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue() or b"\0" * 128 + b"DICM"


def run(seconds: float, seed: int, out: Path, slow: float) -> int:
    import torch

    from lungxray.inference.bundle import Bundle
    from lungxray.inference.predictor import Predictor
    from lungxray.io.decode import ImageDecodeError
    from lungxray.models.nets import build_model

    model = build_model("compact_cnn", num_classes=3, members=1, width=4).eval()
    predictors = [
        Predictor(Bundle(model, {"classes": ["a", "b", "c"], "members": 1, "input": {
            "size": size, "mean": 0.5, "std": 0.25, "standardize": std, "crop_border": crop}}, Path(".")),
            torch.device("cpu"))
        for size, std, crop in ((64, "none", 0.0), (33, "clahe", 0.1), (256, "equalize", 0.3))
    ]
    seeds, rng = corpus(), np.random.default_rng(seed)
    outcomes: Counter[str] = Counter()
    findings, execs, slowest = 0, 0, (0.0, b"")
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        r = rng.random()
        data = hostile_dicom(rng) if r < 0.25 else (
            rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes() if r < 0.35
            else mutate(seeds[int(rng.integers(len(seeds)))], seeds, rng))
        predictor = predictors[int(rng.integers(len(predictors)))]
        t0 = time.perf_counter()
        try:
            image = predictor.preprocess(data, name="fuzz")
            size = predictor.meta["input"]["size"]
            if image.shape != (size, size) or image.dtype != np.uint8:
                raise AssertionError(f"bad output {image.shape} {image.dtype}")
            outcomes["decoded"] += 1
        except ImageDecodeError as exc:
            message = str(exc)
            if not message.startswith("fuzz: "):
                findings += _save(out, data, f"error does not name the input: {message}")
            outcomes[re.sub(r"\d+", "N", message[6:]).split("(")[0].strip()[:48]] += 1
        except Exception:  # the finding this tool exists for
            findings += _save(out, data, traceback.format_exc())
            outcomes["OTHER EXCEPTION"] += 1
        took = time.perf_counter() - t0
        if took > slow:
            findings += _save(out, data, f"took {took:.1f} s")
        slowest = max(slowest, (took, data[:16]))
        execs += 1
    wall = time.monotonic() - started
    print(f"{execs} executions in {wall:.0f} s ({execs / wall:.0f}/s), {findings} finding(s) saved under {out}")
    print(f"slowest input: {slowest[0] * 1000:.0f} ms (starts {slowest[1]!r})")
    print(f"max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for what, n in outcomes.most_common():
        print(f"  {n:7d}  {what}")
    return 1 if findings else 0


def _save(out: Path, data: bytes, why: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    name = f"finding-{len(list(out.glob('finding-*.bin'))):04d}"
    (out / f"{name}.bin").write_bytes(data)
    (out / f"{name}.txt").write_text(why)
    print(f"FOUND {name}: {why.strip().splitlines()[-1]}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings are saved")
    parser.add_argument("--slow", type=float, default=5.0, help="save inputs slower than this many seconds")
    parser.add_argument("--hypothesis", type=int, metavar="N", help="run tests/test_fuzz.py with N random examples")
    args = parser.parse_args()
    if args.hypothesis:
        import pytest

        os.environ.update(LUNGXRAY_FUZZ_EXAMPLES=str(args.hypothesis), LUNGXRAY_FUZZ_RANDOM="1")
        return int(pytest.main([str(ROOT / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider"]))
    warnings.simplefilter("ignore")  # pydicom warns on every malformed element; exceptions are what count
    import torch

    torch.set_num_threads(1)
    return run(args.seconds, args.seed, args.out, args.slow)


if __name__ == "__main__":
    sys.exit(main())

"""Bad input, by name: every odd or broken file has a defined outcome, and every user error is one line.

The corpus is generated here (nothing downloaded). Outcomes:
- readable oddities (16-bit, RGBA, palette PNG; CMYK and EXIF-rotated JPEG; DICOM MONOCHROME1/2) are used;
- unreadable files (0 bytes, truncated, text named .png, decompression bomb, ...) are skipped in training and
  listed by name with the reason in the log, metrics.json and the report; `predict` gives them a row with an
  `error` and goes on, and exits non-zero only when nothing could be predicted;
- `.DS_Store` / `Thumbs.db` are ignored silently; a symlink loop and an empty class folder are listed as skipped;
  a folder name that maps to no class is a class of its own when training (other datasets have other classes),
  is skipped and listed when scoring a model that lacks it, and is an error when only test/ has it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from filegen import dicom_bytes, png_claiming
from PIL import Image

from lungxray.cli import main
from lungxray.io.dataset import load_dataset

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = {"data.image_size": 32, "train.epochs": 1, "train.batch_size": 16, "train.threads": 1}

# ------------------------------------------------------------------------------------------------ the corpus


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """Dark left, bright right: orientation survives every conversion."""
    return np.tile(np.linspace(10, 245, w), (h, 1)).astype(np.uint8)


def readable_corpus() -> dict[str, bytes]:
    """Unusual but valid files: each must be decoded and used."""
    g = gradient()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    return {
        "sixteen_bit.png": encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG"),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.png": encode(Image.fromarray(np.dstack([g, g, g])).convert("P"), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(np.dstack([g, g, g])).convert("CMYK"), "JPEG"),
        "exif_rotated.jpg": encode(Image.fromarray(g), "JPEG", exif=exif.tobytes(), quality=95),
        "mono1.dcm": dicom_bytes(g.astype(np.uint16) * 16, "MONOCHROME1"),
        "mono2.dcm": dicom_bytes(g.astype(np.uint16) * 16, "MONOCHROME2"),
    }


def corrupt_corpus() -> dict[str, tuple[bytes, str]]:
    """Ten unreadable files of different kinds -> (content, what the message must say)."""
    g = gradient()
    jpeg, png = encode(Image.fromarray(g), "JPEG"), encode(Image.fromarray(g), "PNG")
    frames = [Image.fromarray(g), Image.fromarray(255 - g)]
    return {
        "empty.png": (b"", "file is empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "text.png": (b"this is a text file, not an image\n", "not a recognised image format"),
        "bomb.png": (png_claiming(20000, 20000), "more than the limit"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "header_only.png": (png[:33], "corrupt image header"),
        "random.jpg": (np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "not a recognised"),
        "no_pixels.dcm": (dicom_bytes(g.astype(np.uint16), with_pixels=False), "no pixel data"),
        "multipage.tif": (encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "multi-frame"),
        "html.jpg": (b"<html><body>404 not found</body></html>", "not a recognised image format"),
    }


def spread(root: Path, files: dict[str, bytes], folders: list[str]) -> dict[str, str]:
    """Write files round-robin into class folders; returns {name: path relative to root}."""
    rels = {}
    for i, (name, data) in enumerate(files.items()):
        rel = f"{folders[i % len(folders)]}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        rels[name] = rel
    return rels


def _good(root: Path, folder: str, n: int, seed: int) -> None:
    from conftest import synthetic_xray

    rng = np.random.default_rng(seed)
    label = {"Covid": 0, "Normal": 1, "Viral Pneumonia": 2}.get(Path(folder).name, 1)
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_xray(label, rng, 48)).save(root / folder / f"good_{i}.png")


def _says(text: str, where: str, what: str) -> bool:
    """`text` is "<where>: <...what...>" (case-insensitive what: file names may contain the word too)."""
    assert text.startswith(f"{where}: "), (where, text)
    assert what.lower() in text[len(where) + 2 :].lower(), (what, text)
    return True


# --------------------------------------------------------------------------------------- dataset loading

CLASS_DIRS = ["train/Covid", "train/Normal", "train/Viral Pneumonia"]


def test_each_kind_of_file_has_its_defined_outcome(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    for i, folder in enumerate(CLASS_DIRS):
        _good(root, folder, 3, i)
    readable = spread(root, readable_corpus(), CLASS_DIRS)
    corrupt = {n: c for n, (c, _) in corrupt_corpus().items()}
    broken = spread(root, corrupt, CLASS_DIRS)
    for folder in CLASS_DIRS:
        (root / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
        (root / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(100))
    (root / "train" / "Bacterial").mkdir()  # an empty class folder
    os.symlink("..", root / "train" / "Normal" / "loop")  # train/Normal/loop -> train/ (a cycle)
    os.symlink("self.png", root / "train" / "Normal" / "self.png")  # a file link to itself
    caplog.set_level(logging.WARNING, logger="lungxray")

    ds = load_dataset(root, size=32)
    assert ds.classes == ["covid", "normal", "pneumonia"]  # the empty folder makes no class
    assert set(readable.values()) <= set(ds.paths), "every readable oddity is used"
    assert len(ds) == 9 + len(readable)
    skipped = {s.path: s.reason for s in ds.skipped}
    for name, (_, message) in corrupt_corpus().items():
        assert message.lower() in skipped[broken[name]].lower()  # the path is the entry's own field
        assert broken[name] in caplog.text  # the log names it
    assert "symlink loop" in skipped["train/Normal/loop"]
    assert "Too many levels of symbolic links" in skipped["train/Normal/self.png"]
    assert skipped["train/Bacterial"] == "empty folder"
    assert not any(n in p for p in [*skipped, *ds.paths] for n in (".DS_Store", "Thumbs.db"))  # ignored quietly
    assert len(skipped) == len(corrupt) + 3

    image = {p: ds.images[i].astype(int) for i, p in enumerate(ds.paths)}
    mono1, mono2 = image[readable["mono1.dcm"]], image[readable["mono2.dcm"]]
    assert np.abs(mono1 + mono2 - 255).max() <= 1  # MONOCHROME1 is shown inverted, as a viewer would
    assert mono2[:, :8].mean() < 60 < 190 < mono2[:, -8:].mean()
    rotated = image[readable["exif_rotated.jpg"]]  # dark left edge is at the top once EXIF is applied
    assert rotated[:8].mean() < 60 < 190 < rotated[-8:].mean()
    assert abs(rotated[:, :8].mean() - rotated[:, -8:].mean()) < 20
    for name in ("sixteen_bit.png", "rgba.png", "palette.png", "cmyk.jpg"):  # palette: dithered to 256 colours
        np.testing.assert_allclose(image[readable[name]], mono2, atol=16, err_msg=name)


def test_a_folder_that_maps_to_no_known_class_is_a_class_when_training(tmp_path: Path) -> None:
    for i, folder in enumerate([*CLASS_DIRS, "train/Tuberculosis"]):
        _good(tmp_path, folder, 2, i)
    assert load_dataset(tmp_path, size=32).classes == ["covid", "normal", "pneumonia", "tuberculosis"]


# ------------------------------------------------------- training with ten corrupt files mixed in (fast version)


@pytest.fixture(scope="module")
def corrupt_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, dict[str, str], str]:
    """The tiny dataset plus the ten corrupt files in its class folders (train and test), trained for one epoch."""
    from lungxray.training.pipeline import train_run

    base = tmp_path_factory.mktemp("corrupt")
    data = base / "data"
    shutil.copytree(tiny_dataset, data)
    folders = [str(p.relative_to(data)) for p in sorted(data.glob("*/*")) if p.is_dir()]
    rels = spread(data, {n: c for n, (c, _) in corrupt_corpus().items()}, folders)
    handler = _ListHandler()
    logging.getLogger("lungxray").addHandler(handler)
    try:
        train_run(SMOKE, data, base / "run", overrides=FAST)
    finally:
        logging.getLogger("lungxray").removeHandler(handler)
    return base / "run", rels, "\n".join(handler.lines)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_training_skips_exactly_the_corrupt_files_and_reports_them(corrupt_run: tuple[Path, dict, str]) -> None:
    run_dir, rels, log_text = corrupt_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    skipped = {s["path"]: s["reason"] for s in metrics["data"]["skipped"]}
    assert set(skipped) == set(rels.values()), "exactly the ten corrupt files, no more, no fewer"
    assert metrics["data"]["pool"] == 54 and metrics["data"]["test"] == 18  # every good image used
    report = (run_dir / "report.md").read_text()
    for name, rel in rels.items():
        assert f"`{rel}`: {skipped[rel]}" in report, name
        assert corrupt_corpus()[name][1].lower() in skipped[rel].lower()
        assert rel in log_text, f"{rel} not named in the log"


# ------------------------------------------------------------------------------------------------ predict


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_writes_an_error_row_per_unreadable_file_and_goes_on(
    corrupt_run: tuple[Path, dict, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = corrupt_run[0]
    folder = tmp_path / "inbox"
    readable = spread(folder, readable_corpus(), ["a", "b"])
    broken = spread(folder, {n: c for n, (c, _) in corrupt_corpus().items()}, ["a", "b"])
    (folder / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    os.symlink("..", folder / "a" / "loop")
    missing = tmp_path / "gone.png"
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), str(folder), str(missing), "--csv", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in _read_csv(out)}
    assert set(rows) == {*readable, *broken, "gone.png"}  # junk and the loop are not images; no row
    for name in readable:
        assert rows[name]["error"] == "" and rows[name]["label"] in ("covid", "normal", "pneumonia"), name
    for name, (_, message) in corrupt_corpus().items():
        assert _says(rows[name]["error"], str(folder / broken[name]), message)
        assert rows[name]["label"] == "", name
    assert rows["gone.png"]["error"].startswith(f"{missing}: cannot read file")
    assert "Traceback" not in capsys.readouterr().err

    only_bad = tmp_path / "bad"
    spread(only_bad, {n: c for n, (c, _) in corrupt_corpus().items()}, ["x"])
    assert main(["predict", str(run_dir), str(only_bad), "--csv", str(tmp_path / "bad.csv")]) == 1
    assert all(r["error"] for r in _read_csv(tmp_path / "bad.csv"))


def test_evaluate_lists_folders_of_classes_the_model_lacks(corrupt_run: tuple[Path, dict, str], tmp_path: Path) -> None:
    data = tmp_path / "other"
    _good(data, "Covid", 3, 0)
    _good(data, "Normal", 3, 1)
    _good(data, "Tuberculosis", 2, 2)
    assert main(["evaluate", str(corrupt_run[0]), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["images"] == 6
    skipped = {s["path"]: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"Tuberculosis/good_0.png", "Tuberculosis/good_1.png"}
    assert all("maps to no class of the model" in r for r in skipped.values())
    assert "Tuberculosis/good_0.png" in (tmp_path / "ev" / "evaluation.md").read_text()


# ------------------------------------------------------------------------------------- one-line user errors


def _bundle_with(run_dir: Path, tmp: Path, change: Callable[[Path], None]) -> Path:
    copy = tmp / "bundle"
    shutil.copytree(run_dir, copy)
    change(copy)
    return copy


def _set_meta(key: str, value: object) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({**meta, key: value}))

    return change


CONFIG_CASES = {
    "unknown key in the file": ("train:\n  epoch: 3\n", [],
                                r"unknown config key train\.epoch \(did you mean train\.epochs\? known: "),
    "unknown key on the command line": ("", ["--set", "train.epohcs=3"], r"unknown config key train\.epohcs"),
    "wrong type on the command line": ("", ["--set", "train.epochs=three"], r"train\.epochs: expected an integer"),
    "wrong type in the file": ("train:\n  lr: fast\n", [], r"train\.lr: expected a number, got 'fast'"),
    "a section that is a value": ("train: 5\n", [], r"train: expected a mapping"),
    "invalid value": ("train:\n  optimizer: adagrad\n", [], r"train\.optimizer: 'adagrad' is not one of adam"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors_are_one_line(case: str, tmp_path: Path, tiny_dataset: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    text, extra, pattern = CONFIG_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text("name: x\n" + text)
    argv = ["train", "--config", str(config), "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), *extra]
    _assert_one_line_error(main(argv), capsys, "train", pattern)


def _assert_one_line_error(rc: int, capsys: pytest.CaptureFixture[str], command: str, pattern: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lungxray {command}: error: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_data_errors_are_one_line(tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def train(data: Path, *extra: str) -> int:
        return main(["train", "--config", str(SMOKE), "--data", str(data), "--out", str(tmp_path / "r"), *extra])

    _assert_one_line_error(train(tmp_path / "nowhere"), capsys, "train", r"data folder not found: .*nowhere")
    _assert_one_line_error(main(["train", "--config", str(tmp_path / "none.yaml")]), capsys, "train",
                           r"config file not found: .*none\.yaml")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(train(tmp_path / "empty"), capsys, "train", r"no images found in class sub-folders")
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    _good(data, "test/Tuberculosis", 2, 0)  # test/ has a class that train/ lacks
    _assert_one_line_error(train(data, "--set", "data.image_size=32"), capsys, "train",
                           r"test/ has images of class\(es\) tuberculosis that the training split lacks")


def test_bundle_errors_are_one_line(corrupt_run: tuple[Path, dict, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, image = corrupt_run[0], tmp_path / "x.png"
    image.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    cases = [
        (_set_meta("format_version", 99), r"has bundle format version 99, this lungxray reads version 1"),
        (lambda d: (d / "meta.json").write_text("{not json"), r"meta\.json is not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), r"has no model\.safetensors"),
        (lambda d: (d / "meta.json").unlink(), r"is not a lungxray model folder"),
    ]
    for i, (change, pattern) in enumerate(cases):
        bundle = _bundle_with(run_dir, tmp_path / str(i), change)
        _assert_one_line_error(main(["predict", str(bundle), str(image)]), capsys, "predict", pattern)
        _assert_one_line_error(main(["evaluate", str(bundle), "--data", str(tmp_path)]), capsys, "evaluate", pattern)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    _assert_one_line_error(main(["evaluate", str(run_dir), "--data", str(not_a_folder)]), capsys, "evaluate",
                           r"(data folder not found|not a folder): .*file\.txt")


def test_a_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ntrain:\n  epochs: [1, 2]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "lungxray", "train", "--config", str(config), "--data", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["lungxray train: error: train.epochs: expected an integer, got [1, 2]"]

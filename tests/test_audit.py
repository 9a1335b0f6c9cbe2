"""lungxray.evaluation.audit: the probes flag classes that differ only outside the lungs (a border marker, the file
format), stay at chance when the same files are shuffled into random class folders, and the CLI's JSON and errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungxray.cli import main
from lungxray.evaluation.audit import AuditResult, audit, file_facts, wilson

CLASSES = ("alpha", "beta", "gamma")
PER_CLASS = 20
FOLDS = 3  # 3 folds instead of the default 5 keep every audit here to a few seconds


def _film(rng: np.random.Generator, side: int = 64) -> np.ndarray:
    """A random smooth grey film (random exposure, a low-frequency field, noise) drawn from the same distribution
    for every class: no class signal in it, and no two films near duplicates of each other."""
    coarse = rng.normal(0, 40, (8, 8)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC))
    img = rng.uniform(90, 130) + field + rng.normal(0, 6, (side, side))
    return np.clip(img, 0, 255).astype(np.uint8)


def _marked(label: int, rng: np.random.Generator) -> np.ndarray:
    """Classes 0 and 1 carry a bright tag in a corner (top-left, top-right), like a hospital's burned-in marker;
    class 2 none. Nothing else differs."""
    img = _film(rng)
    if label < 2:
        x = 2 if label == 0 else 64 - 8
        img[2:8, x:x + 6] = 255
    return img


def _write(root: Path, make: object, formats: tuple[str, ...] = (".png",)) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            img = make(label, rng)  # type: ignore[operator]
            ext = formats[label % len(formats)]
            Image.fromarray(img).save(folder / f"{i:03d}{ext}", **({"quality": 95} if ext == ".jpg" else {}))
    return root


def _shuffled(src: Path, dst: Path, seed: int = 1) -> Path:
    """The same files placed into random class folders (class sizes kept): labels that carry no signal."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    labels = np.random.default_rng(seed).permutation([p.parent.name for p in files])
    for i, (path, label) in enumerate(zip(files, labels, strict=True)):
        (dst / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / label / f"{i:03d}{path.suffix}")
    return dst


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("marked"), _marked)


@pytest.fixture(scope="module")
def cli_audit(marked: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """`lungxray audit --json --out` on the marked folder, run once: (the printed object, the output folder)."""
    out = tmp_path_factory.mktemp("audit-out")
    buf = io.StringIO()  # capsys is per test; this fixture is shared by the module
    with contextlib.redirect_stdout(buf):
        code = main(["audit", "--data", str(marked), "--json", "--out", str(out), "--folds", str(FOLDS)])
    assert code == 0
    return json.loads(buf.getvalue()), out  # the whole of stdout is one JSON object


def _probe(result: dict | AuditResult, name: str) -> dict:
    probes = result["probes"] if isinstance(result, dict) else result.to_dict()["probes"]
    return next(p for p in probes if p["name"] == name)


def test_wilson_interval_matches_known_values() -> None:
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(317, 317)[1] == 1.0


def test_a_border_marker_is_flagged(cli_audit: tuple[dict, Path]) -> None:
    result, _ = cli_audit
    border = _probe(result, "border_only")
    assert border["signal"] and border["accuracy"] >= 0.9 and border["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert result["verdict"].startswith("shortcut risk: the classes can be told apart from")
    assert "borders alone" in result["verdict"]


def test_cli_json_shape_and_report(cli_audit: tuple[dict, Path]) -> None:
    result, out = cli_audit
    assert [p["name"] for p in result["probes"]] == ["border_only", "thumbnail", "histogram", "file_facts"]
    for p in result["probes"]:
        assert {"name", "accuracy", "chance", "low", "high", "n", "signal"} <= p.keys()
        assert p["low"] <= p["accuracy"] <= p["high"] and p["n"] == 3 * PER_CLASS
    assert {"verdict", "duplicates", "class_stats"} <= result.keys()
    assert result["class_stats"]["alpha"]["count"] == PER_CLASS
    assert result["class_stats"]["alpha"]["width"]["median"] == 64
    assert {"counts", "pairs_total", "across_classes", "pairs"} <= result["duplicates"].keys()
    report = (out / "audit.md").read_text()
    assert result["verdict"] in report and result["report"] == str(out / "audit.md")
    assert json.loads((out / "audit.json").read_text())["probes"] == result["probes"]
    for figure in ("mean_images.png", "histograms.png", "probes.png"):
        assert (out / "figures" / figure).stat().st_size > 1000 and f"figures/{figure}" in report


def test_the_file_format_alone_is_flagged(tmp_path: Path) -> None:
    """Same pixel distribution, class 'alpha' saved as PNG, the others as JPEG: only the file says which."""
    root = _write(tmp_path / "formats", lambda label, rng: _film(rng), formats=(".png", ".jpg"))
    result = audit(root, folds=FOLDS)
    facts = _probe(result, "file_facts")
    assert facts["signal"] and facts["accuracy"] >= 0.6, facts
    assert result.class_stats["alpha"]["formats"] == {"PNG": PER_CLASS}
    assert result.class_stats["beta"]["formats"] == {"JPEG": PER_CLASS}


def test_shuffled_labels_stay_at_chance(marked: Path, tmp_path: Path) -> None:
    """The marked files in random class folders (plus one exact copy across classes): no probe flags signal, every
    accuracy is within 0.15 of chance (2.5 binomial standard errors at n=61; an interval may miss chance by a
    little, since out-of-fold predictions are not independent), and so is each probe's own model forced in every
    fold, within 0.2."""
    root = _shuffled(marked, tmp_path / "shuffled")
    shutil.copyfile(root / "alpha" / sorted(os.listdir(root / "alpha"))[0], root / "beta" / "copy.png")
    result = audit(root, folds=FOLDS)
    for p in result.probes:
        assert not p.signal and abs(p.accuracy - p.chance) <= 0.15, p
        assert abs(p.model_accuracy - p.chance) <= 0.2, p
    assert result.verdict.startswith("no shortcut signal found")
    copies = [d for d in result.duplicates["pairs"] if d["kind"] == "exact"]
    assert [(d["label_a"], d["label_b"]) for d in copies] == [("alpha", "beta")]
    assert result.duplicates["across_classes"] >= 1


def test_one_class_folder_is_refused_with_one_line(marked: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    one = tmp_path / "one"
    shutil.copytree(marked / "alpha", one / "alpha")
    assert main(["audit", "--data", str(one)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lungxray audit: error:") and "only one class" in err[-1] and str(one) in err[-1]


def test_empty_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--data", str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_file_facts_read_dicom_tags(tmp_path: Path) -> None:
    from filegen import dicom_bytes

    path = tmp_path / "film.dcm"
    path.write_bytes(dicom_bytes(np.full((20, 30), 500, np.uint16), Manufacturer="Acme Imaging"))
    facts = file_facts(path)
    assert facts["dicom_manufacturer"] == "Acme Imaging" and facts["dicom_modality"] == "DX"
    assert (facts["width"], facts["height"], facts["bits"], facts["format"]) == (30, 20, 12, "DICOM")


def test_border_only_never_sees_the_centre() -> None:
    """A marker inside the blanked centre changes the thumbnail but not one border_only feature."""
    from lungxray.evaluation.audit import image_features

    rng = np.random.default_rng(0)
    films = np.stack([_film(rng, 256) for _ in range(4)])
    marked = films.copy()
    marked[:, 100:150, 100:150] = 255
    plain, centre = image_features(films), image_features(marked)
    assert np.array_equal(plain["border_only"], centre["border_only"])
    assert not np.array_equal(plain["thumbnail"], centre["thumbnail"])
    assert plain["border_only"].shape == (4, 32 * 32 - 22 * 22)  # a 5-cell band (15% of 32) on every edge

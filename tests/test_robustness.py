"""Tests for lungxray.robustness (the shift benchmark) and for scoring external, multi-source folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import synthetic_xray
from PIL import Image

from lungxray.cli import main
from lungxray.evaluation.robustness import QUICK, SHIFTS, apply_shift, run_benchmark, tta_logits, tta_views
from lungxray.training.pipeline import evaluate_run


@pytest.fixture(scope="module")
def xrays() -> np.ndarray:
    """Smoothed synthetic X-rays: pixel differences then grow with a rotation's angle as they should."""
    rng = np.random.default_rng(0)
    images = np.stack([synthetic_xray(i % 3, rng, 64) for i in range(6)]).astype(float)
    return np.round(ndi.gaussian_filter(images, (0, 1.5, 1.5))).astype(np.uint8)


def test_every_shift_is_deterministic_graded_and_keeps_the_format(xrays: np.ndarray) -> None:
    for name, shift in SHIFTS.items():
        levels = range(1, len(shift.severities) + 1)
        outs = [apply_shift(xrays, name, level, seed=1) for level in levels]
        for out in outs:
            assert out.dtype == np.uint8 and out.shape == xrays.shape, name
        assert np.array_equal(outs[0], apply_shift(xrays, name, 1, seed=1)), name
        change = [np.abs(o.astype(float) - xrays).mean() for o in outs]
        assert change[-1] > 0, name  # (level 1 may be invisible at 64 pixels: blur scales with the size)
        assert change[-1] >= max(change) - 1e-9, f"{name}: the top severity is not the strongest ({change})"


def test_shifts_by_hand() -> None:
    flat = np.full((1, 64, 64), 64, np.uint8)
    np.testing.assert_array_equal(apply_shift(flat, "invert", 1), 255 - flat)
    gamma = SHIFTS["gamma_dark"].severities[1]
    assert apply_shift(flat, "gamma_dark", 2)[0, 0, 0] == round(255 * (64 / 255) ** gamma)
    bordered = apply_shift(np.full((1, 100, 100), 128, np.uint8), "border", 5)  # 15% frame, black or white
    assert set(np.unique(bordered[0, :15])) <= {0, 255} and (bordered[0, 20:80, 20:80] == 128).all()
    texted = apply_shift(flat, "text", 5)
    assert (texted != 64).sum() > 100  # markers were burned in
    assert (texted[0, 24:40, 24:40] == 64).all()  # near the edges, not over the chest


def test_bad_requests_are_one_line_errors(xrays: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        apply_shift(xrays, "fog", 1)
    with pytest.raises(ValueError, match=r"severities 1\.\.5"):
        apply_shift(xrays, "blur", 6)
    with pytest.raises(ValueError, match="uint8 images"):
        apply_shift(xrays.astype(np.float32), "blur", 1)


def test_quick_benchmark_agrees_with_the_run(trained_run: Path, tiny_dataset: Path) -> None:
    """Clean scores reproduce metrics.json's test figures; every quick cell is there and in range."""
    result = run_benchmark(trained_run, tiny_dataset, quick=True)
    test = json.loads((trained_run / "metrics.json").read_text())["test"]["metrics"]
    assert result["images"] == test["n"] == 18
    assert result["clean"]["accuracy"] == pytest.approx(test["accuracy"])
    assert result["clean"]["macro_f1"] == pytest.approx(test["macro_f1"])
    assert len(result["cells"]) == sum(len(v) for v in QUICK.values())
    s = result["summary"]
    assert set(s["per_shift"]) == set(QUICK) and set(s["held_out_shifts"]) == {"border", "text", "invert"}
    assert 0 <= s["mean_macro_f1"] <= 1 and 0 <= s["held_out_macro_f1"] <= 1
    means = [np.mean([c["macro_f1"] for c in result["cells"] if c["shift"] == n]) for n in QUICK]
    assert s["mean_macro_f1"] == pytest.approx(np.mean(means))
    assert all(0 <= c["flip_rate"] <= 1 for c in result["cells"])
    sal = result["saliency"]
    assert 0 <= sal["central_mass"] <= 1 and 0 <= sal["corner_mass"] <= 1
    assert sal["uniform_central"] == pytest.approx((1 - 2 * 10 / 64) ** 2)  # a 10-pixel band of 64


def test_validation_split_and_tta(trained_run: Path, tiny_dataset: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    result = run_benchmark(trained_run, tiny_dataset, split="validation", shifts=["invert"], saliency=False)
    assert result["images"] == metrics["data"]["holdout"] > 0
    assert result["clean"]["accuracy"] == pytest.approx(metrics["validation"]["metrics"]["accuracy"])
    from lungxray.inference.predictor import Predictor

    predictor = Predictor.load(trained_run)
    images = np.stack([synthetic_xray(0, np.random.default_rng(i), 64) for i in range(3)])
    assert len(tta_views(images)) == 4 and all(v.shape == images.shape for v in tta_views(images))
    assert tta_logits(predictor, images, predictor.meta["input"]).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="split must be"):
        run_benchmark(trained_run, tiny_dataset, split="train")


def test_validation_of_bootstrap_members_is_out_of_bag(trained_ensemble: Path, tiny_dataset: Path) -> None:
    """Each image scored only by the members that never trained on it: the run's own out-of-bag figures."""
    metrics = json.loads((trained_ensemble / "metrics.json").read_text())
    assert metrics["validation_kind"] == "out-of-bag"
    result = run_benchmark(trained_ensemble, tiny_dataset, split="validation", shifts=["blur"], saliency=False)
    assert result["out_of_bag"] and result["images"] == metrics["validation"]["metrics"]["n"]
    assert result["clean"]["accuracy"] == pytest.approx(metrics["validation"]["metrics"]["accuracy"])
    levels = run_benchmark(trained_ensemble, tiny_dataset, split="validation", shifts=["blur", "invert"],
                           saliency=False, levels=[1, 5])
    assert [(c["shift"], c["level"]) for c in levels["cells"]] == [("blur", 1), ("blur", 5), ("invert", 1)]
    assert levels["levels"] == [1, 5]
    with pytest.raises(ValueError, match=r"levels must lie in 1\.\.5"):
        run_benchmark(trained_ensemble, tiny_dataset, shifts=["blur"], saliency=False, levels=[0])
    tta = run_benchmark(trained_ensemble, tiny_dataset, split="validation", shifts=["blur"], saliency=False, tta=True)
    assert tta["images"] == result["images"]


def test_cli_writes_files_and_one_report_section(trained_run: Path, tiny_dataset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: p.stat().st_mtime for p in run.rglob("*")}
    assert main(["robustness", str(run), "--data", str(tiny_dataset), "--quick", "--no-saliency"]) == 0
    out = capsys.readouterr().out
    assert "| gamma_dark |" in out and "mean under shift" in out
    assert "nothing written (read-only" in out and {p.name: p.stat().st_mtime for p in run.rglob("*")} == before
    assert main(["robustness", str(run), "--data", str(tiny_dataset), "--quick", "--no-saliency", "--into-report"]) == 2
    assert "quick mode's numbers are meaningless" in capsys.readouterr().err
    assert main(["robustness", str(run), "--data", str(tiny_dataset), "--shift", "gamma_dark", "--levels", "1",
                 "--no-saliency", "--out", str(tmp_path / "rb")]) == 0
    assert f"to {tmp_path / 'rb'}" in capsys.readouterr().out
    for name in ("robustness.json", "robustness.md", "robustness.png"):
        assert (tmp_path / "rb" / name).is_file(), name
    assert "gamma_dark" not in (run / "report.md").read_text()  # --out alone leaves the bundle alone
    assert main(["robustness", str(run), "--data", str(tiny_dataset), "--shift", "gamma_dark", "--no-saliency",
                 "--into-report"]) == 0
    for name in ("robustness.json", "robustness.md", "robustness.png"):
        assert (run / "robustness" / name).is_file(), name
    assert "| gamma_dark |" in (run / "report.md").read_text()
    # A second benchmark replaces the report's section instead of appending another.
    assert main(["robustness", str(run), "--data", str(tiny_dataset), "--shift", "invert", "--no-saliency",
                 "--into-report"]) == 0
    report = (run / "report.md").read_text()
    assert report.count("## Robustness to source shift") == 1 and "robustness/robustness.png" in report
    assert "| invert |" in report and "| gamma_dark |" not in report
    assert main(["robustness", str(tmp_path / "nothing"), "--data", str(tiny_dataset)]) == 2
    assert "error:" in capsys.readouterr().err


def _write_external(root: Path) -> dict[str, int]:
    """Two hospitals, no train/test levels, different formats, sizes, modes and folder spellings."""
    rng = np.random.default_rng(5)
    counts = {}
    layouts = {
        "hospital_a": [("Covid", ".png", "L", (64, 64)), ("NORMAL", ".jpg", "RGB", (80, 100)),
                       ("Viral Pneumonia", ".bmp", "L", (120, 90))],
        "hospital_b": [("COVID-19", ".tif", "I;16", (70, 70)), ("normal", ".png", "RGBA", (64, 64)),
                       ("PNEUMONIA", ".jpeg", "L", (96, 96)), ("Tuberculosis", ".png", "L", (64, 64))],
    }
    for source, folders in layouts.items():
        counts[source] = 0
        for folder, ext, mode, (w, h) in folders:
            d = root / source / folder
            d.mkdir(parents=True)
            label = {"covid": 0, "normal": 1, "pneumonia": 2}.get(folder.lower().split("-")[0].split()[-1], 0)
            for i in range(3):
                img = Image.fromarray(synthetic_xray(label, rng, 96)).resize((w, h))
                if mode == "I;16":
                    img = Image.fromarray((np.asarray(img, np.uint16) * 257).astype(np.uint16))
                elif mode != "L":
                    img = img.convert(mode)
                img.save(d / f"{folder}_{i}{ext}")
            counts[source] += 3 if folder != "Tuberculosis" else 0
    return counts


def test_external_multi_source_folder_is_scored_per_source(trained_run: Path, tmp_path: Path) -> None:
    counts = _write_external(tmp_path / "external")
    result = evaluate_run(trained_run, tmp_path / "external", tmp_path / "eval")
    assert result["images"] == sum(counts.values()) == 18
    assert set(result["sources"]) == set(counts)
    for source, n in counts.items():
        assert result["sources"][source]["metrics"]["n"] == n
    assert sum(s["path"].startswith("hospital_b/Tuberculosis") for s in result["skipped"]) == 3
    assert "Source `hospital_a`" in (tmp_path / "eval" / "evaluation.md").read_text()


def test_sources_without_a_test_split_are_still_scored(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """One source with train/ and test/, one with class folders only: its images count, the train/ ones not."""
    root = tmp_path / "mixed"
    shutil.copytree(tiny_dataset, root / "kaggle")
    counts = _write_external(tmp_path / "other")
    shutil.copytree(tmp_path / "other" / "hospital_a", root / "hospital_a")
    result = evaluate_run(trained_run, root, tmp_path / "eval")
    assert result["sources"]["kaggle"]["metrics"]["n"] == 18  # its test/ split only
    assert result["sources"]["hospital_a"]["metrics"]["n"] == counts["hospital_a"]
    assert result["images"] == 18 + counts["hospital_a"]


def chest_phantom(size: int = 128) -> np.ndarray:
    """Bright body, two dark lungs, a black film border and a white corner marker."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 200.0)
    for cx in (0.33, 0.67):
        img[((xx - cx) / 0.13) ** 2 + ((yy - 0.48) / 0.25) ** 2 < 1] = 60
    img += np.random.default_rng(0).normal(0, 4, img.shape)
    img[:, :6] = img[:, -6:] = 0
    img[10:20, 10:18] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def test_lung_field_crop_keeps_the_lungs_and_drops_the_edges() -> None:
    from lungxray.transforms.preprocess import crop_border, crop_lungs, lung_field_box, prepare

    img = chest_phantom()
    top, bottom, left, right = lung_field_box(img)
    lungs = img < 100
    lungs[:, :6] = lungs[:, -6:] = False
    ys, xs = np.nonzero(lungs)
    assert top <= ys.min() and bottom > ys.max() and left <= xs.min() and right > xs.max()
    assert top >= 20 and left >= 6 and right <= 122  # the corner marker (rows 10-19) and the border are outside
    cropped = crop_lungs(img)
    assert cropped.shape == img.shape and cropped.dtype == np.uint8
    assert (cropped < 100).mean() > (img < 100).mean()  # the lungs fill more of the frame
    flat = np.full((128, 128), 120, np.uint8)
    assert lung_field_box(flat) is None
    np.testing.assert_array_equal(crop_lungs(flat), crop_border(flat, 0.08))
    both = prepare(np.stack([img, flat]), "lungs+clahe")
    assert both.shape == (2, 128, 128)
    np.testing.assert_array_equal(both[0], prepare(cropped, "clahe"))
    with pytest.raises(ValueError, match="unknown standardisation"):
        prepare(img, "lungs+gamma")


def test_shift_compare_script_prints_both_runs(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """bench/shift_compare.py (the README's before/after table) on two real benchmark results."""
    files = []
    for name, tta in (("before", False), ("after", True)):
        result = run_benchmark(trained_run, tiny_dataset, shifts=["blur", "invert"], saliency=False, tta=tta)
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    script = Path(__file__).parents[1] / "bench" / "shift_compare.py"
    out = subprocess.run([sys.executable, str(script), *map(str, files)], capture_output=True, text=True, check=True)
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert rows["blur"].count("→") == 6 and rows["invert"].count("–") == 4  # 5 severities + mean; invert has one
    before, after = (json.loads(f.read_text())["summary"]["mean_macro_f1"] for f in files)
    assert f"**{before:.3f}** | **{after:.3f}**" in rows["**mean under shift (macro F1)**"]

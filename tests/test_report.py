"""The run report and terminal summary a newcomer reads first: figures labelled, copies of training images
reported *and* scored without, intervals that are not degenerate, absent classes and empty figures said."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import SMOKE_OVERRIDES, write_dataset
from PIL import Image

from lungxray.cli import summary
from lungxray.evaluation.report import FIGURE_LABELS_KEY, figure_labels, subplots

CONFIG = Path(__file__).parents[1] / "configs/smoke.yaml"


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run whose test split holds 3 exact copies of training images (2 covid, 1 normal)."""
    from lungxray.training.pipeline import train_run

    data = write_dataset(tmp_path_factory.mktemp("leaky"), {"train": 14, "test": 6}, seed=3)
    for folder, name in (("Covid", "train_001.png"), ("Covid", "train_002.png"), ("Normal", "train_004.png")):
        shutil.copy(data / "train" / folder / name, data / "test" / folder / f"copy_{name}")
    out = tmp_path_factory.mktemp("runs") / "leaky"
    train_run(CONFIG, data, out, overrides=SMOKE_OVERRIDES)
    return out


def test_test_scores_are_also_given_without_the_copies(leaky_run: Path) -> None:
    metrics = json.loads((leaky_run / "metrics.json").read_text())
    without = metrics["test_without_duplicates"]
    assert without["excluded"] == 3 and without["exact"] == 3
    assert without["excluded_per_class"] == {"covid": 2, "normal": 1, "pneumonia": 0}
    assert without["scores"]["metrics"]["n"] == metrics["test"]["metrics"]["n"] - 3 == 18
    text = summary(metrics, leaky_run)
    assert "without the 3 test images (3 exact, 0 near copies; covid 2, normal 1)" in text
    acc_line = next(line for line in text.splitlines() if line.startswith("test accuracy"))
    assert re.search(r"\(\d+/21 correct\)\s+\| .*\(\d+/18 correct\)", acc_line), acc_line  # side by side, with counts
    report = (leaky_run / "report.md").read_text()
    assert "| metric | value (95% CI) | without copies in training |" in report
    assert "{'exact" not in report and "3 exact and 0 near-copy pairs across splits" in report  # no raw dict
    assert "Wilson score for proportions" in report


def test_recall_of_a_perfect_class_has_a_real_interval(leaky_run: Path) -> None:
    metrics = json.loads((leaky_run / "metrics.json").read_text())
    for c, pc in metrics["test"]["metrics"]["per_class"].items():
        iv = metrics["test"]["intervals"][f"recall_{c}"]
        if pc["recall"] == 1.0:
            assert iv["low"] < 0.9, (c, iv)  # Wilson at 7/7 is 64.6-100, never "100.0% (100.0%-100.0%)"


def _figures(report: Path) -> list[Path]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text())
    return [report.parent / n for n in names]


def check_figure(path: Path) -> list[str]:
    """Problems with one saved figure: no metadata, a panel without title, a plot panel without axis labels."""
    text = Image.open(path).text  # type: ignore[attr-defined]
    if FIGURE_LABELS_KEY not in text:
        return [f"{path.name}: no panel labels in its metadata"]
    panels = json.loads(text[FIGURE_LABELS_KEY])
    problems = [] if panels else [f"{path.name}: no panel shows anything"]
    for i, ax in enumerate(panels):
        if ax["twin"]:  # the second y axis of a panel: its own label, the title is the panel's
            problems += [] if ax["ylabel"] else [f"{path.name} panel {i}: twin axis without a label"]
            continue
        if not ax["title"]:
            problems.append(f"{path.name} panel {i}: no title")
        if not ax["image"] and not (ax["xlabel"] and ax["ylabel"]):
            problems.append(f"{path.name} panel {i}: missing axis label ({ax})")
    return problems


def test_every_figure_of_the_report_has_titles_and_axis_labels(leaky_run: Path) -> None:
    figures = _figures(leaky_run / "report.md")
    assert {f.name for f in figures} >= {"learning_curves.png", "confusion_test.png", "reliability_test.png",
                                         "gradcam_test.png"}
    problems = [p for f in figures for p in check_figure(f)]
    assert problems == []
    gallery = json.loads(Image.open(leaky_run / "figures/gradcam_test.png").text[FIGURE_LABELS_KEY])
    titles = [ax["title"] for ax in gallery]
    assert all(re.search(r"\.(png|jpg)", t) for t in titles), titles  # each overlay named by its file
    wrong = [i for i, t in enumerate(titles) if "WRONG" in t]
    assert wrong == list(range(len(wrong)))  # misclassified first, as the report says
    curves = json.loads(Image.open(leaky_run / "figures/learning_curves.png").text[FIGURE_LABELS_KEY])
    assert not any(ax["twin"] for ax in curves) and "batch size 16 throughout" in curves[2]["title"]


def test_the_figure_check_can_fail(tmp_path: Path) -> None:
    from lungxray.evaluation.report import save_figure

    fig, ax = subplots()
    ax.plot([0, 1], [0, 1])
    save_figure(fig, tmp_path / "bare.png")
    assert any("no title" in p for p in check_figure(tmp_path / "bare.png"))
    assert any("missing axis label" in p for p in check_figure(tmp_path / "bare.png"))
    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    assert check_figure(tmp_path / "plain.png") == ["plain.png: no panel labels in its metadata"]
    ax.set(title="t", xlabel="x", ylabel="y")
    assert figure_labels(fig)[0] == {"title": "t", "xlabel": "x", "ylabel": "y", "image": False, "twin": False}


def test_data_section_says_out_of_bag_validation() -> None:
    from lungxray.evaluation.report import data_section

    data = {"counts": {"covid": 111}, "pool": 251, "holdout": 50, "test": 66, "validation_kind": "out-of-bag",
            "validation_images": 249, "duplicates": {}}
    text = "\n".join(data_section(data))
    assert "out-of-bag, each of 249 training images" in text and "holdout 50" not in text


def test_predict_csv_header_is_fixed_rounded_summarised_and_deduplicated(
        trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import csv

    from lungxray.cli import main

    bad = tmp_path / "aaa_broken.png"  # first in the folder: its row must not set the column order
    bad.write_text("not an image")
    good = sorted((tiny_dataset / "test" / "Covid").glob("*.png"))[0]
    shutil.copy(good, tmp_path / "b.png")
    dicom = tmp_path / "IM0001"  # a PACS export without an extension
    _write_dicom(dicom)
    out = tmp_path / "rows.csv"
    capsys.readouterr()
    assert main(["predict", str(trained_run), str(tmp_path), str(tmp_path / "b.png"), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    header = out.read_text().splitlines()[0]
    assert header.startswith("path,label,prob_covid,prob_normal,prob_pneumonia,uncertainty,disagreement,")
    assert header.split(",")[-1] == "error" and "refer" in header.split(",")
    rows = list(csv.DictReader(out.open()))
    assert Path(rows[0]["path"]).name == "aaa_broken.png" and rows[0]["error"]
    assert [Path(r["path"]).name for r in rows].count("b.png") == 1  # given by name and inside the folder: once
    assert {Path(r["path"]).name for r in rows} == {"b.png", "aaa_broken.png", "IM0001"}
    ok = [r for r in rows if not r["error"]]
    assert all(len(r["prob_covid"].split(".")[1]) == 4 for r in ok)  # not 0.33333334326744
    assert re.search(rf"wrote 3 rows to {re.escape(str(out))}: 2 predicted \(\d+ referred", printed), printed



def _write_dicom(path: Path) -> None:
    import numpy as np
    from filegen import dicom_bytes

    path.write_bytes(dicom_bytes(np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)))


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_evaluate_is_read_only_says_absent_classes_and_names_skipped_files(
        trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lungxray.cli import main

    data = tmp_path / "two"  # two of the three classes, plus a class the model does not know
    for folder in ("Covid", "Normal"):
        shutil.copytree(tiny_dataset / "test" / folder, data / folder)
    shutil.copytree(tiny_dataset / "test" / "Normal", data / "Lung_Opacity")
    before = _snapshot(trained_run)
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert _snapshot(trained_run) == before  # nothing written into the bundle
    assert "nothing written (read-only; pass --out DIR" in out
    assert "recall pneumonia: n/a (no pneumonia image)" in out
    assert "no image of pneumonia: left out of the macro averages" in out
    assert "Lung_Opacity" in out  # the skipped folder is named in the terminal, not only in a report
    assert "wrong 0.000" not in out
    assert main(["evaluate", str(trained_run), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"wrote evaluation.md, evaluation.json and predictions.csv to {tmp_path / 'ev'}" in out
    report = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "No image of pneumonia: left out of every macro average" in report


def test_evaluate_on_the_training_folder_scores_without_copies_too(leaky_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from lungxray.cli import main
    from lungxray.training.pipeline import read_run_info

    data = read_run_info(leaky_run)["data"]
    capsys.readouterr()
    assert main(["evaluate", str(leaky_run), "--data", data]) == 0
    out = capsys.readouterr().out
    assert "without the 3 test images (3 exact" in out and "(right of |:" in out


def test_a_moved_bundle_names_its_data_and_asks_for_data(trained_run: Path, tiny_dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from lungxray.cli import main
    from lungxray.inference.bundle import read_meta, update_meta

    assert Path(read_meta(trained_run)["data"]["root"]).is_absolute()  # new bundles work from any folder
    moved = shutil.copytree(trained_run, tmp_path / "elsewhere" / "run")
    meta = read_meta(moved)
    update_meta(moved, data={**meta["data"], "root": "../shared/data/not-on-this-machine"})  # an older bundle
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LUNGXRAY_DATA", raising=False)
    capsys.readouterr()
    assert main(["robustness", str(moved), "--quick", "--no-saliency"]) == 2
    err = capsys.readouterr().err
    assert "was trained on ../shared/data/not-on-this-machine (meta.json data.root)" in err
    assert "pass --data DIR" in err and "\n" not in err.strip()
    assert main(["robustness", str(moved), "--quick", "--no-saliency", "--data", str(tiny_dataset)]) == 0
    assert main(["evaluate", str(tmp_path / "no-such-run"), "--data", str(tiny_dataset)]) == 2
    assert "no-such-run does not exist" in capsys.readouterr().err


def test_cli_front_door(capsys: pytest.CaptureFixture) -> None:
    from lungxray import __version__
    from lungxray.cli import build_parser, main

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lungxray {__version__}"
    top = build_parser().format_help()
    assert "Classify chest X-rays" in top and "thin layer" not in top and "lungxray predict runs/reference" in top
    for command in ("evaluate", "predict", "export", "serve", "robustness"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "a trained model: the run folder" in capsys.readouterr().out, command
    assert main(["train", "--config", "configs/smoke.yaml", "--set", "train.epoch=3", "--data", "tests",
                 "--out", "/nonexistent/x"]) == 2
    assert "did you mean train.epochs?" in capsys.readouterr().err


def test_training_log_estimates_the_time_left() -> None:
    from lungxray.training.loop import time_left

    assert time_left([{"seconds": 10.0}] * 3, 30) == "  ~5.0 min left at most"
    assert time_left([{"seconds": 2.0}], 4) == "  ~8 s left at most"
    assert time_left([{"seconds": 2.0}], 0) == "" and time_left([], 5) == ""

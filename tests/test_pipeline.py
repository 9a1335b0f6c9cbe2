"""End to end on the tiny synthetic dataset: train -> bundle -> predict -> evaluate, and their agreement."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lungxray.cli import main, summary
from lungxray.inference.bundle import BundleError, load_bundle, read_meta
from lungxray.inference.predictor import Predictor, expand_paths
from lungxray.training.pipeline import training_pool


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_run_folder_is_a_complete_bundle(trained_run: Path) -> None:
    for name in ("model.safetensors", "meta.json", "config.yaml", "metrics.json", "history.json", "report.md",
                 "predictions_test.csv", "figures/learning_curves.png", "figures/confusion_test.png"):
        assert (trained_run / name).is_file(), name
    assert not (trained_run / "checkpoint.json").exists()  # removed once the bundle is complete
    meta = read_meta(trained_run)
    assert meta["classes"] == ["covid", "normal", "pneumonia"]
    assert meta["input"]["size"] == 64 and meta["members"] == 1
    assert meta["temperature"] > 0 and 0 <= meta["refer_threshold"] <= 1
    assert len(meta["data"]["fingerprint"]) == 64
    report = (trained_run / "report.md").read_text()
    assert "Test split" in report and "Duplicates" in report and "95%" in report


def test_metrics_json_agrees_with_prediction_csv(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """An independent count from `lungxray predict` output reproduces metrics.json and `evaluate`."""
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(trained_run), str(tiny_dataset / "test"), "--csv", str(out_csv)]) == 0
    rows = _csv(out_csv)
    assert len(rows) == 18
    correct = sum(Path(r["path"]).parent.name.split()[-1].lower().startswith(r["label"][:4]) for r in rows)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["test"]["metrics"]["n"] == 18
    assert correct == round(metrics["test"]["metrics"]["accuracy"] * 18)
    assert main(["evaluate", str(trained_run), "--data", str(tiny_dataset), "--out", str(tmp_path / "ev")]) == 0
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["overall"]["metrics"]["accuracy"] == pytest.approx(correct / 18)
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("covid", "normal", "pneumonia")]
        assert sum(probs) == pytest.approx(1.0, abs=2e-4)  # four decimals each
        assert r["label"] == ("covid", "normal", "pneumonia")[int(np.argmax(probs))]


def test_test_metrics_have_intervals(trained_run: Path) -> None:
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    acc = test["intervals"]["accuracy"]
    assert acc["low"] <= acc["value"] <= acc["high"]
    assert {"recall_covid", "macro_f1", "macro_roc_auc"} <= set(test["intervals"])


def test_summary_gives_the_validation_figure_before_the_test_figure(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    lines = summary(metrics, trained_run).splitlines()
    n_val, n_test = metrics["validation"]["metrics"]["n"], metrics["test"]["metrics"]["n"]
    assert lines[0].startswith(f"{metrics['validation_kind']} accuracy ") and f"({n_val} images" in lines[0]
    assert lines[1].startswith("test accuracy ") and f"/{n_test} correct)" in lines[1]
    assert lines[-1] == f"report: {trained_run / 'report.md'}"


def test_predict_refuses_unreadable_files_by_name(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    good = next((Path(read_meta(trained_run)["data"]["root"]) / "test" / "Covid").glob("*.png"))
    rows = Predictor.load(trained_run).predict_named([(p, str(p)) for p in (bad, good)], on_error="skip").to_rows(
        order=[str(bad), str(good)])
    assert "broken.png" in rows[0]["error"] and "label" not in rows[0]
    assert rows[1]["label"] in ("covid", "normal", "pneumonia") and rows[1]["error"] == ""
    assert main(["predict", str(trained_run), str(bad), "--csv", str(tmp_path / "x.csv")]) == 1


def test_bundle_errors_are_one_line(tmp_path: Path, trained_run: Path) -> None:
    with pytest.raises(BundleError, match="not a lungxray model folder"):
        load_bundle(tmp_path)
    meta = json.loads((trained_run / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(tmp_path)
    assert main(["predict", str(tmp_path), str(tmp_path)]) == 2


def test_validation_never_touches_test(tiny_dataset: Path) -> None:
    from lungxray.io.dataset import load_dataset

    ds = load_dataset(tiny_dataset, size=32)
    pool, holdout, test = training_pool(ds, 0.2, seed=0)
    assert set(ds.splits[pool]) == {"train"} and set(ds.splits[test]) == {"test"}
    assert len(np.intersect1d(pool, test)) == 0 and len(holdout) > 0


def test_ensemble_bundle_predicts_with_uncertainty(trained_ensemble: Path, tiny_dataset: Path) -> None:
    meta = read_meta(trained_ensemble)
    assert meta["members"] == 3 and meta["bootstrap"]
    predictor = Predictor.load(trained_ensemble)
    pred = predictor.predict(expand_paths([tiny_dataset / "test"])[:5])
    assert pred.member_probs.shape == (5, 3, 3)
    assert np.all((pred.uncertainty >= 0) & (pred.uncertainty <= 1))
    metrics = json.loads((trained_ensemble / "metrics.json").read_text())
    assert metrics["validation_kind"] == "out-of-bag"

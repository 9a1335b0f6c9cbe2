"""The study runs end to end in quick mode on the tiny dataset, and resumes without retraining."""

import csv
from pathlib import Path

import pytest

from lungxray.cli import main
from lungxray.config import ConfigError
from lungxray.study.experiments import load_study
from lungxray.training import pipeline

STUDY = Path(__file__).parents[1] / "configs/study.yaml"
REQUIRED_ROWS = {
    "plain", "l2", "dropout", "batchnorm", "augment", "lr_es", "batch_growth", "flip", "arch_compact_cnn",
    "arch_resnet_small", "arch_seed_cnn_bn", "ens5_boot_seed", "ens5_boot_intense", "ens10_boot_seed",
    "ens10_boot_intense", "ens5_plain", "ens10_plain", "rob_clahe", "rob_equalize", "rob_photometric", "rob_crop",
    "rob_curves", "rob_mixup", "rob_erase",
}


def test_study_rows_are_cumulative() -> None:
    study = load_study(STUDY)
    rows = {e.name: e for e in study.experiments}
    assert set(rows) >= REQUIRED_ROWS
    assert rows["dropout"].overrides["train.l2"] == 0.0001  # inherited from the l2 row
    assert rows["augment"].overrides["model.args"]["batch_norm"] is True
    assert not rows["ens10_boot_intense"].cv and rows["lr_es"].cv
    assert rows["ens5_plain"].overrides["ensemble.bootstrap"] is False


def test_unknown_study_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text(f"base: {STUDY.parent / 'seed.yaml'}\nexperiments:\n  - name: a\n    sett: {{}}\n")
    with pytest.raises(ConfigError, match="unknown key sett"):
        load_study(bad)


@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "study"
    assert main(["study", str(STUDY), "--quick", "--data", str(tiny_dataset), "--out", str(out)]) == 0
    report = (out / "STUDY.md").read_text()
    for name in REQUIRED_ROWS:
        assert f"| {name}" in report
    assert "McNemar" in report and (out / "means.png").is_file() and (out / "curves.png").is_file()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} == REQUIRED_ROWS
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert float(r["test_accuracy_low"]) <= float(r["test_accuracy"]) <= float(r["test_accuracy_high"])
    assert (out / "lr_es" / "final" / "model.safetensors").is_file()  # each run keeps its bundle
    assert (out / "lr_es" / "r0f1" / "metrics.json").is_file()  # and its folds

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "train_run", no_training)
    assert main(["study", str(STUDY), "--quick", "--data", str(tiny_dataset), "--out", str(out)]) == 0

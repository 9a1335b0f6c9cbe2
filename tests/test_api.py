"""The public Python API: load/predict/gradcam, train with overrides, evaluate, rich display, light import."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lungxray
from lungxray.api import Evaluation, Model, Run, override_keys
from lungxray.cli import main
from lungxray.config import ConfigError
from lungxray.inference.predictor import Predictor, expand_paths

SMOKE = Path(__file__).parents[1] / "configs/smoke.yaml"


@pytest.fixture(scope="module")
def model(trained_run: Path) -> Model:
    return lungxray.load(trained_run)


@pytest.fixture(scope="module")
def test_files(tiny_dataset: Path) -> list[Path]:
    return expand_paths([tiny_dataset / "test"])


def test_import_is_light_and_public_names_are_documented() -> None:
    code = "import sys, lungxray; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for name in lungxray.__all__:
        obj = getattr(lungxray, name)
        if callable(obj) and name != "ImageDecodeError":
            assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} has no docstring showing a call"


def test_train_stays_the_api_function_after_the_training_module_is_imported() -> None:
    import lungxray.training.pipeline  # imports lungxray/training/loop.py: no package attribute `train` to clash
    from lungxray.training.loop import fit

    assert lungxray.train is lungxray.api.train and callable(fit)
    assert sys.modules["lungxray.training.loop"].fit is fit


def test_predict_accepts_paths_pil_images_and_arrays_alike(model: Model, test_files: list[Path]) -> None:
    path = test_files[0]
    by_path = model.predict(path)
    assert len(by_path) == 1 and by_path.names == [str(path)]
    as_pil = model.predict(Image.open(path))
    as_array = model.predict(np.asarray(Image.open(path)))
    as_bytes = model.predict([path.read_bytes()])
    for other in (as_pil, as_array, as_bytes):
        np.testing.assert_allclose(other.probs, by_path.probs, atol=1e-6)
    assert as_pil.names == [str(path)]  # PIL remembers the file it was opened from
    assert as_array.names == ["<array 0>"] and as_bytes.names == ["<bytes 0>"]
    stack = np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64))) for p in test_files[:4]])
    assert len(model.predict(stack)) == 4  # (N, H, W) is N images
    assert len(model.predict(np.zeros((64, 64, 3), np.uint8))) == 1  # (H, W, 3) is one colour image


def test_predict_agrees_with_the_predictor_and_the_cli_rows(model: Model, trained_run: Path,
                                                            test_files: list[Path]) -> None:
    pred = model.predict([str(p) for p in test_files])
    reference = Predictor.load(trained_run).predict(test_files)
    np.testing.assert_allclose(pred.probs, reference.probs, atol=1e-6)
    assert pred.labels == reference.labels and model.classes == ["covid", "normal", "pneumonia"]
    rows = Predictor.load(trained_run).predict_named([(p, str(p)) for p in test_files]).to_rows()
    assert [r["label"] for r in rows] == pred.labels
    np.testing.assert_allclose([r["uncertainty"] for r in rows], pred.uncertainty, atol=1e-6)


def test_predict_a_folder_and_convert_to_a_dataframe(model: Model, tiny_dataset: Path) -> None:
    pred = model.predict(tiny_dataset / "test")
    assert len(pred) == 18
    df = pred.to_dataframe()
    assert list(df.columns) == ["path", "label", "prob_covid", "prob_normal", "prob_pneumonia", "uncertainty",
                                "disagreement", "ood", "refer", "refer_reason"]
    assert df["label"].tolist() == pred.labels
    np.testing.assert_allclose(df[["prob_covid", "prob_normal", "prob_pneumonia"]].sum(axis=1), 1.0, atol=1e-6)
    assert set(df["refer"]) <= {True, False}
    html = pred._repr_html_()
    assert html.startswith("<table") and "prob_pneumonia" in html
    text = str(pred)
    assert "uncertainty" in text and len(text.splitlines()) == 19


def test_unreadable_input_is_named_or_skipped(model: Model, test_files: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(lungxray.ImageDecodeError, match=r"broken\.png"):
        model.predict([test_files[0], bad])
    with pytest.raises(lungxray.ImageDecodeError, match=r"missing\.png"):
        model.predict(tmp_path / "missing.png")
    pred = model.predict([test_files[0], bad], on_error="skip")
    assert len(pred) == 1 and pred.skipped[0][0] == str(bad) and "broken.png" in pred.skipped[0][1]
    assert pred.to_dataframe()["error"].tolist() == ["", pred.skipped[0][1]]
    with pytest.raises(ValueError, match="on_error"):
        model.predict(test_files[0], on_error="ignore")  # type: ignore[arg-type]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        model.predict(tmp_path / "empty")


def test_cli_predict_keeps_input_order_with_an_unreadable_file(trained_run: Path, test_files: list[Path],
                                                              tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = tmp_path / "rows.csv"
    assert main(["predict", str(trained_run), str(test_files[0]), str(bad), str(test_files[1]),
                 "--csv", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("path,label,prob_covid") and lines[0].endswith(",error")
    assert [line.split(",")[0] for line in lines[1:]] == [str(test_files[0]), str(bad), str(test_files[1])]
    assert "broken.png" in lines[2].split(",", 1)[1]


def test_gradcam_overlay_and_heatmap(model: Model, test_files: list[Path]) -> None:
    rgb = model.gradcam(test_files[0])
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    cam = model.gradcam(Image.open(test_files[0]), overlay=False, target="pneumonia")
    assert cam.shape == (64, 64) and cam.dtype == np.float32 and 0 <= cam.min() <= cam.max() <= 1
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        model.gradcam(test_files[0], target="cat")
    with pytest.raises(ValueError, match="one image"):
        model.gradcam(test_files[:2])


def test_model_display(model: Model, trained_run: Path) -> None:
    assert repr(model).startswith(f"Model('{trained_run}'")
    html = model._repr_html_()
    assert "covid, normal, pneumonia" in html and "test accuracy" in html and "64×64" in html


def test_override_names() -> None:
    assert override_keys({"epochs": 3, "arch": "seed_cnn", "seed": 1}) == {
        "train.epochs": 3, "model.arch": "seed_cnn", "seed": 1}
    assert override_keys({"train__lr": 0.1, "ensemble.members": 2, "augment": {"rotation_range": 5}}) == {
        "train.lr": 0.1, "ensemble.members": 2, "augment.rotation_range": 5}
    with pytest.raises(ConfigError, match=r"unknown config key epoch \(did you mean epochs"):
        override_keys({"epoch": 3})


def test_train_with_overrides_returns_a_displayable_run(tiny_dataset: Path, tmp_path: Path) -> None:
    run = lungxray.train(SMOKE, data=tiny_dataset, out=tmp_path / "run", device="cpu", epochs=1,
                         image_size=32, train__batch_size=16, **{"train.lr": 0.003})
    assert isinstance(run, Run) and run.run_dir == tmp_path / "run"
    assert (run.config.train.epochs, run.config.data.image_size, run.config.train.batch_size) == (1, 32, 16)
    assert len(run.history) == 1 and run.test_accuracy is not None
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    assert run.metrics["test"]["metrics"]["confusion"] == saved["test"]["metrics"]["confusion"]
    assert "epochs: 1" in (run.run_dir / "config.yaml").read_text()
    assert run.load().meta["input"]["size"] == 32
    html = run._repr_html_()
    assert "test (18 images)" in html and "recall covid" in html and "95%" in html
    assert str(run).startswith("Run 'smoke'") and "test accuracy" in str(run)
    reopened = Run.from_dir(run.run_dir)
    assert reopened.metrics == saved and reopened.test_accuracy == run.test_accuracy
    assert [h["train_loss"] for h in reopened.history] == [h["train_loss"] for h in run.history]
    with pytest.raises(ConfigError, match="unknown config key"):
        lungxray.train(SMOKE, data=tiny_dataset, out=tmp_path / "x", epoch=1)
    with pytest.raises(ValueError, match=r"keeps its config\.yaml"):
        lungxray.train(out=run.run_dir, resume=True, epochs=2)


def test_evaluate_matches_the_test_metrics(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    ev = lungxray.evaluate(trained_run, data=tiny_dataset, out=tmp_path / "ev")
    assert isinstance(ev, Evaluation) and ev.images == 18 and ev.report.is_file()
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert ev.accuracy == pytest.approx(test["metrics"]["accuracy"])
    html = ev._repr_html_()
    assert "all (18 images)" in html and "macro F1" in html
    assert str(ev).startswith(f"18 images of {tiny_dataset}\noverall accuracy ")
    assert str(ev).endswith(f"to {tmp_path / 'ev'}")  # says where the output went


def test_done_when_command(trained_run: Path, test_files: list[Path]) -> None:
    """The issue's acceptance check, as a user types it (in a fresh interpreter)."""
    code = f"import lungxray; m = lungxray.load({str(trained_run)!r}); print(m.predict([{str(test_files[0])!r}]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(test_files[0]) in out.stdout and "prob_covid" in out.stdout


def test_public_signatures_are_annotated() -> None:
    for fn in (lungxray.load, lungxray.train, lungxray.evaluate, Model.predict, Model.gradcam):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()
                   if p.name != "self"), fn.__name__

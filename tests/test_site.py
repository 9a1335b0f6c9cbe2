"""Using a model at another site: out-of-distribution referral, the folder shift test, unlabelled adaptation and
its cross-fitted evaluation (lungxray.ood, inputcheck, shift, adapt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_FOLDERS, REAL_DATA, SMOKE_OVERRIDES, synthetic_xray
from filegen import dicom_bytes
from PIL import Image

import lungxray
from lungxray.cli import main
from lungxray.inference.predictor import Predictor, expand_paths
from lungxray.io.inputcheck import geometry_reason, input_reason, pixel_reason
from lungxray.sites import adapt as adapt_mod
from lungxray.sites.adapt import AdaptSettings, adapt_predictor, crossfit, crossfit_folds, estimate_class_mix
from lungxray.sites.ood import FEATURES_FILE
from lungxray.sites.shift import shift_test


@pytest.fixture(scope="module")
def learned_ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """A 3-member bootstrap ensemble that has learned the tiny problem (the shared fixture is barely trained)."""
    from lungxray.training.pipeline import train_run

    out = tmp_path_factory.mktemp("runs") / "learned"
    overrides = {**SMOKE_OVERRIDES, "ensemble.members": 3, "ensemble.bootstrap": True, "train.epochs": 12,
                 "train.lr": 0.01}
    train_run(Path(__file__).parents[1] / "configs/smoke.yaml", tiny_dataset, out, overrides=overrides)
    return out


def _images(folder: Path) -> list[Path]:
    return expand_paths([folder])


def _shifted_site(src: Path, dst: Path) -> Path:
    """The same films as another hospital might send them: gamma 2.5 and a bright frame burned in."""
    for path in _images(src):
        img = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255
        img = (img ** 2.5) * 255
        img[:8], img[-8:], img[:, :8], img[:, -8:] = 255, 255, 255, 255
        target = dst / path.relative_to(src).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(target)
    return dst


def test_bundle_keeps_its_training_features(trained_ensemble: Path) -> None:
    meta = json.loads((trained_ensemble / "meta.json").read_text())
    reference = Predictor.load(trained_ensemble).reference
    assert (trained_ensemble / FEATURES_FILE).is_file() and reference is not None
    assert meta["ood"]["threshold"] == pytest.approx(reference.threshold, rel=1e-5)
    assert len(reference.null_scores) == meta["ood"]["reference_images"] > 10
    assert reference.class_means.shape[:2] == (3, 3)  # members, classes
    assert reference.batchnorm and all(bn.means.shape[0] == 3 for bn in reference.batchnorm.values())


def test_training_like_images_pass_and_non_chest_inputs_are_referred(trained_ensemble: Path, tiny_dataset: Path,
                                                                   tmp_path: Path) -> None:
    model = lungxray.load(trained_ensemble)
    films = model.predict(tiny_dataset / "train")
    assert np.mean(films.ood > model.meta["ood"]["threshold"]) < 0.2  # about 2.5% by construction
    rng = np.random.default_rng(0)
    ct = tmp_path / "ct.dcm"
    ct.write_bytes(dicom_bytes((rng.random((128, 128)) * 4000).astype(np.uint16), Modality="CT"))
    thumb = tmp_path / "thumb.dcm"
    thumb.write_bytes(dicom_bytes((rng.random((16, 16)) * 4000).astype(np.uint16)))
    blank = np.full((96, 96), 128, np.uint8)
    checker = ((np.indices((96, 96)).sum(0) // 8) % 2 * 255).astype(np.uint8)
    noise = rng.integers(0, 256, (96, 96)).astype(np.uint8)
    pred = model.predict([ct, thumb, blank, checker, noise])
    assert pred.refer.all()
    assert all(r.startswith("out of distribution") for r in pred.refer_reason), pred.refer_reason
    assert "Modality CT" in pred.refer_reason[0] and "tiny image" in pred.refer_reason[1]
    assert "near-constant" in pred.refer_reason[2]
    assert "unlike the training images" in pred.refer_reason[4]
    assert pred.to_dataframe().columns[-2:].tolist() == ["refer", "refer_reason"]


def test_input_checks() -> None:
    assert geometry_reason(16, 16) and geometry_reason(3_000_000, 1) and geometry_reason(900, 300)
    assert geometry_reason(2000, 1700) is None
    assert pixel_reason(np.full((64, 64), 7, np.uint8)) is not None
    assert pixel_reason(synthetic_xray(0, np.random.default_rng(0))) is None
    colour = np.zeros((200, 200, 3), np.uint8)
    colour[..., 0] = 200  # a red picture
    assert "colour" in str(input_reason(Image.fromarray(colour), synthetic_xray(0, np.random.default_rng(0))))
    grey_rgb = Image.fromarray(np.repeat(synthetic_xray(1, np.random.default_rng(1))[..., None], 3, -1))
    assert input_reason(grey_rgb, synthetic_xray(1, np.random.default_rng(1))) is None


def test_shift_test_is_calibrated_by_resampling() -> None:
    rng = np.random.default_rng(0)
    null = rng.gamma(4, 0.05, 300)
    same = shift_test(null, rng.choice(null, 40), threshold=float(np.quantile(null, 0.975)))
    far = shift_test(null, rng.gamma(4, 0.05, 40) * 1.6, threshold=float(np.quantile(null, 0.975)))
    assert not same.shifted and same.p_value > 0.05
    assert far.shifted and far.p_value < 0.01 and "lungxray adapt" in far.verdict
    assert shift_test(null, null[:3], 1.0).p_value is None  # too few images for a verdict
    p_values = [shift_test(null, rng.choice(null, 30), 1.0, resamples=500, seed=s).p_value for s in range(200)]
    assert 0.0 <= np.mean(np.array(p_values) < 0.05) < 0.12  # ~5% false alarms at the 5% level


def test_shift_cli_says_shifted_for_another_site_and_not_for_training_images(trained_ensemble: Path,
                                                                           tiny_dataset: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    site = _shifted_site(tiny_dataset / "test", tmp_path / "site")
    assert main(["shift", str(trained_ensemble), "--data", str(site), "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["shifted"] is True and other["p_value"] < 0.01 and other["score"] > other["reference_score"]
    assert main(["shift", str(trained_ensemble), "--data", str(tiny_dataset / "train"), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["shifted"] is False and own["images"] == 54


def test_adapting_on_the_training_images_changes_nothing_measurable(trained_ensemble: Path,
                                                                   tiny_dataset: Path) -> None:
    predictor = Predictor.load(trained_ensemble)
    train = predictor.load_named([(p, str(p)) for p in _images(tiny_dataset / "train")])
    test = predictor.load_named([(p, str(p)) for p in _images(tiny_dataset / "test")]).images
    before = predictor.predict_images(test).probs
    report = adapt_predictor(predictor, train.images, train.names, train.reasons)
    after = predictor.predict_images(test).probs
    assert report.images == 54 and not report.excluded
    # the stated tolerance: no probability moves by more than 0.05 and no label changes
    assert np.abs(after - before).max() < 0.05
    assert (after.argmax(1) == before.argmax(1)).all()


def test_adapt_cli_writes_a_complete_bundle_and_protects_what_exists(trained_ensemble: Path, tiny_dataset: Path,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    site = _shifted_site(tiny_dataset / "test", tmp_path / "site")
    out = tmp_path / "adapted"
    assert main(["adapt", str(trained_ensemble), "--data", str(site), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote the adapted bundle to {out}" in said
    meta = json.loads((out / "meta.json").read_text())
    record = meta["adaptation"]
    assert record["source"] == str(trained_ensemble.resolve()) and record["site"]["images"] == 18
    assert len(record["site"]["fingerprint"]) == 64 and "metrics" not in meta
    source_bn = Predictor.load(trained_ensemble).bundle.model.state_dict()
    adapted = lungxray.load(out)
    changed = [k for k, v in adapted.predictor.bundle.model.state_dict().items()
               if "running" in k and not np.allclose(v.numpy(), source_bn[k].numpy())]
    assert changed  # the BN statistics moved; weights are the source's
    assert len(adapted.predict(site)) == 18
    assert main(["adapt", str(trained_ensemble), "--data", str(site), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["adapt", str(trained_ensemble), "--data", str(site), "--out", str(out), "--force"]) == 0


def test_adapt_refuses_a_folder_too_small_to_adapt_on(trained_ensemble: Path, tiny_dataset: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for path in _images(tiny_dataset / "test")[:3]:
        shutil.copy(path, few / path.name)
    assert main(["adapt", str(trained_ensemble), "--data", str(few), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 3 usable images" in err[0]
    assert not (tmp_path / "x" / "meta.json").exists()


def test_non_chest_images_in_the_site_folder_are_left_out(trained_ensemble: Path, tiny_dataset: Path,
                                                         tmp_path: Path) -> None:
    site = _shifted_site(tiny_dataset / "test", tmp_path / "site")
    Image.fromarray(np.full((96, 96), 40, np.uint8)).save(site / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96)).astype(np.uint8)).save(site / "noise.png")
    predictor = Predictor.load(trained_ensemble)
    loaded = predictor.load_named([(p, str(p)) for p in _images(site)])
    report = adapt_predictor(predictor, loaded.images, loaded.names, loaded.reasons)
    left_out = {Path(name).name for name, _ in report.excluded}
    assert {"blank.png", "noise.png"} <= left_out and report.images == 18


def test_one_class_folder_is_aligned_to_its_class_and_warned_about(learned_ensemble: Path, tiny_dataset: Path,
                                                                   ) -> None:
    predictor = Predictor.load(learned_ensemble)
    covid = predictor.load_named([(p, str(p)) for p in _images(tiny_dataset / "train" / CLASS_FOLDERS["covid"])])
    frozen = predictor.predict_images(covid.images).probs.argmax(1)
    assert (frozen == 0).mean() > 0.9  # the model knows these are covid
    plain = adapt_predictor(predictor, covid.images, covid.names, covid.reasons, AdaptSettings(class_mix="train"))
    after_plain = predictor.predict_images(covid.images).probs
    report = adapt_predictor(predictor, covid.images, covid.names, covid.reasons)
    after = predictor.predict_images(covid.images).probs
    assert plain.class_mix == pytest.approx(list(predictor.reference.class_prior))
    assert report.class_mix[0] > 0.6 and any("looks like one class" in w for w in report.warnings)
    assert (after.argmax(1) == 0).mean() >= (frozen == 0).mean() - 0.05  # never worse than frozen
    assert after[:, 0].mean() >= after_plain[:, 0].mean()  # and closer to covid than plain AdaBN leaves it


def test_class_mix_follows_the_predictions_and_shrinks_toward_training() -> None:
    unsure = np.tile([0.33, 0.36, 0.31], (40, 1))  # an unsure model must not make this "all one class"
    assert estimate_class_mix(unsure, np.full(3, 1 / 3)).max() < 0.4
    sure = np.tile([0.9, 0.05, 0.05], (400, 1))
    assert estimate_class_mix(sure, np.full(3, 1 / 3))[0] == pytest.approx(0.88, abs=0.01)
    assert estimate_class_mix(sure[:8], np.full(3, 1 / 3))[0] < 0.6  # 8 images move it a third of the way


def test_crossfit_never_scores_an_image_that_fed_its_own_statistics(trained_ensemble: Path, tiny_dataset: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor.load(trained_ensemble)
    images = predictor.load_named([(p, str(p)) for p in _images(tiny_dataset / "test")]).images
    groups = np.repeat(np.arange(9), 2)  # two images per "patient"
    seen: list[np.ndarray] = []
    real = adapt_mod.adapt_predictor

    def spy(pred: Predictor, imgs: np.ndarray, *args: object, **kwargs: object) -> adapt_mod.AdaptReport:
        seen.append(imgs.copy())
        return real(pred, imgs, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adapt_mod, "adapt_predictor", spy)
    fit = crossfit(predictor, images, groups, folds=3)
    assert len(seen) == 3
    for f, used in enumerate(seen):
        scored = images[fit.fold == f]
        assert not any((used == s).all((1, 2)).any() for s in scored)  # no scored image among those adapted on
        assert set(groups[fit.fold == f]).isdisjoint(groups[fit.adapted_on[f]])  # nor one of its patient
    assert np.isfinite(fit.ood).all() and fit.logits.any()


def test_crossfit_folds_keep_patients_together() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    fold = crossfit_folds(groups, 3)
    for g in set(groups):
        assert len(set(fold[groups == g])) == 1


def test_evaluate_adapt_gives_frozen_and_cross_fitted_scores(trained_ensemble: Path, tiny_dataset: Path,
                                                             tmp_path: Path) -> None:
    site = _shifted_site(tiny_dataset / "test", tmp_path / "site")
    ev = lungxray.evaluate(trained_ensemble, data=site, adapt=True, folds=3)
    assert ev.result["shift"]["shifted"] is True
    adapted = ev.result["adapted"]
    assert adapted["folds"] == 3 and sum(adapted["adapted_on"]) == 2 * 18
    assert set(adapted["overall"]["metrics"]) == set(ev.result["overall"]["metrics"])
    text = str(ev)
    assert "adapted" in text and "shifted" in text


def test_python_adapt_returns_a_model(trained_ensemble: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    site = _shifted_site(tiny_dataset / "test", tmp_path / "site")
    model = lungxray.load(trained_ensemble)
    in_memory = model.adapt(site)
    assert isinstance(in_memory, lungxray.Model) and len(in_memory.predict(site)) == 18
    written = model.adapt(site, out=tmp_path / "a")
    assert written.meta["adaptation"]["site"]["images"] == 18
    assert model.shift(site).shifted and in_memory.shift(site).p_value is not None


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "../external-dev/hannover").is_dir(), reason="external-dev data not present")
def test_one_class_guard_acts_on_the_hannover_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    from lungxray.training.pipeline import train_run

    run = tmp_path_factory.mktemp("real") / "smoke"
    train_run(Path(__file__).parents[1] / "configs/smoke.yaml", REAL_DATA, run,
              overrides={**SMOKE_OVERRIDES, "ensemble.members": 2, "ensemble.bootstrap": True})
    predictor = Predictor.load(run)
    loaded = predictor.load_named([(p, str(p)) for p in _images(REAL_DATA / "../external-dev/hannover")])
    before = predictor.predict_images(loaded.images).probs.argmax(1)
    report = adapt_predictor(predictor, loaded.images, loaded.names, loaded.reasons, AdaptSettings())
    after = predictor.predict_images(loaded.images).probs.argmax(1)  # as the guard left the model
    assert report.images >= 190 and report.one_class and any("one class" in w for w in report.warnings)
    top = int(np.argmax(report.frozen_mix))
    assert report.class_mix[top] > 0.8  # aligned to that class's training images, not the training mix
    assert (after == top).mean() >= (before == top).mean() - 0.02  # the outliers left out may differ


def test_onnx_engine_gives_the_same_ood_scores_and_referrals(trained_ensemble: Path, tiny_dataset: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_ensemble, run)
    images = [*_images(tiny_dataset / "test")[:6], np.full((96, 96), 128, np.uint8)]
    torch_pred = lungxray.load(run).predict(images)
    onnx_pred = lungxray.load(run, engine="onnx").predict(images)
    assert np.isfinite(onnx_pred.ood).all()
    np.testing.assert_allclose(onnx_pred.ood, torch_pred.ood, rtol=1e-3, atol=1e-4)
    assert onnx_pred.refer_reason == torch_pred.refer_reason

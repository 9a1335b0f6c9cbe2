"""Grad-CAM: every architecture, correctness on a hand-built model, ensembles, overlays, `--cam`, the run report."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lungxray.cli import main
from lungxray.evaluation.gradcam import (
    cam_names,
    central_mass,
    gallery_indices,
    gradcam,
    member_gradcam,
    overlay,
    overlay_png,
)
from lungxray.inference.bundle import Bundle
from lungxray.inference.predictor import Predictor, expand_paths
from lungxray.models.nets import PackedNet, build_model, extract_member, list_models
from lungxray.runtime import INPUT_MEAN, INPUT_STD

SIZE = 64


def _predictor(model: nn.Module, classes: list[str]) -> Predictor:
    meta = {"classes": classes, "members": model.members,
            "input": {"size": SIZE, "mean": INPUT_MEAN, "std": INPUT_STD}}
    return Predictor(Bundle(model, meta, Path(".")))


class SpotNet(PackedNet):
    """Hand-built: features = ReLU of the 4x4-pooled input (bright regions only); class 0 = their mean, 1 = minus."""

    def __init__(self, members: int = 1) -> None:
        super().__init__(num_classes=2, in_channels=1, members=members, image_size=SIZE)
        self.feature_channels = 1
        self.gain = nn.Parameter(torch.ones(1))

    def features(self, x: Tensor) -> Tensor:
        return F.relu(F.avg_pool2d(x, 4)) * self.gain  # (B, K, 16, 16)

    def head(self, f: Tensor) -> Tensor:
        s = f.mean(dim=(2, 3)).view(f.shape[0], self.members)
        return torch.stack([s, -s], dim=-1)  # (B, K, 2)


def _spot(y: int, x: int, side: int = 8) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.uint8)
    img[y : y + side, x : x + side] = 255
    return img


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_gives_normalised_maps_and_leaves_the_model_alone(arch: str) -> None:
    model = build_model(arch, members=2, width=4, image_size=SIZE)
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    predictor = _predictor(model, ["covid", "normal", "pneumonia"])
    with torch.no_grad():
        cams = gradcam(predictor, images)
        members = member_gradcam(predictor, images)
        assert not torch.is_grad_enabled()  # the caller's grad mode survives
    assert cams.shape == (3, SIZE, SIZE) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert members.shape == (3, 2, SIZE, SIZE)
    peaks = members.max(axis=(2, 3))
    assert np.all(np.isclose(peaks, 1) | (peaks == 0))  # each member map is min-max normalised (or empty)
    np.testing.assert_allclose(cams, members.mean(axis=1), atol=1e-6)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_heatmap_sits_on_the_decisive_pattern() -> None:
    predictor = _predictor(SpotNet(members=1).eval(), ["spot", "none"])
    images = np.stack([_spot(0, 0), _spot(28, 28), _spot(40, 12)])
    cams = gradcam(predictor, images)
    for cam, (y, x) in zip(cams, [(0, 0), (28, 28), (40, 12)], strict=True):
        py, px = np.unravel_index(cam.argmax(), cam.shape)
        assert y <= py < y + 8 and x <= px < x + 8
        assert cam.std() > 0.05
    mass = central_mass(cams)
    assert mass[0] < 0.02  # corner-only evidence
    assert mass[1] > 0.98  # centre-only evidence
    # The default target is the predicted class (0); class 1 has only negative evidence, so its map is empty.
    np.testing.assert_array_equal(cams, gradcam(predictor, images, np.zeros(3, np.int64)))
    assert not gradcam(predictor, images, np.ones(3, np.int64)).any()


def test_ensemble_map_is_the_mean_of_its_members(trained_ensemble: Path, tiny_dataset: Path) -> None:
    ens = Predictor.load(trained_ensemble)
    images = np.stack([ens.preprocess(p) for p in expand_paths([tiny_dataset / "test"])[::3]])
    target = ens.predict_images(images).probs.argmax(1)
    cams = gradcam(ens, images, target)
    meta, k = ens.meta, ens.bundle.members
    state = ens.bundle.model.state_dict()
    singles = []
    for member in range(k):
        model = build_model(meta["arch"], num_classes=3, members=1, **meta["arch_args"])
        model.load_state_dict(extract_member(state, member, k))
        single = Predictor(Bundle(model.eval(), {**meta, "members": 1}, trained_ensemble))
        singles.append(gradcam(single, images, target))
    np.testing.assert_allclose(cams, np.mean(singles, axis=0), atol=1e-5)
    assert (cams.std(axis=(1, 2)) > 0.02).all()  # a trained model's maps are not uniform


def test_bad_input_is_a_clear_error(trained_run: Path) -> None:
    predictor = Predictor.load(trained_run)
    with pytest.raises(ValueError, match="uint8"):
        gradcam(predictor, np.zeros((2, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="64x64"):
        gradcam(predictor, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        gradcam(predictor, np.zeros((2, SIZE, SIZE), np.uint8), np.array([0, 3]))


def test_central_mass() -> None:
    corner, centre = np.zeros((SIZE, SIZE)), np.zeros((SIZE, SIZE))
    corner[:5, :5] = 1
    centre[20:40, 20:40] = 1
    np.testing.assert_allclose(central_mass(np.stack([corner, centre])), [0.0, 1.0])
    inner = SIZE - 2 * round(SIZE * 0.15)
    assert central_mass(np.ones((SIZE, SIZE)))[0] == pytest.approx((inner / SIZE) ** 2)
    assert central_mass(np.ones((SIZE, SIZE)), margin=0)[0] == pytest.approx(1.0)
    assert np.isnan(central_mass(np.zeros((SIZE, SIZE))))[0]
    with pytest.raises(ValueError, match="margin"):
        central_mass(corner, margin=0.5)


def test_overlay() -> None:
    image = np.tile(np.arange(SIZE, dtype=np.uint8) * 4, (SIZE, 1))
    cam = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    plain = overlay(image, cam, alpha=0)
    np.testing.assert_array_equal(plain, np.repeat(image[..., None], 3, axis=2))
    blended = overlay(image, cam)
    assert blended.shape == (SIZE, SIZE, 3) and blended.dtype == np.uint8
    hot, cold = blended[-1, -1], blended[0, 0]  # jet: red where the map is 1, blue where it is 0
    assert hot[0] > hot[2] and cold[2] > cold[0]
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, cam))))
    np.testing.assert_array_equal(decoded, blended)
    with pytest.raises(ValueError, match="same shape"):
        overlay(image, cam[:10])


def test_gallery_shows_every_mistake_and_fills_with_correct_ones() -> None:
    y_true = np.repeat([0, 1, 2], 10)
    y_pred = y_true.copy()
    y_pred[[3, 14, 15]] = [1, 2, 0]
    idx = gallery_indices(y_true, y_pred, n=12)
    assert {3, 14, 15} <= set(idx) and len(idx) == len(set(idx)) == 12
    assert list(idx[:3]) == [3, 14, 15]  # "misclassified first", as the report says
    assert set(y_true[idx]) == {0, 1, 2}
    assert len(gallery_indices(y_true, (y_true + 1) % 3, n=12, limit=20)) == 20


def test_cam_names_are_unique() -> None:
    assert cam_names(["a/x.png", "b/x.jpg", "x-2.png", "c/x.png"]) == [
        "x_cam.png", "x-2_cam.png", "x-2-2_cam.png", "x-3_cam.png"]


def test_predict_cam_writes_readable_pngs(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    src = sorted((tiny_dataset / "test" / "Covid").iterdir())
    for folder, f in (("a", src[0]), ("b", src[1])):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(f, tmp_path / "in" / folder / f"x{f.suffix}")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    out_csv, cam_dir = tmp_path / "pred.csv", tmp_path / "cams"
    assert main(["predict", str(trained_run), str(tmp_path / "in"), "--cam", str(cam_dir),
                 "--csv", str(out_csv)]) == 0
    assert sorted(p.name for p in cam_dir.iterdir()) == ["x-2_cam.png", "x_cam.png"]
    for png in cam_dir.iterdir():
        with Image.open(png) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    with out_csv.open() as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["broken.png"]["cam"] == "" and rows["broken.png"]["error"]
    assert sorted(Path(rows[n]["cam"]).name for n in rows if n != "broken.png") == ["x-2_cam.png", "x_cam.png"]


def test_run_report_has_saliency(trained_run: Path) -> None:
    results = json.loads((trained_run / "metrics.json").read_text())
    assert 0 <= results["saliency_central_mass"] <= 1
    assert results["saliency"]["images"] == 18
    with Image.open(trained_run / "figures" / "gradcam_test.png") as im:
        assert im.size[0] > 500
    report = (trained_run / "report.md").read_text()
    assert "Saliency (Grad-CAM" in report and "figures/gradcam_test.png" in report

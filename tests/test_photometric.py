"""Tests for lungxray.photometric: each step against an independent reference, seeding, resume, config wiring."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from conftest import synthetic_xray
from PIL import Image

from lungxray.config import ConfigError, TrainConfig, load_config
from lungxray.models.nets import build_model
from lungxray.runtime import normalize
from lungxray.training.plan import plan_members
from lungxray.transforms.photometric import (
    PRESETS,
    PhotometricAugmenter,
    PhotometricParams,
    gaussian_blur,
    jpeg_roundtrip,
    make_photometric,
    resolve_photometric,
)


def xray_batch(n: int = 4, size: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([synthetic_xray(i % 3, rng, size) for i in range(n)]))  # uint8 (N, S, S)


def identity_params(n: int, **values: float) -> dict[str, torch.Tensor]:
    base = {"gamma": 1.0, "contrast": 1.0, "brightness": 0.0, "detail": 0.0, "sigma": 1.0, "noise": 0.0, "jpeg": 0.0}
    return {k: torch.full((n,), float(values.get(k, v))) for k, v in base.items()}


def to_unit(x: torch.Tensor) -> np.ndarray:
    """Normalised batch -> [0, 1] intensities (the contract's mean 0.5, std 0.25)."""
    return (x.double() * 0.25 + 0.5).numpy()


def test_none_is_identity_and_skipped() -> None:
    assert make_photometric("none") is None
    x = normalize(xray_batch()).unsqueeze(1)
    assert PhotometricAugmenter(PRESETS["none"])(x) is x
    assert not PRESETS["light"].is_identity() and not PRESETS["strong"].is_identity()
    with pytest.raises(ValueError, match="unknown photometric preset 'lite'"):
        resolve_photometric("lite")
    with pytest.raises(ValueError, match="gamma"):
        PhotometricParams(gamma=0.5)


def test_curves_preset_only_remaps_grey_levels() -> None:
    """`curves` keeps the order of grey levels in every sample (no blur, noise or JPEG), yet changes them."""
    x = normalize(xray_batch(8)).unsqueeze(1)
    y = PhotometricAugmenter(PRESETS["curves"], seed=1)(x)
    changed = 0
    for xi, yi in zip(x.flatten(1), y.flatten(1), strict=True):
        order = torch.argsort(xi, stable=True)
        assert (torch.diff(yi[order]) >= -1e-5).all()  # monotone non-decreasing in the input
        changed += int(not torch.allclose(xi, yi, atol=1e-3))
    assert changed >= 4


def test_all_identity_parameters_change_nothing() -> None:
    x = normalize(xray_batch()).unsqueeze(1)
    y = PhotometricAugmenter(PRESETS["strong"]).apply(x, identity_params(4))
    assert torch.allclose(y, x, atol=1e-5)


def test_curve_steps_match_the_formula() -> None:
    u8 = xray_batch(3)
    x = normalize(u8).unsqueeze(1)
    p = identity_params(3, gamma=2.0, contrast=1.5, brightness=0.05)
    p["gamma"][1] = 0.5  # per sample
    got = to_unit(PhotometricAugmenter(PRESETS["strong"]).apply(x, p))
    v = np.clip(u8.numpy()[:, None] / 255.0, 1e-6, 1)
    g = np.array([2.0, 0.5, 2.0]).reshape(3, 1, 1, 1)
    want = np.clip((v**g - 0.5) * 1.5 + 0.55, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_matches_scipy_and_detail_sharpens() -> None:
    x = torch.from_numpy(ndi.gaussian_filter(np.random.default_rng(1).random((2, 1, 40, 48)), (0, 0, 1, 1)))
    got = gaussian_blur(x.float(), torch.tensor([0.7, 2.0]))
    for i, s in enumerate((0.7, 2.0)):
        want = ndi.gaussian_filter(x[i, 0].numpy(), s, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(got[i, 0].numpy(), want, atol=2e-4)  # truncated at 3 sigma either way
    img = normalize(xray_batch(2)).unsqueeze(1)
    aug = PhotometricAugmenter(PRESETS["strong"])
    blurred = aug.apply(img, identity_params(2, detail=-1.0, sigma=1.5))
    sharpened = aug.apply(img, identity_params(2, detail=1.0, sigma=1.5))

    def roughness(t: torch.Tensor) -> float:
        return float((t[..., 1:] - t[..., :-1]).abs().mean())

    assert roughness(blurred) < roughness(img) < roughness(sharpened)


def test_jpeg_roundtrip_matches_a_real_encoder() -> None:
    rng = np.random.default_rng(0)
    img = synthetic_xray(0, rng, 61)  # not a multiple of 8: exercises the edge padding
    x = torch.from_numpy(img).float()[None, None] / 255
    errors = []
    for q in (90, 50, 15):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        pil = np.asarray(Image.open(buf), dtype=np.float64)
        ours = jpeg_roundtrip(x, torch.tensor([float(q)]))[0, 0].double().numpy() * 255
        assert ours.shape == img.shape
        assert np.abs(ours - pil).mean() < 1.0, q  # within a grey level of libjpeg on average
        errors.append(np.abs(ours - img).mean())
    assert errors[0] < errors[1] < errors[2]


def test_noise_has_the_drawn_std() -> None:
    x = torch.zeros(2, 1, 128, 128)  # mid-grey: no clipping
    noise = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    y = to_unit(PhotometricAugmenter(PRESETS["strong"]).apply(x, identity_params(2, noise=0.04), noise))
    assert abs(y.std() - 0.04) < 0.002 and abs(y.mean() - 0.5) < 0.002


def test_seeded_own_generator_and_epoch_reseeding() -> None:
    x = normalize(xray_batch(8)).unsqueeze(1)
    global_state = torch.get_rng_state()
    a, b = PhotometricAugmenter(PRESETS["strong"], seed=3), PhotometricAugmenter(PRESETS["strong"], seed=3)
    assert torch.equal(a(x), b(x))
    assert torch.equal(torch.get_rng_state(), global_state)  # never touches the global RNG
    assert not torch.equal(PhotometricAugmenter(PRESETS["strong"], seed=4)(x), b(x))
    a.set_epoch(5)
    first = a(x)
    b(x)  # b has drawn more before: set_epoch makes the history irrelevant
    b.set_epoch(5)
    assert torch.equal(b(x), first)
    b.set_epoch(6)
    assert not torch.equal(b(x), first)


def test_output_stays_in_the_intensity_range() -> None:
    x = normalize(xray_batch(16)).unsqueeze(1)
    y = to_unit(PhotometricAugmenter(PRESETS["strong"], seed=0)(x))
    assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    assert y.shape == tuple(x.shape) and not np.allclose(y, to_unit(x))


def test_config_refuses_unknown_preset() -> None:
    assert load_config({"augment": {"photometric": "light"}}).augment.photometric == "light"
    with pytest.raises(ConfigError, match="photometric preset 'heavy'"):
        load_config({"augment": {"photometric": "heavy"}})


def _fit(run_dir, epochs: int, resume: bool, photometric: bool = True) -> dict[str, torch.Tensor]:
    from lungxray.training.loop import fit
    from lungxray.transforms.geometric import PRESETS as GEOMETRY
    from lungxray.transforms.geometric import Augmenter

    run_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    images = xray_batch(24, 32)
    labels = torch.arange(24) % 3
    plan = plan_members(labels.numpy(), 1, False, 0, True, np.arange(0, 24, 4))
    model = build_model("compact_cnn", num_classes=3, members=1, width=4, image_size=32)
    cfg = dataclasses.replace(TrainConfig(), epochs=epochs, batch_size=8, precision="fp32", channels_last=False,
                              early_stopping_patience=0)
    fit(model, images, labels, plan, cfg, Augmenter(GEOMETRY["seed"], seed=1), seed=0, run_dir=run_dir,
        resume=resume, photometric=PhotometricAugmenter(PRESETS["strong"], seed=2) if photometric else None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_with_photometric_resumes_exactly(tmp_path) -> None:
    """A run stopped after epoch 1 and resumed ends with the weights of an uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible reductions
    try:
        straight = _fit(tmp_path / "a", 2, False)
        _fit(tmp_path / "b", 1, False)
        resumed = _fit(tmp_path / "b", 2, True)
        plain = _fit(tmp_path / "c", 2, False, photometric=False)
    finally:
        torch.set_num_threads(threads)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert not all(torch.equal(v, plain[k]) for k, v in straight.items())  # the augmentation did take part

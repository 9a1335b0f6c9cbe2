"""Tests for lungxray.augment: Keras semantics against a scipy reference, exact flips, seeded RNG."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from lungxray.config import ConfigError, load_config
from lungxray.runtime import INPUT_MEAN, INPUT_STD
from lungxray.transforms.geometric import (
    PRESETS,
    Augmenter,
    AugmentParams,
    _affine_grid,
    keras_transform_matrix,
    resolve_params,
)

FULL = AugmentParams(
    rotation_range=20,
    width_shift_range=0.15,
    height_shift_range=0.1,
    shear_range=10,
    zoom_range=0.2,
    horizontal_flip=True,
)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random image in [0, 1]: bilinear resampling is then well defined everywhere."""
    img = ndi.gaussian_filter(np.random.default_rng(seed).random((h, w)), 3.0)
    return (img - img.min()) / (img.max() - img.min())


def params_of(n: int, theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0, flip=False) -> dict:
    vals = {"theta": theta, "tx": tx, "ty": ty, "shear": shear, "zx": zx, "zy": zy}
    p = {k: torch.full((n,), float(v), dtype=torch.float64) for k, v in vals.items()}
    p["flip"] = torch.full((n,), flip, dtype=torch.bool)
    return p


def test_identity_fast_path_and_apply() -> None:
    x = torch.rand(3, 2, 16, 20)
    assert Augmenter(AugmentParams(), seed=1)(x) is x
    assert PRESETS["none"].is_identity() and not PRESETS["seed"].is_identity()
    assert torch.equal(Augmenter(FULL).apply(x, params_of(3)), x)  # no geometry: resampling skipped
    p = params_of(3)
    p["theta"][1] = 30.0  # forces the grid_sample path; samples 0 and 2 keep identity parameters
    y = Augmenter(FULL).apply(x, p)
    assert torch.allclose(y[0::2], x[0::2], atol=1e-5) and not torch.allclose(y[1], x[1], atol=0.01)


def test_flip_is_exact() -> None:
    x = torch.rand(4, 3, 16, 20)
    flip_only = Augmenter(AugmentParams(horizontal_flip=True))
    assert torch.equal(flip_only.apply(x, params_of(4, flip=True)), x.flip(-1))
    p = params_of(4, flip=False)
    p["flip"] = torch.tensor([True, False, True, False])
    y = flip_only.apply(x, p)
    assert torch.equal(y[0::2], x[0::2].flip(-1)) and torch.allclose(y[1::2], x[1::2], atol=1e-5)
    y = flip_only(x)  # flip-only params skip resampling: every image exactly flipped or exactly unchanged
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1)) for i in range(4))


def test_matrix_by_hand() -> None:
    # Pure 90 degree rotation about the centre (2, 2) of a 5x5 image: out[r, c] = in[c, 4 - r] (= np.rot90).
    m = keras_transform_matrix(90, 0, 0, 0, 1, 1, 5, 5)
    np.testing.assert_allclose(m, [[0, 1, 0], [-1, 0, 4], [0, 0, 1]], atol=1e-12)
    # Pure shift: tx moves columns, ty rows; out[r, c] = in[r + ty, c + tx].
    m = keras_transform_matrix(0, 3, -2, 0, 1, 1, 7, 9)
    np.testing.assert_allclose(m, [[1, 0, -2], [0, 1, 3], [0, 0, 1]], atol=1e-12)
    # Shift is applied before the rotation (R @ T): with 90 degrees an x shift becomes a row shift.
    m = keras_transform_matrix(90, 1, 0, 0, 1, 1, 5, 5)
    np.testing.assert_allclose(m, [[0, 1, 1], [-1, 0, 4], [0, 0, 1]], atol=1e-12)
    # Shear 30 degrees about the centre (row 2, col 3): col_in = col - sin(30)(row - 2), row_in = cos(30) row.
    m = keras_transform_matrix(0, 0, 0, 30, 1, 1, 5, 7)
    c = np.cos(np.deg2rad(30))
    np.testing.assert_allclose(m, [[c, 0, 2 * (1 - c)], [-0.5, 1, 1.0], [0, 0, 1]], atol=1e-12)
    # Anisotropic zoom about the centre (row 3, col 4): zx scales columns, zy rows.
    m = keras_transform_matrix(0, 0, 0, 0, 2.0, 0.5, 7, 9)
    np.testing.assert_allclose(m, [[0.5, 0, 1.5], [0, 2.0, -4.0], [0, 0, 1]], atol=1e-12)


def test_rotation_90_matches_rot90() -> None:
    img = torch.from_numpy(smooth_image(12, 12)).float()[None, None]
    y = Augmenter(FULL).apply(img, params_of(1, theta=90.0))
    assert torch.allclose(y[0, 0], torch.rot90(img[0, 0]), atol=1e-5)


@pytest.mark.parametrize(
    "combo",
    [
        dict(theta=17.0),
        dict(tx=5.5, ty=-3.25),
        dict(shear=12.0),
        dict(zx=0.8, zy=1.25),
        dict(theta=-23.0, tx=-4.0, ty=6.0, shear=-8.0, zx=1.15, zy=0.9),
        dict(theta=35.0, tx=2.0, ty=-7.0, shear=15.0, zx=1.3, zy=1.3, flip=True),
    ],
)
@pytest.mark.parametrize("hw", [(48, 48), (40, 56)])
def test_apply_matches_scipy_reference(combo: dict, hw: tuple[int, int]) -> None:
    h, w = hw
    img = smooth_image(h, w)
    x = torch.from_numpy(np.stack([img, 1.0 - img])).float()[None]  # (1, 2, H, W): channels alike
    y = Augmenter(FULL).apply(x, params_of(1, **combo))[0].numpy()
    keys = ("theta", "tx", "ty", "shear", "zx", "zy")
    m = keras_transform_matrix(*(combo.get(k, 1.0 if k[0] == "z" else 0.0) for k in keys), h, w)
    for c in range(2):
        ref = ndi.affine_transform(x[0, c].double().numpy(), m[:2, :2], offset=m[:2, 2], order=1, mode="nearest")
        if combo.get("flip"):
            ref = ref[:, ::-1]
        assert np.abs(ref - y[c]).mean() < 0.01 and np.abs(ref - y[c]).max() < 1e-4
    assert np.abs(y[0] - img).mean() > 0.01  # the transform did something


def test_parameters_vary_and_seeding() -> None:
    x = torch.from_numpy(smooth_image(32, 32)).float().expand(6, 1, 32, 32)
    p = Augmenter(FULL, seed=0).sample(6, 32, 32)
    assert all(p[k].unique().numel() == 6 for k in ("theta", "tx", "ty", "shear", "zx", "zy"))
    y = Augmenter(FULL, seed=0)(x)
    assert not torch.allclose(y[0], y[1])
    assert torch.equal(y, Augmenter(FULL, seed=0)(x))
    assert not torch.allclose(y, Augmenter(FULL, seed=1)(x))


def test_state_dict_resumes_exactly() -> None:
    x = torch.rand(4, 1, 24, 24)
    a = Augmenter(FULL, seed=7)
    a(x)
    state = a.state_dict()
    expected = a(x)
    b = Augmenter(FULL, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b(x), expected)


@pytest.mark.parametrize("shift", [0.2, 5.0])
def test_sampled_ranges(shift: float) -> None:
    params = AugmentParams(
        rotation_range=15,
        width_shift_range=shift,
        height_shift_range=shift / 2,
        shear_range=7,
        zoom_range=0.3,
        horizontal_flip=True,
    )
    p = Augmenter(params, seed=3).sample(4000, 40, 80)
    wmax = shift * 80 if shift < 1 else shift
    hmax = shift / 2 * 40 if shift < 1 else shift / 2
    for key, lo, hi in [
        ("theta", -15, 15),
        ("tx", -wmax, wmax),
        ("ty", -hmax, hmax),
        ("shear", -7, 7),
        ("zx", 0.7, 1.3),
        ("zy", 0.7, 1.3),
    ]:
        v = p[key]
        assert lo <= v.min() and v.max() <= hi
        assert v.min() < lo + 0.05 * (hi - lo) and v.max() > hi - 0.05 * (hi - lo)  # range is used
    assert not torch.allclose(p["zx"], p["zy"])  # independent draws
    assert 0.4 < p["flip"].double().mean() < 0.6
    assert not Augmenter(dataclasses.replace(params, horizontal_flip=False)).sample(100, 8, 8)["flip"].any()


def test_bfloat16_in_bfloat16_out() -> None:
    x = torch.rand(2, 1, 16, 16).to(torch.bfloat16)
    y = Augmenter(FULL, seed=0)(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_resolve_params() -> None:
    assert resolve_params() == AugmentParams()
    assert resolve_params("seed", horizontal_flip=True) == dataclasses.replace(PRESETS["seed"], horizontal_flip=True)
    assert not any(p.horizontal_flip for p in PRESETS.values())
    with pytest.raises(ValueError, match="intense"):
        resolve_params("nope")
    with pytest.raises(ValueError, match="rotation_range"):
        resolve_params("seed", rotate=3)
    with pytest.raises(ValueError):
        AugmentParams(zoom_range=1.0)


def test_fast_grid_equals_affine_grid() -> None:
    theta = torch.eye(2, 3) + 0.3 * torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.affine_grid(theta, [5, 1, 9, 13], align_corners=True)
    assert torch.allclose(_affine_grid(theta, 9, 13), ref, atol=1e-6)


def test_random_erasing_fills_one_rectangle_per_sample() -> None:
    x = torch.rand(64, 1, 40, 50)
    eraser = Augmenter(AugmentParams(erase_prob=1.0), seed=3)
    p = eraser.sample(64, 40, 50)
    y = eraser.apply(x, p)
    top, left, eh, ew, grey = p["erase"].T
    fractions = []
    for i in range(64):
        t, l_, h, w = int(top[i]), int(left[i]), int(eh[i]), int(ew[i])
        assert h >= 1 and t + h <= 40 and w >= 1 and l_ + w <= 50
        inside = torch.zeros(40, 50, dtype=torch.bool)
        inside[t : t + h, l_ : l_ + w] = True
        assert torch.equal(y[i, 0][~inside], x[i, 0][~inside])  # nothing else touched
        assert torch.allclose(y[i, 0][inside], ((grey[i] - INPUT_MEAN) / INPUT_STD).float())  # one grey level
        fractions.append(h * w / (40 * 50))
    assert min(fractions) > 0.015 and max(fractions) < 0.45 and np.std(fractions) > 0.05


def test_random_erasing_draws_after_the_affine_parameters() -> None:
    """Switching erasing on leaves every other sampled parameter as it was (seeded runs stay comparable), and
    with erase_prob 0 there is no erase draw at all."""
    plain = Augmenter(FULL, seed=5).sample(16, 32, 32)
    some = Augmenter(dataclasses.replace(FULL, erase_prob=0.5), seed=5).sample(16, 32, 32)
    assert "erase" not in plain
    assert all(torch.equal(plain[k], some[k]) for k in plain)
    erased = some["erase"][:, 2] > 0
    assert 0 < int(erased.sum()) < 16  # about half of the samples
    assert not AugmentParams(erase_prob=0.5).is_identity()
    with pytest.raises(ValueError, match="probability"):
        AugmentParams(erase_prob=1.5)


def test_erasing_is_a_config_override() -> None:
    smoke = Path(__file__).parents[1] / "configs" / "smoke.yaml"
    assert load_config(smoke, ["augment.erase_prob=0.5"]).augment.params().erase_prob == 0.5
    with pytest.raises(ConfigError, match="erase_prob"):
        load_config(smoke, ["augment.erase_prob=2"])


def test_erasing_without_geometry_leaves_the_input_alone() -> None:
    x = torch.rand(8, 1, 24, 24)
    before = x.clone()
    y = Augmenter(AugmentParams(erase_prob=1.0), seed=0)(x)
    assert torch.equal(x, before) and not torch.equal(y, before)  # the erased copy is new, the caller's batch intact

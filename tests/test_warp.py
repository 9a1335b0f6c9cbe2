"""The augmentation's one-pass resampling (`models.kernels.warp`, `Augmenter.apply_gathered`) computes what the
float path computes (gather, standardise, affine grid + grid_sample, flip, erase), at the edges too, and refuses
what it cannot index."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lungxray.models.kernels import warp
from lungxray.runtime import INPUT_MEAN, INPUT_STD, normalize
from lungxray.transforms.geometric import PRESETS, Augmenter, _pixel_matrices

needs_kernel = pytest.mark.skipif(not warp.warp_available(), reason="the warp kernel needs gcc and AVX2+FMA")
SCALE, SHIFT = 1.0 / (255.0 * INPUT_STD), -INPUT_MEAN / INPUT_STD


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _float_path(aug: Augmenter, images: torch.Tensor, index: torch.Tensor, p: dict) -> torch.Tensor:
    return aug.apply(normalize(images[index]).unsqueeze(1), p)


def _strong_params(aug: Augmenter, n: int, h: int, w: int, seed: int = 1) -> dict:
    """Parameters well past the presets' ranges (coordinates leave the image on every side), half flipped."""
    p = aug.sample(n, h, w)
    g = torch.Generator().manual_seed(seed)
    p["theta"] = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 120
    p["tx"] = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * w
    p["zx"] = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    p["flip"] = torch.rand(n, generator=g) < 0.5
    return p


@needs_kernel
@pytest.mark.parametrize("h,w", [(256, 256), (37, 53), (2, 9)])
def test_kernel_matches_the_float_path(h: int, w: int) -> None:
    images = _images(6, h, w)
    index = torch.tensor([5, 0, 3, 5, 1, 2, 4, 5, 0])  # the last image (scalar path) more than once
    aug = Augmenter(dataclasses.replace(PRESETS["intense"], horizontal_flip=True), seed=3)
    p = _strong_params(aug, index.numel(), h, w)
    got = aug.apply_gathered(images, index, p)
    ref = _float_path(aug, images, index, p)
    assert got.shape == ref.shape == (index.numel(), 1, h, w)
    assert (got - ref).abs().max().item() < 2e-3  # ~0.5% of one grey level: coordinate rounding only


@needs_kernel
def test_integer_shifts_and_flips_are_exact_copies() -> None:
    """A whole-pixel shift samples pixels, not blends: the kernel must read the right ones, clamp the rest."""
    images = _images(3, 16, 24)
    aug = Augmenter(PRESETS["seed"])
    p = {k: torch.zeros(2, dtype=torch.float64) for k in ("theta", "tx", "ty", "shear")}
    p |= {"zx": torch.ones(2, dtype=torch.float64), "zy": torch.ones(2, dtype=torch.float64)}
    p["tx"][:] = torch.tensor([3.0, -2.0])
    p["flip"] = torch.tensor([False, True])
    got = aug.apply_gathered(images, torch.tensor([2, 1]), p)[:, 0]
    want0 = torch.cat([images[2][:, 3:], images[2][:, -1:].expand(16, 3)], 1)  # input column j + 3, clamped
    shifted1 = torch.cat([images[1][:, :1].expand(16, 2), images[1][:, :-2]], 1)
    assert torch.allclose(got[0], normalize(want0), atol=1e-5)
    assert torch.allclose(got[1], normalize(shifted1.flip(-1)), atol=1e-5)


@needs_kernel
def test_erasing_follows_the_warp() -> None:
    images = _images(4, 32, 32)
    aug = Augmenter(dataclasses.replace(PRESETS["seed"], erase_prob=1.0), seed=5)
    p = aug.sample(4, 32, 32)
    index = torch.arange(4)
    assert torch.allclose(aug.apply_gathered(images, index, p), _float_path(aug, images, index, p), atol=2e-3)


def test_without_the_kernel_the_float_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGXRAY_FUSED", "0")
    assert not warp.warp_available()
    images, index = _images(3, 20, 20), torch.tensor([2, 2, 0])
    aug = Augmenter(PRESETS["intense"], seed=2)
    p = aug.sample(3, 20, 20)
    assert torch.equal(aug.apply_gathered(images, index, p), _float_path(aug, images, index, p))


def test_parameters_for_another_batch_are_refused() -> None:
    aug = Augmenter(PRESETS["seed"])
    with pytest.raises(ValueError, match="parameters are for"):
        aug.apply_gathered(_images(3, 8, 8), torch.tensor([0, 1]), aug.sample(3, 8, 8))


@needs_kernel
def test_bad_rows_and_images_are_refused() -> None:
    images = _images(3, 8, 8)
    mat = _pixel_matrices(Augmenter(PRESETS["seed"]).sample(2, 8, 8), 8, 8)
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 3\)"):
        warp.warp_uint8(images, torch.tensor([0, 3]), mat, SCALE, SHIFT)
    with pytest.raises(IndexError):
        warp.warp_uint8(images, torch.tensor([-1, 0]), mat, SCALE, SHIFT)
    with pytest.raises(ValueError, match="uint8"):
        warp.warp_uint8(images.float(), torch.tensor([0, 1]), mat, SCALE, SHIFT)
    with pytest.raises(ValueError, match="2 matrices for 3 rows"):
        warp.warp_uint8(images, torch.tensor([0, 1, 2]), mat, SCALE, SHIFT)

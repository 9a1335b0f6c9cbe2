"""The augmentation settings as plain data: Keras-style geometric ranges, photometric ranges, and their presets.

Kept apart from the augmenters (geometric.py, photometric.py, which need torch) so that the config can validate a
preset name without importing torch or any other stage: config.py imports only this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GEOMETRIC_PRESETS", "PHOTOMETRIC_PRESETS", "AugmentParams", "PhotometricParams", "resolve_params",
           "resolve_photometric"]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges with Keras ``ImageDataGenerator`` meanings (degrees for rotation and shear)."""

    rotation_range: float = 0.0
    width_shift_range: float = 0.0  # < 1: fraction of the width, >= 1: pixels
    height_shift_range: float = 0.0  # < 1: fraction of the height, >= 1: pixels
    shear_range: float = 0.0  # degrees
    zoom_range: float = 0.0  # zx, zy ~ U[1-z, 1+z] independently
    horizontal_flip: bool = False
    erase_prob: float = 0.0  # probability of random erasing per sample (not in Keras; see the module docstring)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "horizontal_flip" and not float(getattr(self, f.name)) >= 0.0:
                raise ValueError(f"{f.name} must be a non-negative number, got {getattr(self, f.name)!r}")
        if self.zoom_range >= 1.0:
            raise ValueError(f"zoom_range must be < 1 (zoom factors stay positive), got {self.zoom_range}")
        if self.erase_prob > 1.0:
            raise ValueError(f"erase_prob is a probability, got {self.erase_prob}")

    def has_affine(self) -> bool:
        """True if any geometric range is non-zero (the flip alone needs no resampling)."""
        ranges = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range")
        return any(getattr(self, k) != 0 for k in ranges)

    def is_identity(self) -> bool:
        """True if augmentation would leave every image unchanged."""
        return not self.has_affine() and not self.horizontal_flip and self.erase_prob == 0


GEOMETRIC_PRESETS: dict[str, AugmentParams] = {
    "none": AugmentParams(),
    "seed": AugmentParams(
        rotation_range=10.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=5.0, zoom_range=0.1
    ),
    # Stronger, for bootstrap ensemble members (diversity between members).
    "intense": AugmentParams(
        rotation_range=20.0, width_shift_range=0.15, height_shift_range=0.15, shear_range=10.0, zoom_range=0.2
    ),
}


def resolve_params(preset: str | None = None, **overrides: float | bool) -> AugmentParams:
    """Preset (default: identity) with field overrides applied; unknown names raise ``ValueError``."""
    if preset is not None and preset not in GEOMETRIC_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {sorted(GEOMETRIC_PRESETS)}")
    base = GEOMETRIC_PRESETS[preset] if preset is not None else AugmentParams()
    names = {f.name for f in dataclasses.fields(AugmentParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown augmentation parameter(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PhotometricParams:
    """Ranges and probabilities of the photometric steps; the zero/one values disable a step."""

    gamma: float = 1.0  # g log-uniform in [1/gamma, gamma]
    contrast: float = 1.0  # c log-uniform in [1/contrast, contrast]
    brightness: float = 0.0  # b ~ U(-brightness, brightness), in [0, 1] intensity units
    p_curve: float = 1.0  # probability that gamma / window-level change a sample at all
    detail: tuple[float, float] = (0.0, 0.0)  # a ~ U(lo, hi); lo >= -1 (full blur), hi > 0 sharpens
    sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian sigma (pixels) of the detail step
    p_detail: float = 0.0
    noise: float = 0.0  # noise std ~ U(0, noise), [0, 1] intensity units
    p_noise: float = 0.0
    jpeg_quality: tuple[float, float] = (50.0, 95.0)  # q ~ U(lo, hi)
    p_jpeg: float = 0.0

    def __post_init__(self) -> None:
        if self.gamma < 1 or self.contrast < 1:
            raise ValueError("gamma and contrast are ranges [1/x, x]: they must be >= 1")
        if not self.detail[0] >= -1.0 or self.detail[0] > self.detail[1]:
            raise ValueError(f"detail must be (lo, hi) with -1 <= lo <= hi, got {self.detail}")
        if not 0 < self.sigma[0] <= self.sigma[1] <= 8:
            raise ValueError(f"sigma must be (lo, hi) with 0 < lo <= hi <= 8, got {self.sigma}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must be (lo, hi) within 1..100, got {self.jpeg_quality}")
        for name in ("brightness", "noise", "p_curve", "p_detail", "p_noise", "p_jpeg"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def is_identity(self) -> bool:
        curve = self.p_curve > 0 and (self.gamma > 1 or self.contrast > 1 or self.brightness > 0)
        detail = self.p_detail > 0 and self.detail != (0.0, 0.0)
        return not (curve or detail or (self.p_noise > 0 and self.noise > 0) or self.p_jpeg > 0)


PHOTOMETRIC_PRESETS: dict[str, PhotometricParams] = {
    "none": PhotometricParams(),
    # Differences between modern digital detectors of one kind: mild curves, some softening, light noise.
    "light": PhotometricParams(
        gamma=1.25, contrast=1.2, brightness=0.05, p_curve=0.8, detail=(-0.5, 0.5), sigma=(0.5, 1.5),
        p_detail=0.5, noise=0.02, p_noise=0.4, jpeg_quality=(50, 95), p_jpeg=0.3,
    ),
    # Only the grey-level curve (gamma, window/level), as strong as `strong`: the contrast shortcut of this
    # dataset without blurring or burying the fine opacities that separate viral pneumonia from normal.
    "curves": PhotometricParams(gamma=1.8, contrast=1.5, brightness=0.1, p_curve=0.9),
    # Film scans, phone photos of monitors, publication figures: strong curves, blur, noise, heavy JPEG.
    "strong": PhotometricParams(
        gamma=1.8, contrast=1.5, brightness=0.1, p_curve=0.9, detail=(-1.0, 1.0), sigma=(0.5, 2.5),
        p_detail=0.7, noise=0.05, p_noise=0.5, jpeg_quality=(15, 90), p_jpeg=0.5,
    ),
}


def resolve_photometric(preset: str, **overrides: object) -> PhotometricParams:
    """A named preset with optional field overrides; an unknown name is a one-line ValueError."""
    if preset not in PHOTOMETRIC_PRESETS:
        raise ValueError(f"unknown photometric preset {preset!r}; choose one of {', '.join(PHOTOMETRIC_PRESETS)}")
    return dataclasses.replace(PHOTOMETRIC_PRESETS[preset], **overrides)  # type: ignore[arg-type]

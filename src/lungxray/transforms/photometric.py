"""Photometric augmentation: the acquisition differences between hospitals, drawn per sample, batched.

Why: in small chest X-ray sets each class often comes from its own hospitals, so a network can separate the
classes by contrast curve, sharpness, noise or compression instead of by the lungs (DeGrave et al., 2021).
Randomising those properties during training makes them useless as a class cue. Geometry (rotation, shift,
zoom) is augment.py's job; this module runs after it, on the same normalised float batch.

Per sample, in [0, 1] intensity space (the batch is un-normalised with the input contract's mean/std and
normalised back at the end), in this order:

* gamma ``x ** g``, g log-uniform in [1/gamma, gamma] (film and detector characteristic curves);
* window/level ``(x - 0.5) * c + 0.5 + b``, c log-uniform in [1/contrast, contrast], b ~ U(-brightness, brightness);
* detail ``x + a * (x - blur_sigma(x))``: a < 0 blurs (a = -1 is a full Gaussian blur), a > 0 sharpens
  (unsharp masking): the modulation transfer function of different detectors and post-processing;
* additive Gaussian noise (quantum and electronic noise);
* JPEG round trip at quality q: 8x8 block DCT, the IJG luminance table scaled for q, rounding (re-compressed
  publication figures and PACS exports).

Each step fires with its own probability; parameters are drawn on the CPU from the augmenter's own seeded
generator (never the global RNG), so a seed gives the same augmentations on any device.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from lungxray.runtime import INPUT_MEAN, INPUT_STD
from lungxray.transforms.params import PHOTOMETRIC_PRESETS as PRESETS
from lungxray.transforms.params import PhotometricParams, resolve_photometric

__all__ = ["PRESETS", "PhotometricAugmenter", "PhotometricParams", "jpeg_roundtrip", "make_photometric",
           "resolve_photometric"]

log = logging.getLogger(__name__)


# IJG standard luminance quantisation table (JPEG Annex K), the base of every libjpeg quality setting.
_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=torch.float32)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D: coefficients = D @ block @ D.T."""
    k, i = torch.arange(n).view(-1, 1).double(), torch.arange(n).view(1, -1).double()
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def jpeg_tables(quality: torch.Tensor) -> torch.Tensor:
    """Quality (N,) in 1..100 -> quantisation tables (N, 8, 8), libjpeg's scaling with baseline clipping."""
    q = quality.clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = torch.floor((_JPEG_LUMA.to(q.device) * scale.view(-1, 1, 1) + 50.0) / 100.0)
    return tables.clamp(1, 255)


def jpeg_roundtrip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Lossy JPEG luminance round trip of [0, 1] images (N, C, H, W), one quality per sample (N,).

    Close to a real encoder's pixel error (no chroma, no entropy coding, which is lossless); edges are padded by
    replication to whole 8x8 blocks as encoders do. The block DCT is a pixel-unshuffle and one (64 x 64) matrix
    product with the 2-D basis (and back with its transpose): on a CPU far faster than batched 8x8 products.
    """
    n, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    y = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
    hh, ww = y.shape[-2:]
    d = _dct_matrix().to(x.device, torch.float32)
    basis = torch.kron(d, d)  # (64, 64): coefficient (u, v) of a flattened block b is basis[8u+v] @ b
    blocks = F.pixel_unshuffle(y.float().reshape(n * c, 1, hh, ww) * 255.0 - 128.0, 8)  # (N*C, 64, bh, bw)
    coef = torch.einsum("kp,bphw->bkhw", basis, blocks)
    table = jpeg_tables(quality.to(x.device, torch.float32)).repeat_interleave(c, 0).view(n * c, 64, 1, 1)
    coef = torch.round(coef / table) * table
    out = F.pixel_shuffle(torch.einsum("kp,bkhw->bphw", basis, coef), 8).view(n, c, hh, ww)
    return ((out + 128.0) / 255.0)[..., :h, :w].clamp(0, 1).to(x.dtype)


def _blur_matrices(sigma: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """(N, size, size) row-stochastic Gaussian smoothing matrices with replicate ("nearest") edges."""
    radius = max(1, min(math.ceil(3.0 * float(sigma.max())), size - 1))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    s = sigma.to(device, torch.float32).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 2r+1)
    cols = (torch.arange(size, device=device).view(-1, 1) + t.long().view(1, -1)).clamp(0, size - 1)  # (S, 2r+1)
    m = torch.zeros(len(sigma), size, size, device=device)
    m.scatter_add_(2, cols.expand(len(sigma), -1, -1), k.view(-1, 1, 2 * radius + 1).expand(-1, size, -1))
    return m


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with one sigma (pixels) per sample, replicate edges.

    Written as two batched matrix products (rows, then columns) with banded smoothing matrices: one call for
    any mix of sigmas, which grouped 1-D convolutions on a CPU do several times slower.
    """
    n, c, h, w = x.shape
    mh = _blur_matrices(sigma, h, x.device).repeat_interleave(c, 0)  # (N*C, H, H)
    mw = mh if w == h else _blur_matrices(sigma, w, x.device).repeat_interleave(c, 0)
    y = torch.bmm(torch.bmm(mh, x.float().reshape(n * c, h, w)), mw.transpose(1, 2))
    return y.view(n, c, h, w).to(x.dtype)


def _log_uniform(u: torch.Tensor, limit: float) -> torch.Tensor:
    return torch.exp((2.0 * u - 1.0) * math.log(limit))


class PhotometricAugmenter:
    """Random photometric changes of normalised float batches (N, C, H, W); owns its seeded generator.

    `set_epoch(e)` reseeds the generator from (seed, e), so that a training run resumed after epoch e draws
    exactly what an uninterrupted run would, without the checkpoint having to store this generator.
    """

    def __init__(self, params: PhotometricParams, seed: int = 0, device: str | torch.device = "cpu",
                 mean: float = INPUT_MEAN, std: float = INPUT_STD) -> None:
        self.params, self.seed = params, int(seed)
        self.device = torch.device(device)
        self.mean, self.std = float(mean), float(std)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Reseed from (seed, epoch): draws depend only on them, never on how many batches came before."""
        state = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(2, dtype=np.uint32)
        self.generator.manual_seed(int(state[0]) << 32 | int(state[1]))

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Per-sample parameters (CPU, float32), a fixed number of draws per call; disabled steps are identity."""
        pr = self.params
        u = torch.rand((n, 11), generator=self.generator, dtype=torch.float64)
        curve = u[:, 0] < pr.p_curve
        one = torch.ones(n, dtype=torch.float64)
        out = {
            "gamma": torch.where(curve, _log_uniform(u[:, 1], pr.gamma), one),
            "contrast": torch.where(curve, _log_uniform(u[:, 2], pr.contrast), one),
            "brightness": torch.where(curve, (2 * u[:, 3] - 1) * pr.brightness, 0 * one),
            "detail": torch.where(u[:, 4] < pr.p_detail, pr.detail[0] + u[:, 5] * (pr.detail[1] - pr.detail[0]),
                                  0 * one),
            "sigma": pr.sigma[0] + u[:, 6] * (pr.sigma[1] - pr.sigma[0]),
            "noise": torch.where(u[:, 7] < pr.p_noise, u[:, 8] * pr.noise, 0 * one),
            "jpeg": torch.where(  # quality 0 = no JPEG round trip
                u[:, 9] < pr.p_jpeg, pr.jpeg_quality[0] + u[:, 10] * (pr.jpeg_quality[1] - pr.jpeg_quality[0]), 0 * one
            ),
        }
        return {k: v.float() for k, v in out.items()}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """Transform a normalised batch with parameters from `sample`; `noise` is a unit normal field like x."""
        if x.ndim != 4 or not x.is_floating_point():
            raise TypeError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
        n = x.shape[0]
        if p["gamma"].shape != (n,):
            raise ValueError(f"parameters are for {tuple(p['gamma'].shape)} samples, batch has {n}")
        q = {k: v.to(x.device, torch.float32).view(n, 1, 1, 1) for k, v in p.items()}
        y = (x.float() * self.std).add_(self.mean).clamp_(1e-6, 1)  # [0, 1] intensities; in place = fewer passes
        # y ** gamma as exp(gamma log y): pow_ by a per-image exponent ran scalar, 96 of this function's 147 ms on
        # the reference's batch (2 Zen 3 cores); log_/exp_ are vectorised (~2e-6 relative difference, at y ~ 1e-6)
        y.log_().mul_(q["gamma"]).exp_()
        y.sub_(0.5).mul_(q["contrast"]).add_(0.5 + q["brightness"]).clamp_(0, 1)
        use_detail = p["detail"] != 0
        if bool(use_detail.any()):  # only the selected samples are blurred: the costliest step
            sel = use_detail.nonzero().squeeze(1).to(x.device)
            ys = y[sel]
            ys = (ys + q["detail"][sel] * (ys - gaussian_blur(ys, p["sigma"].to(x.device)[sel]))).clamp(0, 1)
            y = y.index_copy(0, sel, ys)
        if noise is not None and bool((p["noise"] > 0).any()):
            y = (y + q["noise"] * noise.to(x.device, torch.float32)).clamp(0, 1)
        use_jpeg = p["jpeg"] > 0
        if bool(use_jpeg.any()):
            sel = use_jpeg.nonzero().squeeze(1).to(x.device)
            y = y.index_copy(0, sel, jpeg_roundtrip(y[sel], p["jpeg"].to(x.device)[sel]))
        return y.sub_(self.mean).div_(self.std).to(x.dtype)  # y is never x: in place is safe

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sample and apply; identity params return `x` itself without drawing random numbers."""
        if self.params.is_identity():
            return x
        p = self.sample(x.shape[0])
        noise = None
        if bool((p["noise"] > 0).any()):
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
        return self.apply(x, p, noise)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))


def make_photometric(preset: str, seed: int = 0, device: str | torch.device = "cpu") -> PhotometricAugmenter | None:
    """The augmenter for a config's `augment.photometric`, or None for "none" (training skips the step)."""
    params = resolve_photometric(preset)
    if params.is_identity():
        return None
    log.info("photometric augmentation %r: %s", preset, params)
    return PhotometricAugmenter(params, seed=seed, device=device)

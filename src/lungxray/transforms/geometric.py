"""Keras-compatible random affine + horizontal flip, per sample, batched, on the batch's device.

Semantics follow ``keras.preprocessing.image.ImageDataGenerator`` as shipped in Keras 3
(``keras/src/legacy/preprocessing/image.py``: ``get_random_transform``, ``apply_affine_transform``,
``transform_matrix_offset_center``) so that the seed project's parameters mean the same thing here:

* the matrix is built in (x, y) = (column, row) order as ``R(theta) @ T(tx, ty) @ Shear @ Zoom(zx, zy)``,
  moved to the image centre and then swapped to (row, col), mapping OUTPUT pixel coordinates to INPUT ones
  (scipy ``affine_transform`` convention), sampled bilinearly (order=1) with ``fill_mode="nearest"``;
* angles (rotation AND shear) are in degrees; zx and zy are drawn independently from [1-z, 1+z];
* a horizontal flip (p=0.5) is applied after the affine transform.

Two deliberate deviations, both invisible for the square images this project uses:

* Keras 3 feeds ``height_shift_range * height`` into ``tx``, which (after its x/y swap) moves the image
  horizontally (keras-preprocessing issue #348). Here ``width_shift_range`` moves columns and
  ``height_shift_range`` rows, as the names and the docs say; the distributions agree when both are equal.
* Keras centres on (h/2 - 0.5) for x and (w/2 - 0.5) for y, which is off-centre for non-square images; here
  the centre is ((W-1)/2, (H-1)/2), identical for H == W.

Horizontal flips put the heart on the wrong side of the chest, so no preset enables them: whether they
help is a question for the study, not a default to inherit from the seed.

One addition Keras's generator lacks, off in every preset: random erasing (Zhong et al., AAAI 2020), after the
flip. With probability ``erase_prob`` a sample gets one rectangle covering 2-40% of the image, aspect ratio
log-uniform in [0.3, 1/0.3], filled with one uniform random grey level. Why: a network that can rely on one
region (a marker, one lung) must learn to use the rest when that region is hidden.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from lungxray.models.kernels.warp import warp_available, warp_uint8
from lungxray.runtime import INPUT_MEAN, INPUT_STD, normalize
from lungxray.transforms.params import GEOMETRIC_PRESETS as PRESETS
from lungxray.transforms.params import AugmentParams, resolve_params

__all__ = ["PRESETS", "AugmentParams", "Augmenter", "keras_transform_matrix", "resolve_params"]

log = logging.getLogger(__name__)

_KEYS = ("theta", "tx", "ty", "shear", "zx", "zy")
ERASE_AREA = (0.02, 0.4)  # fraction of the image a random-erasing rectangle covers (Zhong et al.'s defaults)
ERASE_ASPECT = 0.3  # height/width ratio log-uniform in [ERASE_ASPECT, 1 / ERASE_ASPECT]


def _xy_matrices(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keras's un-centred matrix R @ T @ Shear @ Zoom in (x, y) order: linear part (N,2,2), shift (N,2)."""
    th, sh = torch.deg2rad(p["theta"]), torch.deg2rad(p["shear"])
    c, s = torch.cos(th), torch.sin(th)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (N, 2, 2)
    shear = torch.stack([torch.stack([one, -torch.sin(sh)], -1), torch.stack([zero, torch.cos(sh)], -1)], -2)
    zoom = torch.diag_embed(torch.stack([p["zx"], p["zy"]], -1))
    lin = rot @ shear @ zoom
    shift = (rot @ torch.stack([p["tx"], p["ty"]], -1).unsqueeze(-1)).squeeze(-1)  # R @ T's translation
    return lin, shift


def _no_geometry(q: dict[str, torch.Tensor]) -> bool:
    """Whether no sample rotates, shifts, shears or zooms."""
    trivial = [q[k] == 0 for k in ("theta", "tx", "ty", "shear")] + [q[k] == 1 for k in ("zx", "zy")]
    return bool(torch.stack(trivial).all())


def _pixel_matrices(p: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
    """(N, 2, 3) float64: output (column j, row i, 1) -> input (column, row), about the centre, flips folded in.

    A flip after the transform reads output column W-1-j, which about the centre is -(j - cx): the matrices' j
    column changes sign.
    """
    q = {k: p[k].to("cpu", torch.float64) for k in _KEYS}
    lin, shift = _xy_matrices(q)
    sign = torch.where(p["flip"].to("cpu"), -1.0, 1.0).to(torch.float64)
    lin = torch.stack([lin[:, :, 0] * sign[:, None], lin[:, :, 1]], -1)
    centre = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64)
    offset = shift + centre - (lin @ centre)  # input = lin @ (out - c) + shift + c
    return torch.cat([lin, offset.unsqueeze(-1)], -1)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, h, w), align_corners=True)``, written straight into the output.

    The grid is separable (x-term + y-term), so two broadcast adds fill it; on 2 CPU cores this measured
    about 2x faster than ``affine_grid``, which materialises an (N, H, W, 3) base grid and runs a bmm.
    """
    xs = torch.linspace(-1.0, 1.0, w, device=theta.device, dtype=theta.dtype).view(1, 1, w)
    ys = torch.linspace(-1.0, 1.0, h, device=theta.device, dtype=theta.dtype).view(1, h, 1)
    t = theta.reshape(-1, 6, 1, 1)
    grid = torch.empty(theta.shape[0], h, w, 2, device=theta.device, dtype=theta.dtype)  # (N, H, W, 2)
    torch.add(t[:, 0] * xs, t[:, 1] * ys + t[:, 2], out=grid[..., 0])
    torch.add(t[:, 3] * xs, t[:, 4] * ys + t[:, 5], out=grid[..., 1])
    return grid


def keras_transform_matrix(
    theta_deg: float, tx: float, ty: float, shear_deg: float, zx: float, zy: float, height: int, width: int
) -> np.ndarray:
    """3x3 (row, col) matrix mapping output to input pixel coordinates, as Keras hands it to scipy.

    ``tx`` shifts columns (x), ``ty`` rows (y); ``zx`` scales columns, ``zy`` rows. Feed ``m[:2, :2]`` and
    ``m[:2, 2]`` to ``scipy.ndimage.affine_transform(order=1, mode="nearest")`` to get Keras's output.
    """
    vals = (theta_deg, tx, ty, shear_deg, zx, zy)
    p = {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in zip(_KEYS, vals, strict=True)}
    lin, shift = _xy_matrices(p)
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = lin[0].numpy(), shift[0].numpy()
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    offset, reset = np.eye(3), np.eye(3)
    offset[:2, 2], reset[:2, 2] = (cx, cy), (-cx, -cy)
    m = offset @ m @ reset  # about the centre, (x, y) order
    perm = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return perm @ m @ perm  # (row, col) order


class Augmenter:
    """Batched random augmentation. Owns its seeded ``torch.Generator``, never touches global RNG.

    Parameters are drawn on the CPU (so a seed gives the same augmentations on any device) and the resampling
    runs as one affine grid + one ``grid_sample`` call on the batch's own device (no per-image loop); training
    batches of uint8 images on the CPU go through :meth:`apply_gathered`, one C pass where the kernel is available.
    """

    def __init__(self, params: AugmentParams, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.params = params
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        log.debug("Augmenter(%s, seed=%d, device=%s)", params, seed, self.device)

    def sample(self, n: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Per-sample parameters: theta, shear (degrees), tx, ty (pixels; tx columns), zx, zy, flip (bool).

        With ``erase_prob > 0`` also the erased rectangle (``erase``: (N, 5) = top, left, height, width in
        pixels, fill in [0, 1]; height 0 = not erased), drawn after the affine ones so that they stay unchanged.
        """
        pr = self.params
        u = torch.rand((n, 7), generator=self.generator, dtype=torch.float64)  # fixed draw count per call
        sym = 2.0 * u[:, :6] - 1.0  # U[-1, 1)
        wshift = pr.width_shift_range * (width if pr.width_shift_range < 1 else 1.0)
        hshift = pr.height_shift_range * (height if pr.height_shift_range < 1 else 1.0)
        out = {
            "theta": sym[:, 0] * pr.rotation_range,
            "tx": sym[:, 1] * wshift,
            "ty": sym[:, 2] * hshift,
            "shear": sym[:, 3] * pr.shear_range,
            "zx": 1.0 + sym[:, 4] * pr.zoom_range,
            "zy": 1.0 + sym[:, 5] * pr.zoom_range,
            "flip": (u[:, 6] < 0.5) & pr.horizontal_flip,
        }
        if pr.erase_prob > 0:
            out["erase"] = self._sample_erase(n, height, width)
        return {k: v.to(self.device) for k, v in out.items()}

    def _sample_erase(self, n: int, height: int, width: int) -> torch.Tensor:
        u = torch.rand((n, 6), generator=self.generator, dtype=torch.float64)
        area = (ERASE_AREA[0] + u[:, 1] * (ERASE_AREA[1] - ERASE_AREA[0])) * height * width
        aspect = torch.exp((2.0 * u[:, 2] - 1.0) * np.log(ERASE_ASPECT))
        eh = torch.sqrt(area * aspect).round().clamp(1, height)
        ew = torch.sqrt(area / aspect).round().clamp(1, width)
        top = torch.floor(u[:, 3] * (height - eh + 1))
        left = torch.floor(u[:, 4] * (width - ew + 1))
        eh = torch.where(u[:, 0] < self.params.erase_prob, eh, torch.zeros_like(eh))
        return torch.stack([top, left, eh, ew, u[:, 5]], -1)

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Transform ``x`` (N, C, H, W) with parameters ``p`` from :meth:`sample`; deterministic.

        If no sample has any geometric change (e.g. flip-only params) the resampling is skipped, so pixels
        stay bit-exact (and ``x`` itself comes back when nothing is flipped either).
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise TypeError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
        n, _, h, w = x.shape
        if h < 2 or w < 2:
            raise ValueError(f"images must be at least 2x2, got {h}x{w}")
        if p["theta"].shape != (n,):
            raise ValueError(f"parameters are for {tuple(p['theta'].shape)} samples, batch has {n}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        q = {k: p[k].to(device=x.device, dtype=work) for k in _KEYS}
        if _no_geometry(q):  # keep pixels bit-exact
            flipped = self._flip(x, p)
            return self._erase(flipped, p, owned=flipped is not x)
        lin, shift = _xy_matrices(q)  # (N,2,2), (N,2) in pixels about the centre
        # Pixels -> align_corners=True normalised coords: u = D @ (x - centre), D = diag(2/(W-1), 2/(H-1)).
        d = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], device=x.device, dtype=work)
        theta = torch.cat([lin * d[:, None] / d[None, :], (shift * d).unsqueeze(-1)], -1)  # (N, 2, 3)
        grid = _affine_grid(theta, h, w)  # (N, H, W, 2)
        y = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="border", align_corners=True)
        y = y.to(x.dtype)
        return self._erase(self._flip(y, p), p, owned=True)  # grid_sample made y

    def apply_gathered(self, images: torch.Tensor, index: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """``apply(normalize(images[index]).unsqueeze(1), p)`` for uint8 (N, H, W) images, as (n, 1, H, W).

        On the CPU with the warp kernel (csrc/warp.c) the gather, the conversion, the resampling and the flip
        are one pass over the uint8 images, where the float path makes four (docs/performance.md, "the
        augmentation's resampling in one pass"); the values agree up to float rounding.
        """
        h, w = images.shape[-2:]
        if p["theta"].shape != index.shape:
            raise ValueError(f"parameters are for {tuple(p['theta'].shape)} samples, index has {tuple(index.shape)}")
        fast = images.dtype == torch.uint8 and images.device.type == "cpu" and h >= 2 and w >= 2
        if not fast or _no_geometry(p) or not warp_available():
            return self.apply(normalize(images[index]).unsqueeze(1), p)
        scale, shift = 1.0 / (255.0 * INPUT_STD), -INPUT_MEAN / INPUT_STD
        y = warp_uint8(images, index, _pixel_matrices(p, h, w), scale, shift)
        return self._erase(y, p, owned=True)

    @staticmethod
    def _flip(y: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        flip = p["flip"].to(y.device)
        if not bool(flip.any()):
            return y
        return torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)

    @staticmethod
    def _erase(y: torch.Tensor, p: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        """Fill each chosen sample's rectangle with its grey level (normalised like the batch).

        One slice write per erased sample, in place when `y` is a tensor this call made (`owned`): a mask over
        the whole batch measured ~6% of a training step on 2 cores, the slice writes under 1%.
        """
        boxes = [(i, box) for i, box in enumerate(p["erase"].tolist()) if box[2] > 0] if "erase" in p else []
        if not boxes:
            return y
        out = y if owned else y.clone()
        for i, (top, left, height, width, grey) in boxes:
            t, l_ = int(top), int(left)
            out[i, :, t : t + int(height), l_ : l_ + int(width)] = (grey - INPUT_MEAN) / INPUT_STD
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sample and apply; identity params return ``x`` itself without drawing random numbers."""
        if self.params.is_identity():
            return x
        return self.apply(x, self.sample(x.shape[0], x.shape[-2], x.shape[-1]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator state, so that a resumed run draws the same augmentations."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))

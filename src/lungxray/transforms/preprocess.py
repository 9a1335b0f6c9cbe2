"""Per-image preprocessing after decoding, part of each model's input contract.

Decoded images (uint8, S x S) pass through the same steps in training, prediction, export tests and the server:
an optional border crop (hides film edges, rulers and burned-in text that identify the source hospital) and an
optional standardisation: "lungs" (crop to the lung field, found without any model, so every hospital's framing
looks alike) and/or an intensity method (so a different detector's contrast curve looks alike), joined by "+"
as in "lungs+clahe".
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

STANDARDIZE_METHODS = ("none", "equalize", "clahe", "lungs", "lungs+equalize", "lungs+clahe")


def equalize(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of one uint8 image."""
    hist = np.bincount(image.ravel(), minlength=256)
    cdf = hist.cumsum()
    nonzero = cdf[cdf > 0]
    lo = nonzero[0] if len(nonzero) else 0
    denom = max(int(cdf[-1] - lo), 1)
    lut = np.clip(np.round((cdf - lo) * 255.0 / denom), 0, 255).astype(np.uint8)
    return lut[image]


def clahe(image: np.ndarray, tiles: int = 8, clip: float = 2.0) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (tile LUTs, bilinear blend), numpy only."""
    h, w = image.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    padded = np.pad(image, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles, tiles, -1)
    limit = max(1, int(clip * th * tw / 256))
    luts = np.empty((tiles, tiles, 256), dtype=np.float32)
    for i in range(tiles):
        for j in range(tiles):
            hist = np.bincount(blocks[i, j], minlength=256)
            excess = np.maximum(hist - limit, 0).sum()
            hist = np.minimum(hist, limit) + excess // 256
            cdf = hist.cumsum()
            luts[i, j] = cdf * 255.0 / max(cdf[-1], 1)
    # Bilinear interpolation between the LUTs of the four nearest tile centres.
    ys = (np.arange(h) + 0.5) / th - 0.5
    xs = (np.arange(w) + 0.5) / tw - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, tiles - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, tiles - 1)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    fy = np.clip(ys - y0, 0, 1)[:, None]
    fx = np.clip(xs - x0, 0, 1)[None, :]
    v = image.astype(np.intp)

    def lut(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return luts[a[:, None], b[None, :], v]

    out = (1 - fy) * ((1 - fx) * lut(y0, x0) + fx * lut(y0, x1)) + fy * ((1 - fx) * lut(y1, x0) + fx * lut(y1, x1))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def crop_border(image: np.ndarray, fraction: float) -> np.ndarray:
    """Cut `fraction` of the size from every edge and resize back to the original size."""
    if fraction <= 0:
        return image
    h, w = image.shape
    dy, dx = round(h * fraction), round(w * fraction)
    inner = Image.fromarray(image[dy : h - dy, dx : w - dx])
    return np.asarray(inner.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def lung_field_box(image: np.ndarray, margin: float = 0.08) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the lung field with a margin, or None when no plausible pair of lungs shows.

    Classical, model-free: the lungs are the large dark regions of the histogram-equalised, smoothed image that
    lie away from the edges (a 6% band is ignored: film borders, background air) near the chest's centre. The
    box is made symmetric about the vertical midline, so a lung hidden by consolidation still gets its side.
    """
    h, w = image.shape
    smooth = ndi.gaussian_filter(equalize(image).astype(np.float32), 3.0 * h / 256)
    dark = smooth < np.percentile(smooth, 35)
    b = max(1, round(0.06 * h))
    dark[:b] = dark[-b:] = False
    dark[:, :b] = dark[:, -b:] = False
    k = max(3, round(7 * h / 256))
    dark = ndi.binary_opening(dark, np.ones((k, k), dtype=bool))
    labels, n = ndi.label(dark)
    if n == 0:
        return None
    index = np.arange(1, n + 1)
    sizes = ndi.sum(dark, labels, index)
    centres = ndi.center_of_mass(dark, labels, index)
    lungs = sorted(((size, i) for size, i, (cy, cx) in zip(sizes, index, centres, strict=True)
                    if size > 0.015 * h * w and 0.15 * h < cy < 0.8 * h and 0.12 * w < cx < 0.88 * w), reverse=True)
    if not lungs:
        return None
    ys, xs = np.nonzero(np.isin(labels, [i for _, i in lungs[:2]]))
    top, bottom = int(ys.min()), int(ys.max())
    left, right = min(int(xs.min()), w - 1 - int(xs.max())), max(int(xs.max()), w - 1 - int(xs.min()))
    if right - left < 0.45 * w or bottom - top < 0.3 * h:
        return None
    my, mx = round(margin * (bottom - top)), round(margin * (right - left))
    return max(0, top - my), min(h, bottom + my + 1), max(0, left - mx), min(w, right + mx + 1)


def crop_lungs(image: np.ndarray, fallback: float = 0.08) -> np.ndarray:
    """The lung field (see `lung_field_box`) resized to the image size; a fixed border crop when none is found."""
    box = lung_field_box(image)
    if box is None:
        return crop_border(image, fallback)
    top, bottom, left, right = box
    h, w = image.shape
    inner = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
    return np.asarray(inner.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def prepare(images: np.ndarray, standardize: str = "none", border: float = 0.0) -> np.ndarray:
    """Apply the contract's preprocessing to uint8 images of shape (N, S, S) or (S, S)."""
    if standardize not in STANDARDIZE_METHODS:
        raise ValueError(f"unknown standardisation {standardize!r} (known: {', '.join(STANDARDIZE_METHODS)})")
    if standardize == "none" and border <= 0:
        return images
    single = images.ndim == 2
    batch = images[None] if single else images
    steps = [{"lungs": crop_lungs, "equalize": equalize, "clahe": clahe}[name]
             for name in standardize.split("+") if name != "none"]

    def one(img: np.ndarray) -> np.ndarray:
        img = crop_border(img, border)
        for step in steps:
            img = step(img)
        return img

    out = np.stack([one(img) for img in batch])
    return out[0] if single else out

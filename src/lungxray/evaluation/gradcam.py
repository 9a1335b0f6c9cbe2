"""Grad-CAM saliency for every registered architecture, per member and averaged over a packed ensemble.

Why: models trained on this kind of dataset are known to read the hospital (border, text markers, laterality
tags) instead of the lungs (DeGrave et al., 2021). A heatmap per prediction, and one number summarising where
the saliency lies (`central_mass`), is how a user notices.

Maths (Selvaraju et al., 2017), per member k of a packed net: A = the member's own C channels of
`model.features(x)` (B, K*C, h, w); alpha_c = spatial mean of d score_k / d A_c, where score_k is member k's logit
of the target class; cam_k = ReLU(sum_c alpha_c A_c), bilinearly upsampled to the input size and min-max
normalised to [0, 1]. Members are independent (grouped convolutions, per-member heads), so one backward pass of
the summed scores gives every member its own gradient. The ensemble's heatmap is the mean of the normalised
member heatmaps (so it lies in [0, 1] but peaks below 1 where members disagree on where to look).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lungxray.io.decode import ImageDecodeError
from lungxray.models.nets import PackedNet
from lungxray.runtime import normalize

if TYPE_CHECKING:
    from lungxray.inference.predictor import Predictor

log = logging.getLogger(__name__)

__all__ = ["central_mass", "gradcam", "member_gradcam", "overlay", "overlay_png", "saliency_summary", "write_cams"]

CENTRAL_MARGIN = 0.15
GALLERY_SIZE = 12
GALLERY_MAX = 24  # all misclassified images are shown, up to this many


def _check_images(predictor: Predictor, images: np.ndarray, target: np.ndarray | None) -> np.ndarray | None:
    size = int(predictor.meta["input"]["size"])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"gradcam expects uint8 images of shape (N, {size}, {size}), got {desc}")
    if images.shape[1:] != (size, size):
        raise ValueError(f"gradcam: this model takes {size}x{size} images, got {images.shape[1]}x{images.shape[2]}")
    if target is None:
        return None
    t = np.asarray(target)
    n_classes = len(predictor.classes)
    if t.shape != (len(images),) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"gradcam: target must be {len(images)} integer class indices, got shape {t.shape}")
    if len(t) and (t.min() < 0 or t.max() >= n_classes):
        raise ValueError(f"gradcam: target class indices must lie in [0, {n_classes - 1}]")
    return t.astype(np.int64)


def _packed(predictor: Predictor) -> PackedNet:
    """The bundle's network; Grad-CAM needs the `features` / `head` split every registered model has."""
    model = predictor.bundle.model
    if not (hasattr(model, "features") and hasattr(model, "head") and hasattr(model, "members")):
        raise TypeError(f"gradcam needs a model with features()/head() (a PackedNet), got {type(model).__name__}")
    return cast(PackedNet, model)


def _normalise(cams: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the last two dims; a flat map (no positive evidence) becomes all zeros."""
    lo = cams.amin(dim=(-2, -1), keepdim=True)
    span = cams.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 1e-12, (cams - lo) / span.clamp_min(1e-12), torch.zeros_like(cams))


def _member_cams_batch(predictor: Predictor, batch: np.ndarray, target: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """uint8 (B, S, S) -> (member cams float32 (B, K, S, S), targets (B,)) for one batch."""
    model, contract, dev = _packed(predictor), predictor.meta["input"], predictor.device
    k = int(model.members)
    x = torch.as_tensor(batch, device=dev)
    x = normalize(x, contract["mean"], contract["std"]).unsqueeze(1).expand(-1, k, -1, -1)  # (B, K, S, S)
    with torch.no_grad():
        feats = model.features(x.contiguous()).float()  # (B, K*C, h, w)
    feats = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(feats).float()  # (B, K, classes)
        # default target: the ensemble's prediction, the argmax of the mean member softmax
        t = logits.detach().softmax(-1).mean(1).argmax(-1) if target is None else torch.as_tensor(target, device=dev)
        scores = logits.gather(2, t.view(-1, 1, 1).expand(-1, k, 1))  # (B, K, 1)
        (grads,) = torch.autograd.grad(scores.sum(), feats)
    b, kc, h, w = feats.shape
    a = feats.detach().view(b, k, kc // k, h, w)
    alpha = grads.view(b, k, kc // k, h, w).mean(dim=(3, 4), keepdim=True)  # (B, K, C, 1, 1)
    cams = F.relu((alpha * a).sum(2))  # (B, K, h, w)
    size = batch.shape[-1]
    cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)
    return _normalise(cams).cpu().numpy().astype(np.float32), t.cpu().numpy()


def _run(predictor: Predictor, images: np.ndarray, target: np.ndarray | None,
         batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All images in batches, in eval mode and fp32, leaving the model exactly as found (mode, flags, .grad)."""
    target = _check_images(predictor, images, target)
    model = _packed(predictor)
    k, size = int(model.members), images.shape[-1]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    cams, targets = [np.zeros((0, k, size, size), np.float32)], [np.zeros(0, np.int64)]
    try:
        model.eval()
        for p in params:  # gradients are only needed w.r.t. the feature map, never the weights
            p.requires_grad_(False)
        for start in range(0, len(images), batch_size):
            sel = slice(start, start + batch_size)
            c, t = _member_cams_batch(predictor, images[sel], None if target is None else target[sel])
            cams.append(c)
            targets.append(t)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return np.concatenate(cams), np.concatenate(targets)


def member_gradcam(predictor: Predictor, images: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Per-member heatmaps float32 (N, K, S, S) in [0, 1]; `target` defaults to the ensemble's prediction."""
    return _run(predictor, images, target)[0]


def gradcam(predictor: Predictor, images: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Heatmaps float32 (N, S, S) in [0, 1] for preprocessed uint8 images (N, S, S) (`predictor.preprocess`).

    `target` holds class indices (default: the predicted class). For an ensemble it is the mean of the members'
    heatmaps, each computed for the same target class.
    """
    return member_gradcam(predictor, images, target).mean(axis=1)


def central_mass(cams: np.ndarray, margin: float = CENTRAL_MARGIN) -> np.ndarray:
    """Per image, the fraction of saliency inside the image minus a `margin` band on every edge.

    A model reading borders, corners or burned-in text scores near 0; a uniform map scores (1 - 2*margin)^2
    (0.49 at the default margin). An all-zero map has no mass and gives NaN.
    """
    c = np.asarray(cams, dtype=np.float64)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3:
        raise ValueError(f"central_mass expects heatmaps (N, H, W) or (H, W), got shape {np.shape(cams)}")
    if not 0 <= margin < 0.5:
        raise ValueError(f"central_mass: margin must lie in [0, 0.5), got {margin}")
    h, w = c.shape[1:]
    dy, dx = round(h * margin), round(w * margin)
    total = c.sum(axis=(1, 2))
    inner = c[:, dy : h - dy, dx : w - dx].sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inner / np.where(total > 0, total, 1.0), np.nan)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB (S, S, 3): the grayscale X-ray with the heatmap (jet colormap) blended in at `alpha`."""
    from matplotlib import colormaps

    image, cam = np.asarray(image), np.asarray(cam, dtype=np.float32)
    if image.ndim != 2 or cam.shape != image.shape:
        raise ValueError(f"overlay expects a grayscale image (S, S) and a heatmap of the same shape, "
                         f"got {image.shape} and {cam.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay: alpha must lie in [0, 1], got {alpha}")
    gray = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else max(float(image.max()), 1e-12))
    heat = colormaps["jet"](np.clip(np.nan_to_num(cam), 0, 1))[..., :3].astype(np.float32)  # (S, S, 3)
    rgb = (1 - alpha) * np.repeat(gray[..., None], 3, axis=2) + alpha * heat
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
    """`overlay` encoded as PNG bytes (for files and HTTP responses)."""
    buf = io.BytesIO()
    Image.fromarray(overlay(image, cam, alpha), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def cam_names(paths: Sequence[str | Path]) -> list[str]:
    """`<stem>_cam.png` per path; colliding stems get `-2`, `-3`, ... so no file overwrites another."""
    used: set[str] = set()
    names = []
    for p in paths:
        stem, n = Path(p).stem, 1
        name = f"{stem}_cam.png"
        while name in used:
            n += 1
            name = f"{stem}-{n}_cam.png"
        used.add(name)
        names.append(name)
    return names


def write_cams(predictor: Predictor, paths: Sequence[str | Path], out_dir: str | Path,
               batch_size: int = 16) -> dict[str, Path]:
    """Write `out_dir/<stem>_cam.png` (overlay of the predicted class) per readable image; {path: png}."""
    from lungxray.io.files import write_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    names = cam_names(paths)
    for start in range(0, len(paths), batch_size):
        chunk = list(zip(paths[start : start + batch_size], names[start : start + batch_size], strict=True))
        good, images = [], []
        for p, name in chunk:
            try:
                images.append(predictor.preprocess(p, name=str(p)))
                good.append((p, name))
            except (ImageDecodeError, OSError) as exc:
                log.warning("no saliency map for %s: %s", p, exc)
        if not good:
            continue
        batch = np.stack(images)
        for (p, name), img, cam in zip(good, batch, gradcam(predictor, batch), strict=True):
            written[str(p)] = write_bytes(out_dir / name, overlay_png(img, cam))
    return written


def gallery_indices(y_true: np.ndarray, y_pred: np.ndarray, n: int = GALLERY_SIZE,
                    limit: int = GALLERY_MAX) -> np.ndarray:
    """Every misclassified image (up to `limit`), then correct ones round-robin over classes up to `n`."""
    wrong = np.flatnonzero(y_true != y_pred)[:limit]
    right = [list(np.flatnonzero((y_true == c) & (y_true == y_pred))) for c in np.unique(y_true)]
    chosen = list(wrong)
    while len(chosen) < n and any(right):
        for r in right:
            if r and len(chosen) < n:
                chosen.append(r.pop(0))
    return np.asarray(chosen, dtype=np.int64)  # in that order: the gallery shows the misclassified first


def saliency_summary(predictor: Predictor, images: np.ndarray, labels: np.ndarray, figure: Path | None = None,
                  margin: float = CENTRAL_MARGIN, names: list[str] | None = None) -> dict[str, Any]:
    """Grad-CAM on the test images: central-mass summary for metrics.json and a gallery figure for the report
    (misclassified images first, each titled with its file name when `names` are given)."""
    member, preds = _run(predictor, images, None)
    cams = member.mean(axis=1)
    mass = central_mass(cams, margin)
    classes = predictor.classes
    valid = ~np.isnan(mass)

    def mean(sel: np.ndarray) -> float | None:
        return float(mass[sel & valid].mean()) if (sel & valid).any() else None

    out: dict[str, Any] = {
        "central_mass_mean": mean(np.ones(len(mass), bool)),
        "margin": margin,
        "uniform_baseline": (1 - 2 * round(images.shape[-1] * margin) / images.shape[-1]) ** 2,
        "images": len(mass),
        "empty_maps": int((~valid).sum()),
        "per_true_class": {c: mean(labels == i) for i, c in enumerate(classes)},
        "correct": mean(labels == preds),
        "wrong": mean(labels != preds),
        "gallery": None,
    }
    if figure is not None and len(images):
        from lungxray.evaluation.report import plot_cam_gallery

        idx = gallery_indices(labels, preds)
        def title(i: int) -> str:
            name = Path(names[i]).name if names else f"image {i}"
            name = name if len(name) <= 22 else name[:10] + "…" + name[-11:]
            verdict = "WRONG: " if labels[i] != preds[i] else ""
            return f"{name}\n{verdict}true {classes[labels[i]]}, pred {classes[preds[i]]}\nc={mass[i]:.2f}"

        titles = [title(int(i)) for i in idx]
        plot_cam_gallery([overlay(images[i], cams[i]) for i in idx], titles, figure)
        out["gallery"] = figure.name
    if out["central_mass_mean"] is not None and not math.isnan(out["central_mass_mean"]):
        log.info("test saliency: %.2f of Grad-CAM mass in the central region (uniform would be %.2f)",
                 out["central_mass_mean"], out["uniform_baseline"])
    return out

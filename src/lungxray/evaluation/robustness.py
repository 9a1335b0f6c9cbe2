"""Shift benchmark: how a model's scores fall when the same X-rays look as if another hospital had taken them.

Why: in small chest X-ray sets each class tends to come from its own hospitals, and a model can score well by
recognising the source (contrast curve, sharpness, borders, burned-in text) instead of the lungs (DeGrave et al.,
2021). External data is the real test; this benchmark is the proxy that the data at hand allows. Like
ImageNet-C (Hendrycks & Dietterich, 2019), each realistic acquisition shift is applied at graded severities to the
decoded uint8 images BEFORE the bundle's own preprocessing (`preprocess.prepare` with its input contract), the
model is scored on every (shift, severity) cell, and one mean summarises it.

Shifts are marked by what training augmentation already simulates ("photometric", "geometric"), so that the
mean over the held-out shifts (simulated by neither) shows what augmentation did not hand the model for free.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
from PIL import Image, ImageDraw, ImageFont

from lungxray.evaluation import metrics
from lungxray.evaluation.gradcam import central_mass, gradcam
from lungxray.evaluation.report import plot_shifts, shift_section
from lungxray.inference.combine import out_of_bag_probs
from lungxray.inference.predictor import Predictor, make_predictions
from lungxray.io.dataset import load_dataset
from lungxray.io.files import write_json, write_text
from lungxray.sites.adapt import crossfit
from lungxray.transforms.preprocess import equalize, prepare

log = logging.getLogger(__name__)

__all__ = ["QUICK", "SHIFTS", "Shift", "apply_shift", "benchmark_images", "run_benchmark", "tta_logits"]

ShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]  # float [0, 1] (S, S) -> same


@dataclass(frozen=True)
class Shift:
    """One kind of acquisition difference with its graded severities (parameters for S = 256 pixels)."""

    name: str
    severities: tuple[float, ...]
    fn: ShiftFn
    simulated_by: str  # "photometric" | "geometric" | "" (held out: no training augmentation simulates it)
    description: str


def _blur(x: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndi.gaussian_filter(x, sigma_px * x.shape[0] / 256, mode="nearest")


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _jpeg(x: np.ndarray, quality: float, _rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


def _downsample(x: np.ndarray, factor: float, _rng: np.random.Generator) -> np.ndarray:
    s = x.shape[0]
    small = max(8, round(s / factor))
    img = Image.fromarray(x.astype(np.float32), mode="F").resize((small, small), Image.Resampling.BOX)
    return np.asarray(img.resize((s, s), Image.Resampling.BILINEAR))


def _crop(x: np.ndarray, fraction: float, _rng: np.random.Generator) -> np.ndarray:
    s = x.shape[0]
    d = round(s * fraction)
    return _resize(x[d : s - d, d : s - d], s, s)


def _zoom_out(x: np.ndarray, scale: float, _rng: np.random.Generator) -> np.ndarray:
    """The patient smaller in the frame (a wider collimation), the edge pixels repeated around."""
    s = x.shape[0]
    inner = max(8, round(s * scale))
    lo = (s - inner) // 2
    return np.pad(_resize(x, inner, inner), ((lo, s - inner - lo), (lo, s - inner - lo)), mode="edge")


def _border(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A film/scanner frame: the image shrunk into a black (or, one time in three, white) border."""
    s = x.shape[0]
    d = max(1, round(s * fraction))
    out = np.full((s, s), 0.0 if rng.random() < 2 / 3 else 1.0, dtype=np.float32)
    out[d : s - d, d : s - d] = _resize(x, s - 2 * d, s - 2 * d)
    return out


_WORDS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "12/03", "SEDUTO", "ID 4471")


def _text(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """`level` burned-in markers (laterality letters, projection, dates) near the edges, white or black."""
    s = x.shape[0]
    img = Image.fromarray(np.round(x * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(level)):
        size = max(6, round(s * rng.uniform(0.05, 0.04 + 0.02 * level)))
        font = ImageFont.load_default(size=size)
        word = str(rng.choice(_WORDS))
        edge = rng.uniform(0.02, 0.2, size=2) * s
        cx = edge[0] if rng.random() < 0.5 else s - edge[0] - size * len(word) * 0.6
        cy = edge[1] if rng.random() < 0.5 else s - edge[1] - size
        draw.text((float(cx), float(cy)), word, fill=255 if rng.random() < 0.8 else 0, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def _rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    angle = degrees if rng.random() < 0.5 else -degrees
    return ndi.rotate(x, angle, reshape=False, order=1, mode="nearest")


def _contrast(x: np.ndarray, c: float, _rng: np.random.Generator) -> np.ndarray:
    m = float(x.mean())
    return (x - m) * c + m


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("gamma_dark", (1.3, 1.6, 2.0, 2.5, 3.2), lambda x, g, r: x**g, "photometric",
          "gamma > 1: darker mid-tones (another detector's characteristic curve)"),
    Shift("gamma_bright", (1.3, 1.6, 2.0, 2.5, 3.2), lambda x, g, r: x ** (1 / g), "photometric",
          "gamma < 1: brighter, washed-out mid-tones"),
    Shift("contrast_low", (0.75, 0.6, 0.5, 0.4, 0.3), _contrast, "photometric", "flat, low-contrast exposure"),
    Shift("contrast_high", (1.3, 1.6, 2.0, 2.5, 3.0), _contrast, "photometric", "steep window, clipped tones"),
    Shift("equalized", (0.2, 0.4, 0.6, 0.8, 1.0), lambda x, a, r: (1 - a) * x + a * equalize(
        np.round(x * 255).astype(np.uint8)) / 255.0, "", "histogram-equalised (blend with the raw image)"),
    Shift("blur", (0.5, 1.0, 1.5, 2.0, 3.0), lambda x, s, r: _blur(x, s), "photometric",
          "Gaussian blur sigma (px at 256): a softer detector MTF"),
    Shift("sharpen", (0.5, 1.0, 2.0, 3.0, 4.0), lambda x, a, r: x + a * (x - _blur(x, 1.5)), "photometric",
          "unsharp-mask amount: vendor edge enhancement"),
    Shift("noise", (0.02, 0.04, 0.06, 0.09, 0.12), lambda x, sd, r: x + r.normal(0, sd, x.shape), "photometric",
          "Gaussian noise std (fraction of full scale): low dose"),
    Shift("jpeg", (70, 50, 30, 20, 10), _jpeg, "photometric", "JPEG re-compression at quality q"),
    Shift("downsample", (1.5, 2.0, 3.0, 4.0, 6.0), _downsample, "", "resolution loss by a factor, upsampled back"),
    Shift("crop", (0.04, 0.08, 0.12, 0.16, 0.2), _crop, "geometric", "tighter collimation: edges cut, zoomed in"),
    Shift("zoom_out", (0.95, 0.9, 0.85, 0.8, 0.75), _zoom_out, "geometric", "patient smaller in the frame"),
    Shift("border", (0.03, 0.06, 0.09, 0.12, 0.15), _border, "", "film/scanner frame of this width"),
    Shift("text", (1, 2, 3, 4, 6), _text, "", "number of burned-in markers (R/L, AP, dates)"),
    Shift("rotate", (2.0, 4.0, 6.0, 8.0, 12.0), _rotate, "geometric", "rotation in degrees"),
    Shift("invert", (1.0,), lambda x, _a, r: 1.0 - x, "", "inverted grey scale (MONOCHROME1 read as MONOCHROME2)"),
)}

# Quick mode (tests, smoke checks): one shift per family, three severities; still the real shifts.
QUICK: dict[str, tuple[int, ...]] = {"gamma_dark": (1, 3, 5), "blur": (1, 3, 5), "jpeg": (1, 3, 5),
                                     "border": (1, 3, 5), "text": (1, 3, 5), "invert": (1,)}


def apply_shift(images: np.ndarray, name: str, level: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, S, S) -> uint8 (N, S, S) under shift `name` at severity `level` (1-based); deterministic."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    shift = SHIFTS[name]
    if not 1 <= level <= len(shift.severities):
        raise ValueError(f"shift {name} has severities 1..{len(shift.severities)}, got {level}")
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"apply_shift expects uint8 images (N, S, S), got {images.dtype} {images.shape}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), level])
    value = shift.severities[level - 1]
    out = [shift.fn(img.astype(np.float32) / 255.0, value, rng) for img in images]
    return np.stack([np.clip(np.round(o * 255.0), 0, 255).astype(np.uint8) for o in out]) if out else images.copy()


def tta_views(images: np.ndarray) -> list[np.ndarray]:
    """Test-time views (uint8, before the contract's preprocessing): as given, gamma 0.8 and 1.25, 5% zoom-in.

    No flips: they put the heart on the wrong side. Deterministic, so TTA scores are reproducible.
    """
    lut = [np.clip(np.round(255 * (np.arange(256) / 255) ** g), 0, 255).astype(np.uint8) for g in (0.8, 1.25)]
    rng = np.random.default_rng(0)
    zoom = np.stack([np.clip(np.round(_crop(i.astype(np.float32), 0.025, rng)), 0, 255).astype(np.uint8)
                     for i in images]) if len(images) else images
    return [images, lut[0][images], lut[1][images], zoom]


def tta_logits(predictor: Predictor, images: np.ndarray, contract: dict[str, Any]) -> np.ndarray:
    """Member logits of every TTA view stacked as extra members (N, K*V, C): the ensemble mean covers both."""
    views = [predictor.member_logits(_prepare(v, contract)) for v in tta_views(images)]
    return np.concatenate(views, axis=1)


def _prepare(images: np.ndarray, contract: dict[str, Any]) -> np.ndarray:
    return prepare(images, contract.get("standardize", "none"), contract.get("crop_border", 0.0))


def benchmark_images(
    run_dir: str | Path, data: str | Path, split: str = "test", device: str = "cpu"
) -> tuple[Predictor, np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """(predictor, decoded uint8 images, labels, paths, member weights) of a split, decoded at the bundle's size.

    split: "test" (the test/ folder, or every image when there is none; weights None = every member) or
    "validation", the one to compare variants on: the run's holdout, or for bootstrap members their out-of-bag
    images, with weights (N, K) True where member k did not train on image n (read from plan.json), so that each
    image is scored only by the members that never saw it, as the run's own validation figures are.
    """
    predictor = Predictor.load(run_dir, device)
    ds = load_dataset(data, size=int(predictor.meta["input"]["size"]), classes=predictor.classes)
    weights: np.ndarray | None = None
    if split == "test":
        idx = np.flatnonzero(ds.splits == "test")
        idx = idx if len(idx) else np.arange(len(ds))
    elif split == "validation":
        plan_file = Path(run_dir) / "plan.json"
        if not plan_file.is_file():
            raise FileNotFoundError(f"{run_dir}: no plan.json, so the validation images are unknown")
        plan = json.loads(plan_file.read_text())
        mask = np.asarray(plan["val_mask"], dtype=bool)  # (K, pool)
        held = {p: mask[:, j] for j, p in enumerate(plan["pool_paths"]) if mask[:, j].any()}
        idx = np.asarray([i for i, p in enumerate(ds.paths) if p in held], dtype=np.int64)
        if len(idx) != len(held):
            raise ValueError(f"{data}: {len(held) - len(idx)} validation images of the run are missing")
        if len(idx):
            weights = np.stack([held[ds.paths[i]] for i in idx])
            weights = None if weights.all() else weights  # a single holdout: every member scores every image
    else:
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    if len(idx) == 0:
        raise ValueError(f"{data}: no images to benchmark in split {split!r}")
    return predictor, ds.images[idx], ds.labels[idx], [ds.paths[i] for i in idx], weights


def _score(logits: np.ndarray, labels: np.ndarray, meta: dict[str, Any], reference: np.ndarray | None,
           weights: np.ndarray | None = None) -> dict:
    """Accuracy, macro F1, recall; `weights` (N, K) restricts each image to its out-of-bag members."""
    classes = list(meta["classes"])
    if weights is None:
        probs = make_predictions(logits, meta).probs
    else:  # TTA views are stacked as extra members: view-major, so the mask repeats
        mask = np.tile(weights, (1, logits.shape[1] // weights.shape[1]))
        probs, _ = out_of_bag_probs(metrics.softmax(logits), mask.T)
    m = metrics.classification_metrics(labels, probs, classes)
    predicted = probs.argmax(1)
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "recall": {c: v["recall"] for c, v in m["per_class"].items()},
           "predicted": np.bincount(predicted, minlength=len(classes)).tolist()}
    if reference is None:
        out["labels"] = predicted.tolist()
    else:  # how many decisions the shift alone changed (ImageNet-P's flip rate)
        out["flip_rate"] = float((predicted != reference).mean())
    return out


def saliency_check(predictor: Predictor, images: np.ndarray, labels: np.ndarray, margin: float = 0.15) -> dict | None:
    """Grad-CAM mass inside the central chest region vs border band and corners, mean over images and per class.

    A uniform map gives (1 - 2*margin)^2 central (0.49) and 4*margin^2 corners (0.09); a model reading markers
    and film edges scores well below 0.49 central.
    """
    cams = gradcam(predictor, images)  # (N, S, S) in [0, 1]
    central = central_mass(cams, margin)
    s = cams.shape[-1]
    d = round(s * margin)
    corners = sum(cams[:, a, b].sum(axis=(1, 2)) for a in (slice(0, d), slice(s - d, s))
                  for b in (slice(0, d), slice(s - d, s)))
    total = cams.sum(axis=(1, 2))
    corner = np.where(total > 0, corners / np.where(total > 0, total, 1), np.nan)
    ok = ~np.isnan(central)

    def mean(v: np.ndarray, sel: np.ndarray) -> float | None:
        return float(np.nanmean(v[sel & ok])) if (sel & ok).any() else None

    everything = np.ones(len(labels), dtype=bool)
    return {
        "margin": margin, "central_mass": mean(central, everything), "corner_mass": mean(corner, everything),
        "uniform_central": (1 - 2 * d / s) ** 2, "uniform_corner": 4 * (d / s) ** 2,
        "per_class_central": {c: mean(central, labels == i) for i, c in enumerate(predictor.classes)},
        "empty_maps": int((~ok).sum()),
    }


def summarize(cells: list[dict[str, Any]], clean: dict[str, Any]) -> dict[str, Any]:
    """Means over shifts (each shift = the mean over its severities), overall and over held-out shifts."""
    per_shift: dict[str, dict[str, Any]] = {}
    for c in cells:
        entry = per_shift.setdefault(c["shift"], {"simulated_by": c["simulated_by"], "f1": [], "acc": []})
        entry["f1"].append(c["macro_f1"])
        entry["acc"].append(c["accuracy"])
    table = {name: {"simulated_by": e["simulated_by"], "macro_f1": float(np.mean(e["f1"])),
                    "accuracy": float(np.mean(e["acc"]))} for name, e in per_shift.items()}
    held = [t for t in table.values() if not t["simulated_by"]]

    def avg(rows: Sequence[dict[str, Any]], key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    rows = list(table.values())
    worst = min(table, key=lambda n: table[n]["macro_f1"]) if table else None
    mean_f1 = avg(rows, "macro_f1")
    return {
        "clean_macro_f1": clean["macro_f1"], "clean_accuracy": clean["accuracy"],
        "mean_macro_f1": mean_f1, "mean_accuracy": avg(rows, "accuracy"),
        "relative_macro_f1": None if mean_f1 is None or clean["macro_f1"] == 0 else mean_f1 / clean["macro_f1"],
        "held_out_macro_f1": avg(held, "macro_f1"), "held_out_accuracy": avg(held, "accuracy"),
        "held_out_shifts": [n for n, t in table.items() if not t["simulated_by"]],
        "worst_shift": worst, "per_shift": table,
    }


def chosen_levels(quick: bool, shifts: Sequence[str] | None,
                  levels: Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """The severities to score per shift: all (or the QUICK subset), only `shifts` if named, only `levels` if
    given (a one-level shift keeps its level); an unknown shift or a level outside 1..5 is refused up front."""
    chosen = dict(QUICK) if quick else {n: tuple(range(1, len(s.severities) + 1)) for n, s in SHIFTS.items()}
    if shifts:
        unknown = sorted(set(shifts) - set(SHIFTS))
        if unknown:
            raise ValueError(f"unknown shift(s) {', '.join(unknown)}; known: {', '.join(SHIFTS)}")
        chosen = {n: chosen.get(n, tuple(range(1, len(SHIFTS[n].severities) + 1))) for n in shifts}
    if levels:
        if not set(levels) <= set(range(1, 6)):
            raise ValueError(f"levels must lie in 1..5, got {sorted(levels)}")
        chosen = {n: tuple(v for v in lv if v in levels or len(SHIFTS[n].severities) == 1) for n, lv in chosen.items()}
    return chosen


def summarize_adapted(summary: dict[str, Any], cells: list[dict[str, Any]], clean: dict[str, Any], folds: int) -> None:
    """Add the cross-fitted adapted figures beside the frozen ones in `summary`, in place."""
    summary["adapted_mean_macro_f1"] = float(np.mean([c["adapted"]["macro_f1"] for c in cells]))
    summary["adapted_clean_macro_f1"] = clean["adapted"]["macro_f1"]
    log.info("adapted (cross-fitted, %d folds): mean under shift %.3f (frozen %.3f)", folds,
             summary["adapted_mean_macro_f1"], summary["mean_macro_f1"])


def run_benchmark(
    run_dir: str | Path, data: str | Path, *, quick: bool = False, split: str = "test", tta: bool = False,
    saliency: bool = True, seed: int = 0, shifts: Sequence[str] | None = None, device: str = "cpu",
    levels: Sequence[int] | None = None, adapt: bool = False, folds: int = 2,
) -> dict[str, Any]:
    """Score a bundle under every (shift, severity) on `split` of `data`; returns a JSON-ready result.

    With `adapt` every cell is also scored adapted to its shifted images, cross-fitted (`adapt.crossfit`: each
    image by a model adapted on the other `folds` folds of the same cell, never on itself).

    `levels` keeps only those severities (1-5) of every shift, e.g. (1, 3, 5): the same graded curve at 60% of
    the cost, for comparing many variants (a summary is comparable only with one made at the same levels).
    """
    chosen = chosen_levels(quick, shifts, levels)
    if adapt and tta:
        raise ValueError("--adapt and --tta cannot be combined")
    predictor, images, labels, _, weights = benchmark_images(run_dir, data, split, device)
    meta, contract = predictor.meta, predictor.meta["input"]

    def logits_of(raw: np.ndarray) -> np.ndarray:
        return tta_logits(predictor, raw, contract) if tta else predictor.member_logits(_prepare(raw, contract))

    def adapted(raw: np.ndarray, reference: np.ndarray | None) -> dict[str, Any]:

        fit = crossfit(predictor, _prepare(raw, contract), np.arange(len(raw)), folds, seed=seed)
        return _score(fit.logits, labels, meta, reference, weights)

    clean = _score(logits_of(images), labels, meta, None, weights)
    reference = np.asarray(clean.pop("labels"))
    if adapt:
        clean["adapted"] = adapted(images, reference)
    cells = []
    for name, shift_levels in chosen.items():
        shift = SHIFTS[name]
        for level in shift_levels:
            shifted = apply_shift(images, name, level, seed)
            scores = _score(logits_of(shifted), labels, meta, reference, weights)
            if adapt:
                scores["adapted"] = adapted(shifted, reference)
            cells.append({"shift": name, "level": level, "severity": shift.severities[level - 1],
                          "simulated_by": shift.simulated_by, **scores})
            log.info("%-13s level %d: accuracy %.3f  macro F1 %.3f  flips %.3f", name, level,
                     scores["accuracy"], scores["macro_f1"], scores["flip_rate"])
    summary = summarize(cells, clean)
    if adapt:
        summarize_adapted(summary, cells, clean, folds)
    log.info("clean macro F1 %.3f; mean under shift %.3f (held-out shifts %.3f)", clean["macro_f1"],
             summary["mean_macro_f1"], summary["held_out_macro_f1"] or float("nan"))
    return {
        "run": str(run_dir), "model": meta.get("name"), "data": str(data), "split": split, "images": len(labels),
        "quick": quick, "tta": tta, "seed": seed, "adapt": {"folds": folds} if adapt else None,
        "levels": sorted(levels) if levels else None,
        "out_of_bag": weights is not None,
        "contract": {k: contract.get(k) for k in ("size", "standardize", "crop_border")},
        "classes": predictor.classes, "clean": clean, "cells": cells, "summary": summary,
        "shifts": {n: {"severities": list(SHIFTS[n].severities), "simulated_by": SHIFTS[n].simulated_by,
                       "description": SHIFTS[n].description} for n in chosen},
        "saliency": saliency_check(predictor, _prepare(images, contract), labels) if saliency else None,
    }


REPORT_BEGIN, REPORT_END = "<!-- robustness:begin -->", "<!-- robustness:end -->"


def write_benchmark(result: dict[str, Any], run_dir: str | Path, out: str | Path | None = None,
                    into_report: bool = False) -> Path | None:
    """robustness.json, robustness.md and robustness.png in `out`; nothing (None) without `out` or `into_report`:
    a benchmark never writes into a bundle unasked. `into_report` (refused for quick mode, whose numbers mean
    nothing) writes them to `out` or RUN_DIR/robustness and replaces any earlier section of RUN_DIR/report.md
    with this one, so the run's report carries the latest full benchmark."""

    if into_report and result.get("quick"):
        raise ValueError("--into-report with --quick: quick mode's numbers are meaningless and never go into a report")
    run_dir = Path(run_dir)
    if out is None and not into_report:
        return None
    out_dir = Path(out) if out else run_dir / "robustness"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "robustness.json", result)
    plot_shifts(result, out_dir / "robustness.png")
    write_text(out_dir / "robustness.md", "\n".join(shift_section(result, "robustness.png")))
    report = run_dir / "report.md"
    if into_report and report.is_file():
        rel = Path(os.path.relpath(out_dir / "robustness.png", run_dir)).as_posix()
        section = "\n".join([REPORT_BEGIN, *shift_section(result, rel), REPORT_END])
        text = report.read_text()
        start, end = text.find(REPORT_BEGIN), text.find(REPORT_END)
        if start >= 0 and end > start:
            text = text[:start] + section + text[end + len(REPORT_END):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        write_text(report, text)
    return out_dir

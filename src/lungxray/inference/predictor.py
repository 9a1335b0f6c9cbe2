"""Predict with a bundle: decode and preprocess any input exactly as in training, run all members, combine.

Probabilities are the members' mean softmax, tempered by the bundle's calibration temperature:
p = softmax(log(mean_k softmax(z_k)) / T). Uncertainty is the normalised predictive entropy of p (0 = certain,
1 = uniform): it grows both when members disagree and when they agree on an unsure answer, which is what a
referral rule should react to. The members' disagreement alone (mutual information) is reported beside it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lungxray.inference.bundle import Bundle, load_bundle
from lungxray.inference.combine import combine_probs, normalised_entropy, predictive_uncertainty
from lungxray.io.decode import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from lungxray.io.inputcheck import input_reason
from lungxray.runtime import eval_mode, normalize
from lungxray.sites.ood import FeatureReference, capture, load_reference
from lungxray.transforms.preprocess import prepare

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Results for N images, in input order; `to_dataframe()` gives one row per image (a table in Jupyter).

    >>> pred = lungxray.load("runs/reference").predict(["a.png", "b.png"])
    >>> pred.labels, pred.probs.shape, pred.refer  # ['covid', 'normal'], (2, 3), array([False,  True])
    """

    classes: list[str]
    probs: np.ndarray  # (N, C) calibrated ensemble probabilities
    member_probs: np.ndarray  # (N, K, C) uncalibrated member probabilities
    uncertainty: np.ndarray  # (N,) normalised predictive entropy in [0, 1]
    disagreement: np.ndarray  # (N,) mutual information between prediction and member (0 for one member)
    refer: np.ndarray  # (N,) bool: uncertain, out of distribution, or failing an input check (see refer_reason)
    ood: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) feature-space distance (NaN: no reference)
    refer_reason: list[str] = field(default_factory=list)  # (N,) "" or why the image is referred
    names: list[str] = field(default_factory=list)  # (N,) input names (paths or placeholders), when known
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, error) of unreadable inputs left out

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def __len__(self) -> int:
        return len(self.probs)

    def to_rows(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The rows of `lungxray predict`: one per image, then one per skipped input with its error; with `order`
        (the input names as given) every row, error rows included, in that order instead."""
        names = self.names or [f"<image {i}>" for i in range(len(self))]
        rows: list[dict[str, Any]] = [
            {"path": name, "label": label, **{f"prob_{c}": float(p) for c, p in zip(self.classes, probs, strict=True)},
             "uncertainty": float(unc), "disagreement": float(dis), "ood": float(ood), "refer": bool(ref),
             "refer_reason": why, "error": ""}
            for name, label, probs, unc, dis, ood, ref, why in zip(
                names, self.labels, self.probs, self.uncertainty, self.disagreement, self.ood, self.refer,
                self.refer_reason, strict=True)
        ]
        rows += [{"path": name, "error": error} for name, error in self.skipped]
        if order is None:
            return rows
        rank = {name: i for i, name in enumerate(order)}
        return sorted(rows, key=lambda r: rank.get(r["path"], len(rank)))

    def to_dataframe(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame (with the error column only when an input was skipped)."""
        import pandas as pd

        columns = ["path", "label", *(f"prob_{c}" for c in self.classes), "uncertainty", "disagreement", "ood",
                   "refer", "refer_reason"]
        return pd.DataFrame(self.to_rows(), columns=[*columns, "error"] if self.skipped else columns)

    def __str__(self) -> str:
        return self.to_dataframe().to_string(index=False, float_format="{:.3f}".format)

    def __repr__(self) -> str:
        return f"Predictions({len(self)} images, classes {self.classes})\n{self}"

    def _repr_html_(self) -> str:
        return str(self.to_dataframe().to_html(index=False, float_format="{:.3f}".format))


def make_predictions(member_logits: np.ndarray, meta: dict[str, Any], ood: np.ndarray | None = None,
                     input_reasons: Sequence[str | None] | None = None) -> Predictions:
    """Combine members, calibrate, and decide referral: an input check's reason first, then an out-of-distribution
    score above the bundle's `ood.threshold`, then uncertainty above `refer_threshold`."""
    probs, member_probs = combine_probs(member_logits, float(meta.get("temperature", 1.0)))
    unc = normalised_entropy(probs)
    mi = predictive_uncertainty(member_probs)["mutual_information"]
    ood = np.full(len(unc), np.nan) if ood is None else np.asarray(ood, dtype=np.float64)
    reasons = referral_reasons(unc, ood, meta, input_reasons or [None] * len(unc))
    refer = np.array([bool(r) for r in reasons], dtype=bool)
    return Predictions(list(meta["classes"]), probs, member_probs, unc, mi, refer, ood, reasons)


def referral_reasons(uncertainty: np.ndarray, ood: np.ndarray, meta: dict[str, Any],
                     input_reasons: Sequence[str | None]) -> list[str]:
    """One reason per image ("" = accepted); the most basic one wins: not an X-ray > unlike training > unsure."""
    threshold = meta.get("refer_threshold")
    ood_threshold = (meta.get("ood") or {}).get("threshold")
    out = []
    for unc, score, given in zip(uncertainty, ood, input_reasons, strict=True):
        if given:
            out.append(f"out of distribution: {given}")
        elif ood_threshold is not None and np.isfinite(score) and score > ood_threshold:
            out.append(f"out of distribution: unlike the training images (score {score:.1f} > {ood_threshold:.1f})")
        elif threshold is not None and unc > threshold:
            out.append(f"uncertain ({unc:.2f} > {threshold:.2f})")
        else:
            out.append("")
    return out


def run_batches(images: np.ndarray, batch_size: int,
                score: Callable[[np.ndarray], Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The one inference loop of both engines: `score` maps a batch of images to its outputs (logits, or the ONNX
    graph's outputs), each output is concatenated over the batches. [] for no images (callers know the shapes)."""
    outs: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        values = score(images[start : start + batch_size])
        outs = outs or [[] for _ in values]
        for got, value in zip(outs, values, strict=True):
            got.append(value)
    return [np.concatenate(o) for o in outs]


@dataclass
class LoadedImages:
    """Decoded model inputs with their names, input-check reasons, and the inputs that could not be read."""

    images: np.ndarray  # (N, S, S) uint8, preprocessed under the bundle's contract
    reasons: list[str | None]  # (N,) input-check reason or None
    names: list[str]  # (N,)
    skipped: list[tuple[str, str]]  # (name, error)


@dataclass
class Predictor:
    """A loaded bundle, ready to score images. Use `Predictor.load(run_dir)`."""

    bundle: Bundle
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reference: FeatureReference | None = None  # the training features (bundle's features.safetensors), if any

    def __post_init__(self) -> None:
        if self.reference is None:
            self.reference = load_reference(self.bundle.path)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        dev = torch.device(device)
        return cls(load_bundle(run_dir, dev), dev)

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    def preprocess(self, source: Any, name: str | None = None) -> np.ndarray:
        """Any supported input (path, bytes, PIL image, array) -> uint8 (S, S) under the bundle's contract."""
        contract = self.meta["input"]
        image = decode_image(source, size=contract["size"], name=name)
        return prepare(image, contract.get("standardize", "none"), contract.get("crop_border", 0.0))

    def load_input(self, source: Any, name: str | None = None) -> tuple[np.ndarray, str | None]:
        """`preprocess`, plus the input checks' reason (None when it may be a chest radiograph)."""
        image = self.preprocess(source, name)
        return image, input_reason(source, image)

    def member_outputs(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(member logits (N, K, C), penultimate member features (N, K, D)) for preprocessed uint8 images."""
        with capture(self.bundle.model) as got:
            logits = self.member_logits(images, batch_size)
        return logits, got.feature_array(self.bundle.members)

    def ood_scores(self, features: np.ndarray) -> np.ndarray | None:
        """Feature-space scores (`lungxray.sites.ood`); None without a reference or features (an old ONNX export)."""
        if self.reference is None or len(features) == 0 or features.shape[-1] != self.reference.class_means.shape[-1]:
            return None
        return self.reference.score(features)

    def member_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) preprocessed images -> float32 member logits (N, K, C), in fp32 for exact parity."""
        contract = self.meta["input"]
        model = self.bundle.model

        def score(batch: np.ndarray) -> tuple[np.ndarray]:
            x = torch.as_tensor(batch, device=self.device)
            x = normalize(x, contract["mean"], contract["std"]).unsqueeze(1)  # (B, 1, S, S)
            return (model(x.expand(-1, model.members, -1, -1)).float().cpu().numpy(),)  # type: ignore[call-overload]

        with eval_mode(model):
            outs = run_batches(images, batch_size, score)
        k, c = self.bundle.members, len(self.classes)
        return outs[0] if outs else np.zeros((0, k, c), np.float32)

    def predict_images(self, images: np.ndarray, input_reasons: Sequence[str | None] | None = None,
                       batch_size: int = 32) -> Predictions:
        """Score preprocessed uint8 (N, S, S) images; `input_reasons` from `load_input` refer those images."""
        if self.reference is None:
            return make_predictions(self.member_logits(images, batch_size), self.meta, None, input_reasons)
        logits, features = self.member_outputs(images, batch_size)
        return make_predictions(logits, self.meta, self.ood_scores(features), input_reasons)

    def load_named(self, items: Sequence[tuple[Any, str]], on_error: str = "raise") -> LoadedImages:
        """Decode and check (source, name) pairs; with `on_error="skip"` an unreadable input is logged and listed
        in `skipped` instead of raising ImageDecodeError."""
        images, reasons, names, skipped = [], [], [], []
        for source, name in items:
            try:
                image, why = self.load_input(source, name=name)
            except (ImageDecodeError, OSError) as exc:
                if on_error == "raise":
                    raise
                log.warning("skipped %s: %s", name, exc)
                skipped.append((name, str(exc) if isinstance(exc, ImageDecodeError) else f"{name}: {exc}"))
                continue
            images.append(image)
            reasons.append(why)
            names.append(name)
        size = int(self.meta["input"]["size"])
        stack = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
        return LoadedImages(stack, reasons, names, skipped)

    def predict_named(self, items: Sequence[tuple[Any, str]], on_error: str = "raise",
                      batch_size: int = 32) -> Predictions:
        """The one path from (source, name) pairs to Predictions: decode, check, score (see `load_named`)."""
        loaded = self.load_named(items, on_error)
        pred = self.predict_images(loaded.images, loaded.reasons, batch_size)
        pred.names, pred.skipped = loaded.names, loaded.skipped
        return pred

    def predict(self, sources: Sequence[Any]) -> Predictions:
        """Decode and score inputs; an unreadable one raises ImageDecodeError naming it."""
        loaded = [self.load_input(s) for s in sources]
        size = int(self.meta["input"]["size"])
        images = np.stack([im for im, _ in loaded]) if loaded else np.zeros((0, size, size), np.uint8)
        return self.predict_images(images, [why for _, why in loaded])


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted, hidden files skipped), each once.

    Inside a folder, entries that are not regular files (a FIFO, a device, a socket, a dangling link, a link loop)
    are listed too, whatever their name, so that reading them gives each an error row instead of silence; links
    to folders are not followed (no loops). A file given directly and also found in a given folder appears once,
    where it first appears.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for p in map(Path, paths):
        found = _folder_entries(p) if p.is_dir() else [p]
        for f in found:
            key = os.path.normpath(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _folder_entries(folder: Path) -> list[Path]:
    found = []
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            if path.suffix.lower() in IMAGE_SUFFIXES or not _is_regular(path):
                found.append(path)
    return sorted(found)


def _is_regular(path: Path) -> bool:
    """A regular file, or a link that resolves to one (lstat for the entry, stat for a link's target)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:  # dangling link, link loop, no permission
        return False

"""Predict with a bundle: decode and preprocess any input exactly as in training, run all members, combine.

Probabilities are the members' mean softmax, tempered by the bundle's calibration temperature:
p = softmax(log(mean_k softmax(z_k)) / T). Uncertainty is the normalised predictive entropy of p (0 = certain,
1 = uniform): it grows both when members disagree and when they agree on an unsure answer, which is what a
referral rule should react to. The members' disagreement alone (mutual information) is reported beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lungxray import metrics
from lungxray.bundle import Bundle, load_bundle
from lungxray.imageio import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from lungxray.preprocess import prepare
from lungxray.runtime import eval_mode, normalize

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
    refer: np.ndarray  # (N,) bool: uncertainty above the bundle's referral threshold
    names: list[str] = field(default_factory=list)  # (N,) input names (paths or placeholders), when known
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, error) of unreadable inputs left out

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def __len__(self) -> int:
        return len(self.probs)

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows of `lungxray predict`: one per image, then one per skipped input with its error."""
        names = self.names or [f"<image {i}>" for i in range(len(self))]
        rows: list[dict[str, Any]] = [
            {"path": name, "label": label, **{f"prob_{c}": float(p) for c, p in zip(self.classes, probs, strict=True)},
             "uncertainty": float(unc), "disagreement": float(dis), "refer": bool(ref), "error": ""}
            for name, label, probs, unc, dis, ref in zip(
                names, self.labels, self.probs, self.uncertainty, self.disagreement, self.refer, strict=True)
        ]
        return rows + [{"path": name, "error": error} for name, error in self.skipped]

    def to_dataframe(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame (with the error column only when an input was skipped)."""
        import pandas as pd

        columns = ["path", "label", *(f"prob_{c}" for c in self.classes), "uncertainty", "disagreement", "refer"]
        return pd.DataFrame(self.to_rows(), columns=[*columns, "error"] if self.skipped else columns)

    def __str__(self) -> str:
        return self.to_dataframe().to_string(index=False, float_format="{:.3f}".format)

    def __repr__(self) -> str:
        return f"Predictions({len(self)} images, classes {self.classes})\n{self}"

    def _repr_html_(self) -> str:
        return str(self.to_dataframe().to_html(index=False, float_format="{:.3f}".format))


def combine_probs(member_logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, C) logits -> (calibrated probs (N, C), member probs (N, K, C))."""
    member_probs = metrics.softmax(member_logits)
    mean = member_probs.mean(axis=1)
    return metrics.softmax(np.log(np.clip(mean, 1e-12, None)), temperature), member_probs


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1) / math.log(probs.shape[-1])


def make_predictions(member_logits: np.ndarray, meta: dict[str, Any]) -> Predictions:
    probs, member_probs = combine_probs(member_logits, float(meta.get("temperature", 1.0)))
    unc = normalised_entropy(probs)
    mi = normalised_entropy(member_probs.mean(1)) - normalised_entropy(member_probs).mean(1)
    threshold = meta.get("refer_threshold")
    refer = unc > threshold if threshold is not None else np.zeros(len(unc), dtype=bool)
    return Predictions(list(meta["classes"]), probs, member_probs, unc, np.clip(mi, 0, None), refer)


@dataclass
class Predictor:
    """A loaded bundle, ready to score images. Use `Predictor.load(run_dir)`."""

    bundle: Bundle
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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

    def member_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) preprocessed images -> float32 member logits (N, K, C), in fp32 for exact parity."""
        contract = self.meta["input"]
        model = self.bundle.model
        outs = []
        with eval_mode(model):
            for start in range(0, len(images), batch_size):
                x = torch.as_tensor(images[start : start + batch_size], device=self.device)
                x = normalize(x, contract["mean"], contract["std"]).unsqueeze(1)  # (B, 1, S, S)
                outs.append(model(x.expand(-1, model.members, -1, -1)).float().cpu().numpy())  # type: ignore[call-overload]
        k, c = self.bundle.members, len(self.classes)
        return np.concatenate(outs) if outs else np.zeros((0, k, c), np.float32)

    def predict_images(self, images: np.ndarray) -> Predictions:
        return make_predictions(self.member_logits(images), self.meta)

    def predict(self, sources: Sequence[Any]) -> Predictions:
        """Decode and score inputs; an unreadable one raises ImageDecodeError naming it."""
        images = np.stack([self.preprocess(s) for s in sources]) if len(sources) else np.zeros((0, 1, 1), np.uint8)
        return self.predict_images(images)


ENGINES = ("torch", "onnx")


def load_predictor(run_dir: str | Path, device: str = "cpu", engine: str = "torch",
                   onnx_path: str | Path | None = None) -> Predictor:
    """A Predictor for `engine`: "torch" runs the bundle; "onnx" runs RUN/model.onnx in ONNX Runtime (exported,
    parity-checked, on first use or when stale; see `export.OnnxPredictor`). Both give the same Predictions.
    `onnx_path` (implies "onnx") runs another export of this bundle instead, e.g. an int8 one."""
    if engine == "onnx" or onnx_path is not None:
        from lungxray.export import OnnxPredictor

        return OnnxPredictor.load(run_dir, device, onnx_path=onnx_path)
    if engine != "torch":
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    return Predictor.load(run_dir, device)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                f for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
        else:
            out.append(p)
    return out


def predict_files(predictor: Predictor, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per file: path, label, probabilities, uncertainty, refer, and an error for unreadable files."""
    rows: list[dict[str, Any]] = [{"path": str(p)} for p in paths]
    good, images = [], []
    for i, p in enumerate(paths):
        try:
            images.append(predictor.preprocess(p, name=str(p)))
            good.append(i)
        except (ImageDecodeError, OSError) as exc:
            rows[i]["error"] = str(exc)
            log.warning("cannot predict %s: %s", p, exc)
    if good:
        pred = predictor.predict_images(np.stack(images))
        for j, i in enumerate(good):
            rows[i].update(
                label=pred.labels[j],
                **{f"prob_{c}": float(pred.probs[j, ci]) for ci, c in enumerate(pred.classes)},
                uncertainty=float(pred.uncertainty[j]),
                disagreement=float(pred.disagreement[j]),
                refer=bool(pred.refer[j]),
                error="",
            )
    return rows

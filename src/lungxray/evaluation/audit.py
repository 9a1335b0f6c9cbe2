"""Shortcut audit of a labelled folder: can the classes be told apart from what is not lung?

A few hundred chest X-rays gathered per class from different hospitals (the reference dataset's COVID films come
from adult collections, its normal and pneumonia films from one paediatric hospital) let a network score well by
recognising the source: borders, burned-in markers, exposure, film size, file format. Maguolo & Nanni showed COVID
classifiers keep most of their accuracy with the lungs blanked out. A high test accuracy on such a folder says
little, so before training this module asks cheap questions a model could exploit instead of the lungs:

- ``border_only``: the image with its central region blanked (only a band along every edge left), 32x32;
- ``thumbnail``: the whole image at 8x8, far too small to show any lung finding;
- ``histogram``: the 32-bin grey-level histogram alone (exposure, windowing, processing);
- ``file_facts``: what the file says about where it came from (size, aspect, bytes, format, mode, bit depth,
  EXIF, DPI, JPEG quantisation, DICOM Modality/Manufacturer/...), never its pixels.

Each probe is a small model (a random forest, or for pixels also a standardised logistic regression) scored by
stratified k-fold cross-validation over every image of the folder (train and test splits together: this audits
the data, not a model). Exact and near duplicates are kept in one fold, so a memorised copy cannot pass for a
shortcut. Inside each training fold an inner cross-validation picks the model, and the majority-class predictor
is always a candidate, so on labels that carry no signal a probe falls back to chance instead of fitting noise.
The accuracy comes with a 95% Wilson interval over the pooled out-of-fold predictions (which treats them as
independent: slightly narrow, hence the margin); chance is the majority-class rate; a probe shows *signal* when
its interval's lower bound is above chance + :data:`MARGIN`. CPU only: the reference dataset (317 images) takes
seconds. The report and figures are in lungxray.audit_report; docs/audit.md explains how to read them.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lungxray.evaluation.formatting import pct
from lungxray.io.dataset import Dataset, index_folder, load_dataset
from lungxray.io.duplicates import Duplicate, find_duplicates, summarize_duplicates

logger = logging.getLogger(__name__)

__all__ = ["BORDER", "MARGIN", "AuditResult", "Probe", "audit", "audit_folder", "file_facts", "format_summary",
           "image_features", "wilson"]

MARGIN = 0.05  # a probe flags signal only when its lower 95% bound exceeds chance by this much
BORDER = 0.15  # fraction of each edge kept by border_only; the rest (the chest's centre) is blanked
GRID = 32  # border_only resolution
THUMB = 8  # thumbnail resolution
BINS = 32  # histogram bins
MAX_PAIRS = 1000  # duplicate pairs listed in the result (all are counted)
_PROBES = {
    "border_only": f"the outer {BORDER:.0%} band of every edge (centre blanked), {GRID}x{GRID}",
    "thumbnail": f"the whole image at {THUMB}x{THUMB}",
    "histogram": f"the {BINS}-bin grey-level histogram alone",
    "file_facts": "file facts: size, aspect, bytes, format, mode, bit depth, EXIF, DPI, JPEG tables, DICOM tags",
}
_VERDICT_WORDS = {
    "border_only": "borders alone", "thumbnail": f"{THUMB}x{THUMB} thumbnails",
    "histogram": "the grey-level histogram alone", "file_facts": "file facts alone",
}


# ------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Probe:
    """One probe's cross-validated accuracy against chance; ``signal`` when ``low`` > ``chance`` + ``margin``."""

    name: str
    what: str
    accuracy: float
    low: float  # 95% Wilson interval over the n pooled out-of-fold predictions
    high: float
    chance: float  # majority-class rate
    margin: float
    n: int
    correct: int
    signal: bool
    features: int
    fold_accuracy: list[float]
    chosen: list[str]  # per outer fold, the model the inner cross-validation picked ("majority" = gave up)
    recall: dict[str, float]  # per class: which classes the probe tells apart (filled in by audit)
    model_accuracy: float  # the probe's own model forced in every fold (no majority fallback): for transparency


@dataclass
class AuditResult:
    """What :func:`audit` found; ``to_dict()`` is the JSON the CLI prints with ``--json``.

    >>> result = lungxray.audit("data/covid19-dataset")
    >>> result.verdict, [(p["name"], p["accuracy"], p["chance"]) for p in result.to_dict()["probes"]]
    """

    data: str
    classes: list[str]
    counts: dict[str, int]
    probes: list[Probe]
    verdict: str
    duplicates: dict[str, Any]
    class_stats: dict[str, dict[str, Any]]
    folds: int
    seed: int
    seconds: float
    skipped: list[dict[str, str]] = field(default_factory=list)
    report: str | None = None  # audit.md when written

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["probes"] = [asdict(p) for p in self.probes]
        return out

    def __str__(self) -> str:
        return format_summary(self)


def format_summary(result: AuditResult) -> str:
    """The terminal lines: one per probe, then duplicates, the verdict and where the report went."""
    lines = [f"audit of {result.data}: {sum(result.counts.values())} images, " + ", ".join(
        f"{c} {n}" for c, n in result.counts.items()) + f"; {result.folds}-fold cross-validation, seed {result.seed}"]
    for p in result.probes:
        flag = "SIGNAL" if p.signal else "ok"
        lines.append(f"  {p.name:<12} accuracy {pct(p.accuracy)} (95% CI {pct(p.low)}-{pct(p.high)})  chance "
                     f"{pct(p.chance)}  {flag}")
    d = result.duplicates
    lines.append(f"  duplicates: {d['pairs_total']} pair(s), {d['across_classes']} with different labels; "
                 + ", ".join(f"{k} {v}" for k, v in d["counts"].items() if v) if d["pairs_total"] else
                 "  duplicates: none")
    lines.append(result.verdict)
    lines.append(f"report: {result.report}" if result.report else "no files written (pass --out DIR for a report)")
    return "\n".join(lines)


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: unlike the normal approximation it stays inside [0, 1] and
    keeps its coverage near 0 and 1, where shortcut probes often land."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ----------------------------------------------------------------------------------------------- features


def _blocks(images: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S) -> (N, size, size) float32 area means; S must be a multiple of size (it is: 256)."""
    n, s, _ = images.shape
    return images.reshape(n, size, s // size, size, s // size).mean(axis=(2, 4), dtype=np.float32)


def border_mask(size: int = GRID, border: float = BORDER) -> np.ndarray:
    """(size, size) bool, True on the kept band along every edge (round(border * size) pixels wide)."""
    band = max(1, round(border * size))
    mask = np.ones((size, size), bool)
    mask[band:-band, band:-band] = False
    return mask


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """The pixel probes' inputs: the kept border pixels only (blanked ones are constant and carry nothing), the
    thumbnail, and the per-image histogram as fractions (so image size cannot leak through counts)."""
    grid = _blocks(images, GRID)
    hist = np.stack([np.bincount(im.ravel() // (256 // BINS), minlength=BINS) for im in images]).astype(np.float32)
    return {
        "border_only": grid[:, border_mask()],
        "thumbnail": _blocks(images, THUMB).reshape(len(images), -1),
        "histogram": hist / hist.sum(axis=1, keepdims=True),
    }


_MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I": 32,
              "F": 32}


def file_facts(path: str | Path) -> dict[str, Any]:
    """What a file's header says about its origin, without its pixels: numbers (width, height, aspect, bytes,
    bits, DPI, mean JPEG luminance quantiser, EXIF present) and categories (suffix, format, mode, DICOM tags)."""
    path = Path(path)
    facts: dict[str, Any] = {"bytes": path.stat().st_size, "suffix": path.suffix.lower() or "(none)"}
    with path.open("rb") as fh:
        head = fh.read(132)
    if (len(head) >= 132 and head[128:132] == b"DICM") or facts["suffix"] in (".dcm", ".dicom"):
        return facts | _dicom_facts(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file was decoded already; header warnings add nothing here
        with Image.open(path) as im:
            quant = getattr(im, "quantization", None) or {}
            dpi = im.info.get("dpi") or (0, 0)
            facts |= {
                "width": im.width, "height": im.height, "format": im.format or "?", "mode": im.mode,
                "bits": 16 if im.mode.startswith("I;16") else _MODE_BITS.get(im.mode, 8),
                "exif": int(len(im.getexif()) > 0), "icc": int("icc_profile" in im.info),
                "dpi": float(dpi[0]) if isinstance(dpi, tuple) else float(dpi),
                "jpeg_quant": float(np.mean(quant[0])) if 0 in quant else 0.0,
                "progressive": int(bool(im.info.get("progressive") or im.info.get("progression"))),
            }
    return facts


def _dicom_facts(path: Path) -> dict[str, Any]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    tags = {f"dicom_{k.lower()}": str(ds.get(k, "") or "") for k in
            ("Modality", "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation", "BodyPartExamined",
             "ViewPosition", "InstitutionName")}
    return tags | {"width": cols, "height": rows, "format": "DICOM", "mode": str(ds.get("PhotometricInterpretation")),
                   "bits": int(ds.get("BitsStored", 0) or 0), "exif": 0, "icc": 0, "dpi": 0.0, "jpeg_quant": 0.0,
                   "progressive": 0}


_NUMERIC = ("width", "height", "bytes", "bits", "exif", "icc", "dpi", "jpeg_quant", "progressive")


def facts_matrix(facts: Sequence[dict[str, Any]]) -> np.ndarray:
    """Numbers (log sizes, aspect) plus one-hot categories, one row per file, for the file-facts probe."""
    rows = []
    cats = sorted({k for f in facts for k, v in f.items() if isinstance(v, str)})
    levels = {k: sorted({str(f.get(k, "")) for f in facts}) for k in cats}
    for f in facts:
        w, h = float(f.get("width", 0)), float(f.get("height", 0))
        num = [math.log1p(float(f.get(k, 0))) if k in ("width", "height", "bytes") else float(f.get(k, 0))
               for k in _NUMERIC]
        onehot = [float(str(f.get(k, "")) == v) for k in cats for v in levels[k]]
        rows.append([*num, w / h if h else 0.0, *onehot])
    return np.asarray(rows, dtype=np.float64)


# ------------------------------------------------------------------------------------------------- probing


def _duplicate_groups(n: int, index: dict[str, int], dups: Sequence[Duplicate]) -> np.ndarray:
    """Connected components of the duplicate pairs (union-find): one group id per image, kept in one fold."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for d in dups:
        a, b = find(index[d.a]), find(index[d.b])
        parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)])


def _fold_groups(ds: Dataset, dups: Sequence[Duplicate], folds: int) -> np.ndarray:
    """Duplicate groups for the folds, unless near-duplicate chains make a group too big to stratify (images that
    all look alike, e.g. synthetic ones): then exact copies only, and failing that, no grouping (logged)."""
    index = {p: i for i, p in enumerate(ds.paths)}
    limit = max(2, len(ds) // (2 * folds))
    for kind, pairs in (("exact and near", dups), ("exact", [d for d in dups if d.kind == "exact"])):
        groups = _duplicate_groups(len(ds), index, pairs)
        largest = int(np.bincount(groups).max())
        if largest <= limit:
            return groups
        logger.warning("%s duplicates chain %d images into one group (more than %d): not grouping by them",
                       kind, largest, limit)
    return np.arange(len(ds))


def _candidates(name: str, seed: int) -> tuple[Any, list[dict[str, Any]]]:
    """The probe's models and the grid its inner cross-validation picks from. A random forest catches sparse
    cues (a burned-in letter is a few pixels; a file size is one threshold), a standardised logistic regression
    dense ones (a slightly darker border everywhere); file facts get the forest only. The majority-class
    predictor is always an option, so a probe on noise falls back to chance instead of fitting it."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    forest = RandomForestClassifier(n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1)
    grid: list[dict[str, Any]] = [{"clf": [DummyClassifier(strategy="most_frequent")]}, {"clf": [forest]}]
    if name != "file_facts":
        grid.append({"scale": [StandardScaler()], "clf": [LogisticRegression(max_iter=2000)],
                     "clf__C": [0.01, 0.1, 1.0]})
    return Pipeline([("scale", "passthrough"), ("clf", forest)]), grid


def _chosen(params: dict[str, Any]) -> str:
    clf = params["clf"]
    if type(clf).__name__ == "DummyClassifier":
        return "majority"
    return f"logistic C={params['clf__C']:g}" if "clf__C" in params else "forest"


def run_probe(name: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> Probe:
    """Nested, grouped, stratified cross-validation of one probe: the outer folds score, the inner ones choose."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold

    estimator, grid = _candidates(name, seed)
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predictions, forced = np.empty_like(y), np.empty_like(y)
    fold_acc, chosen = [], []
    for train_idx, test_idx in outer.split(x, y, groups):
        inner_k = max(2, min(3, int(np.bincount(y[train_idx]).min())))
        inner = StratifiedGroupKFold(n_splits=inner_k, shuffle=True, random_state=seed + 1)
        search = GridSearchCV(estimator, grid, cv=inner, scoring="accuracy", n_jobs=1, error_score="raise")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            search.fit(x[train_idx], y[train_idx], groups=groups[train_idx])
            predictions[test_idx] = search.predict(x[test_idx])
            chosen.append(_chosen(search.best_params_))
            model = search if chosen[-1] != "majority" else _best_model(search).fit(x[train_idx], y[train_idx])
            forced[test_idx] = model.predict(x[test_idx])
        fold_acc.append(round(float(np.mean(predictions[test_idx] == y[test_idx])), 4))
    correct, n = int(np.sum(predictions == y)), len(y)
    low, high = wilson(correct, n)
    chance = float(np.bincount(y).max() / n)
    recall = {str(c): round(float(np.mean(predictions[y == c] == c)), 4) for c in np.unique(y)}
    return Probe(name, _PROBES[name], round(correct / n, 4), round(low, 4), round(high, 4), round(chance, 4),
                 MARGIN, n, correct, low > chance + MARGIN, int(x.shape[1]), fold_acc, chosen, recall,
                 round(float(np.mean(forced == y)), 4))


def _best_model(search: Any) -> Any:
    """The inner search's best candidate other than the majority predictor, unfitted."""
    from sklearn.base import clone

    results = search.cv_results_
    scores = [(s, i) for i, (s, p) in enumerate(zip(results["mean_test_score"], results["params"], strict=True))
              if _chosen(p) != "majority"]
    best = results["params"][max(scores, key=lambda t: (t[0], -t[1]))[1]]
    return clone(clone(search.estimator).set_params(**best))  # fresh copies of the grid's estimator objects


# ------------------------------------------------------------------------------------------- statistics


def _spread(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def _tally(values: Sequence[Any]) -> dict[str, int]:
    keys, counts = np.unique(np.asarray([str(v) for v in values]), return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def class_statistics(ds: Dataset, facts: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per class: count, original size, file size, grey level (decoded image mean and spread), format mix.
    Differences here are what the probes turn into accuracy; seeing them says which one to fear."""
    stats = {}
    means = ds.images.mean(axis=(1, 2))
    stds = ds.images.reshape(len(ds), -1).std(axis=1)
    for k, name in enumerate(ds.classes):
        idx = np.flatnonzero(ds.labels == k)
        f = [facts[int(i)] for i in idx]
        stats[name] = {
            "count": len(idx),
            "width": _spread([x.get("width", 0) for x in f]), "height": _spread([x.get("height", 0) for x in f]),
            "kilobytes": _spread([x["bytes"] / 1024 for x in f]),
            "grey_mean": round(float(means[idx].mean()), 2), "grey_std": round(float(stds[idx].mean()), 2),
            "formats": _tally([x.get("format", "?") for x in f]), "modes": _tally([x.get("mode", "?") for x in f]),
            "splits": _tally(ds.splits[idx].tolist()),
        }
    return stats


def duplicate_summary(ds: Dataset, dups: Sequence[Duplicate]) -> dict[str, Any]:
    """Counts per kind and split (lungxray.duplicates), pairs whose copies carry different labels, and the
    pairs themselves (with their labels) up to :data:`MAX_PAIRS`."""
    label = {p: ds.classes[int(c)] for p, c in zip(ds.paths, ds.labels, strict=True)}
    pairs = [asdict(d) | {"label_a": label[d.a], "label_b": label[d.b]} for d in dups]
    return {"counts": summarize_duplicates(list(dups)), "pairs_total": len(pairs),
            "across_classes": sum(p["label_a"] != p["label_b"] for p in pairs), "pairs": pairs[:MAX_PAIRS]}


def verdict(probes: Sequence[Probe], duplicates: dict[str, Any]) -> str:
    """One line: which probes separate the classes (strongest first), or that none does."""
    hits = sorted((p for p in probes if p.signal), key=lambda p: p.low - p.chance, reverse=True)
    leak = duplicates["counts"].get("exact_across", 0) + duplicates["counts"].get("near_across", 0)
    tail = f"; {leak} duplicate pair(s) across splits" if leak else ""
    if not hits:
        return (f"no shortcut signal found: no probe's 95% interval clears chance + {MARGIN:.2f}" + tail)
    parts = [f"{_VERDICT_WORDS[p.name]} (accuracy {p.accuracy:.2f}, 95% CI {p.low:.2f}-{p.high:.2f}, chance "
             f"{p.chance:.2f})" for p in hits]
    return "shortcut risk: the classes can be told apart from " + "; from ".join(parts) + tail


# ---------------------------------------------------------------------------------------------------- audit


def _check_classes(root: Path) -> None:
    """Refuse, before decoding anything, a folder with fewer than two classes: there is nothing to tell apart."""
    records, _ = index_folder(root)
    found = sorted({r.label for r in records})
    if len(found) < 2:
        raise ValueError(f"{root}: only one class ({found[0]}, {len(records)} images); an audit needs at least two "
                         "class folders to tell apart")


def _fold_count(counts: np.ndarray, folds: int, root: Path) -> int:
    smallest = int(counts.min())
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if smallest < 2:
        raise ValueError(f"{root}: a class has only {smallest} readable image; an audit needs two per class")
    if smallest < folds:
        logger.warning("smallest class has %d images: using %d folds instead of %d", smallest, smallest, folds)
    return min(folds, smallest)


def _timed_probe(name: str, x: np.ndarray, ds: Dataset, groups: np.ndarray, folds: int, seed: int) -> Probe:
    """One probe with BLAS on one thread: the matrices are tiny, and on a shared CPU threads only spin (the
    reference audit took 3x longer with two)."""
    import sklearn.ensemble
    import sklearn.linear_model  # noqa: F401  (loaded before the limit, so the limit covers their BLAS too)
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    with threadpool_limits(limits=1):
        probe = run_probe(name, x, ds.labels, groups, folds, seed)
    logger.info("probe %s: accuracy %.3f (chance %.3f) in %.1f s", name, probe.accuracy, probe.chance,
                time.perf_counter() - start)
    return replace(probe, recall={ds.classes[int(c)]: r for c, r in probe.recall.items()})


def audit(data: str | os.PathLike[str], seed: int = 0, folds: int = 5) -> AuditResult:
    """Run every probe on the folder ``data`` and return the :class:`AuditResult` (the report with figures is
    `audit_report.audit_to`). Raises ValueError for a folder that cannot be audited."""
    return audit_folder(data, seed, folds)[0]


def audit_folder(data: str | os.PathLike[str], seed: int = 0, folds: int = 5) -> tuple[AuditResult, Dataset]:
    """`audit`, with the decoded dataset the report's figures are drawn from."""
    start = time.perf_counter()
    root = Path(data)
    _check_classes(root)
    ds = load_dataset(root)
    if len(ds.classes) < 2:
        raise ValueError(f"{root}: only one class has readable images ({ds.classes[0]}); an audit needs two")
    folds = _fold_count(np.bincount(ds.labels, minlength=len(ds.classes)), folds, root)
    facts = [file_facts(root / p) for p in ds.paths]
    dups = find_duplicates(ds)
    groups = _fold_groups(ds, dups, folds)
    inputs: dict[str, np.ndarray] = {**image_features(ds.images), "file_facts": facts_matrix(facts)}
    probes = [_timed_probe(name, x, ds, groups, folds, seed) for name, x in inputs.items()]
    duplicates = duplicate_summary(ds, dups)
    result = AuditResult(str(root), ds.classes, ds.class_counts(), probes, verdict(probes, duplicates), duplicates,
                         class_statistics(ds, facts), folds, seed, 0.0, [asdict(s) for s in ds.skipped])
    result.seconds = round(time.perf_counter() - start, 2)
    return result, ds

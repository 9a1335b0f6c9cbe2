"""A folder of class sub-folders -> a decoded, cached, splittable dataset (duplicates: lungxray.duplicates).

Images are decoded once by :func:`lungxray.io.decode.decode_image` (the same path prediction uses) and kept as
one uint8 array; the result is cached under a content hash, so re-running an experiment never decodes twice
and a changed file can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lungxray.hostinfo import cache_root
from lungxray.io import decode as imageio

logger = logging.getLogger(__name__)

__all__ = [
    "CANONICAL_ORDER",
    "SPLIT_NAMES",
    "Dataset",
    "Record",
    "Skipped",
    "canonical_label",
    "index_folder",
    "load_dataset",
    "order_classes",
    "stratified_kfold",
    "stratified_split",
]

CANONICAL_ORDER = ("covid", "normal", "pneumonia")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
CACHE_FORMAT = 1
_ALIASES = {
    **dict.fromkeys(("covid", "covid19", "covid 19"), "covid"),
    **dict.fromkeys(("pneumonia", "viral pneumonia"), "pneumonia"),
    "normal": "normal",
}
_JUNK_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
# Folders that hold a class's files without naming a class: `COVID/images/x.png` is a covid image (the layout of the
# COVID-19 Radiography Database and others). Their segmentation masks are not X-rays and are never indexed.
_CONTAINER_FOLDERS = {"images", "image", "imgs", "img", "png", "jpg", "jpeg", "dicom", "dcm", "files", "data"}
_MASK_FOLDERS = {"masks", "mask", "lung masks", "lung mask", "segmentations", "segmentation"}


# ------------------------------------------------------------------------------------------------- labels


def _folder_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def canonical_label(folder_name: str) -> str:
    """Folder name -> class name. Known aliases map to ``covid``/``normal``/``pneumonia``; ``bacterial
    pneumonia`` deliberately does not (the reference class is viral). Other names are kept, lower-cased."""
    return _ALIASES.get(_folder_key(folder_name), folder_name.strip().lower())


def order_classes(labels: Iterable[str]) -> list[str]:
    """Index order of classes: the canonical three first (so bundles agree across datasets), then sorted."""
    found = set(labels)
    return [c for c in CANONICAL_ORDER if c in found] + sorted(found - set(CANONICAL_ORDER))


# ---------------------------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class Record:
    """One image file found under the root; label and split are read from its folder names."""

    path: Path
    label: str
    split: str  # "train" | "val" | "test" | "all"
    source: str = ""  # top-level folder when it is neither a split nor the class folder


@dataclass(frozen=True)
class Skipped:
    """A file (path relative to the root, posix) left out, and why: shown to users, never silently dropped."""

    path: str
    reason: str


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILES


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in imageio.IMAGE_SUFFIXES:
        return True
    try:  # DICOM is often stored without a suffix (IM0001, 1.2.840....)
        with path.open("rb") as fh:
            return imageio.is_dicom_bytes(fh.read(132))
    except OSError:
        return False


def _walk(root: Path, skipped: list[Skipped]) -> list[Path]:
    """Sorted depth-first file list; directory symlinks are followed but each real folder is visited once."""
    files: list[Path] = []
    seen: dict[str, Path] = {}
    real_root = os.path.realpath(root)

    def visit(folder: Path, ancestors: tuple[str, ...]) -> None:
        real = os.path.realpath(folder)
        rel = folder.relative_to(root).as_posix()
        if real in ancestors:
            skipped.append(Skipped(rel, f"symlink loop: points back to '{Path(real).relative_to(real_root)}'"))
            return
        inside = real != real_root and real.startswith(real_root + os.sep)
        if folder.is_symlink() and inside:  # indexed where it really is, whichever comes first in the walk
            target = Path(real).relative_to(real_root).as_posix()
            skipped.append(Skipped(rel, f"same folder as '{target}', not indexed twice"))
            return
        if real in seen:
            skipped.append(Skipped(rel, f"same folder as '{seen[real].relative_to(root)}', not indexed twice"))
            return
        seen[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skipped(rel, f"cannot list folder: {exc.strerror or exc}"))
            return
        if folder != root and all(_is_junk(e.name) for e in entries):
            skipped.append(Skipped(rel, "empty folder"))
        for entry in entries:
            path = Path(entry.path)
            if _is_junk(entry.name):
                logger.debug("ignoring %s", path)
                continue
            try:  # a link to itself (ELOOP) or an unreadable entry raises here instead of returning False
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as exc:
                skipped.append(Skipped(path.relative_to(root).as_posix(), f"cannot read: {exc.strerror or exc}"))
                continue
            if is_dir:
                visit(path, (*ancestors, real))
            elif is_file:
                files.append(path)
            else:
                kind = "broken symbolic link" if entry.is_symlink() else "not a regular file"
                skipped.append(Skipped(path.relative_to(root).as_posix(), kind))

    visit(root, ())
    return files


def _class_folder_index(folders: Sequence[str]) -> int | None:
    """Index of the folder that names the class: the innermost one that is neither a split level nor a plain
    container such as `images/`; None when there is none (a file at the top or directly in `train/`)."""
    for i in range(len(folders) - 1, -1, -1):
        key = _folder_key(folders[i])
        if key in SPLIT_NAMES:
            return None
        if key not in _CONTAINER_FOLDERS:
            return i
    return None


def index_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Record], list[Skipped]]:
    """Find every image under ``root``: class = parent folder (looking through plain containers such as
    ``images/``; ``masks/`` folders are skipped), split = any ``train``/``val``/``test`` level above it, source =
    the top-level folder when it is above the class folder and not a split.

    ``classes`` (a trained model's classes) turns images of other classes into skips instead of records.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data path is not a folder: {root}")
    wanted = None if classes is None else [canonical_label(c) for c in classes]
    records: list[Record] = []
    skipped: list[Skipped] = []
    for path in _walk(root, skipped):
        rel = path.relative_to(root)
        folders = rel.parts[:-1]
        if not _is_image(path):
            if folders:  # a stray file in a class folder is worth a line; README/checksums at the top are not
                skipped.append(Skipped(rel.as_posix(), "not an image file"))
            else:
                logger.debug("ignoring %s (not an image)", rel)
            continue
        if any(_folder_key(f) in _MASK_FOLDERS for f in folders):
            skipped.append(Skipped(rel.as_posix(), "in a segmentation-mask folder, not an X-ray"))
            continue
        at = _class_folder_index(folders)
        if at is None:
            skipped.append(Skipped(rel.as_posix(), "not inside a class folder"))
            continue
        label = canonical_label(folders[at])
        if wanted is not None and label not in wanted:
            reason = f"folder '{folders[at]}' maps to no class of the model: {', '.join(wanted)}"
            skipped.append(Skipped(rel.as_posix(), reason))
            continue
        splits = [SPLIT_NAMES[_folder_key(p)] for p in folders[:at] if _folder_key(p) in SPLIT_NAMES]
        source = folders[0] if at > 0 and _folder_key(folders[0]) not in SPLIT_NAMES else ""
        records.append(Record(path, label, splits[-1] if splits else "all", source))
    records.sort(key=lambda r: r.path.relative_to(root).as_posix())
    if not records:
        what = "images" if wanted is None else f"images of the classes {', '.join(wanted)}"
        raise ValueError(f"no {what} found in class sub-folders of {root}")
    return records, skipped


# ----------------------------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """Decoded images and their metadata, aligned along the first axis."""

    images: np.ndarray  # (N, S, S) uint8
    labels: np.ndarray  # (N,) int64 indices into classes
    classes: list[str]
    paths: list[str]  # relative to root, posix
    splits: np.ndarray  # (N,) str
    sources: np.ndarray  # (N,) str
    fingerprint: str  # of the whole folder, also on subsets (it names the data a model was trained on)
    root: str
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | Sequence[int]) -> Dataset:
        """Rows ``index`` (integer positions or a boolean mask), in that order; classes are kept."""
        idx = np.asarray(index)
        idx = np.flatnonzero(idx) if idx.dtype == np.bool_ else idx.astype(np.int64).reshape(-1)
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx],
            splits=self.splits[idx],
            sources=self.sources[idx],
        )

    def split(self, name: str) -> Dataset:
        """The images of one split (``train``, ``val``/``validation``, ``test`` or ``all``)."""
        key = SPLIT_NAMES.get(name.lower(), name.lower())
        mask = self.splits == key
        if not mask.any():
            present = ", ".join(sorted(set(self.splits.tolist()))) or "none"
            raise ValueError(f"no images in split '{name}' of {self.root} (splits present: {present})")
        return self.subset(mask)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    return cache_root()


def _read_cache(path: Path, rels: list[str], size: int) -> dict[str, np.ndarray] | None:
    """The cached arrays when ``path`` holds a complete cache for exactly these files, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in ("images", "labels", "paths", "splits", "sources", "skipped", "format")}
        skipped = json.loads(str(data["skipped"]))
        covered = sorted([*data["paths"].tolist(), *(s["path"] for s in skipped)])
        n = len(data["paths"])
        ok = (
            int(data["format"]) == CACHE_FORMAT
            and covered == sorted(rels)
            and data["images"].shape == (n, size, size)
            and data["images"].dtype == np.uint8
            and len(data["labels"]) == len(data["splits"]) == len(data["sources"]) == n
        )
        if ok:
            return data
        logger.warning("dataset cache %s does not match the data; rebuilding it", path)
    except Exception as exc:  # truncated, corrupt or foreign file: the cache is only an optimisation
        logger.warning("dataset cache %s is unreadable (%s); rebuilding it", path, exc)
    return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write (temporary file in the same folder + ``os.replace``): readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds nothing secret
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        logger.warning("could not write dataset cache %s (%s); continuing without it", path, exc)


def _decode_all(records: list[Record], rels: list[str], size: int, workers: int) -> dict[str, np.ndarray]:
    def work(i: int) -> np.ndarray | str:
        try:
            return imageio.decode_image(records[i].path, size=size, name=rels[i])
        except imageio.ImageDecodeError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(work, range(len(records))))
    ok = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    skipped = []
    for i, r in enumerate(results):
        if isinstance(r, str):
            reason = r.removeprefix(f"{rels[i]}: ")  # the error names the file; the path is its own field
            logger.warning("skipping unreadable image %s: %s", records[i].path, reason)
            skipped.append({"path": rels[i], "reason": reason})
    images = np.stack([results[i] for i in ok]) if ok else np.zeros((0, size, size), np.uint8)
    return {
        "images": images,
        "labels": np.array([records[i].label for i in ok], dtype=str),
        "paths": np.array([rels[i] for i in ok], dtype=str),
        "splits": np.array([records[i].split for i in ok], dtype=str),
        "sources": np.array([records[i].source for i in ok], dtype=str),
        "skipped": np.array(json.dumps(skipped)),
        "format": np.array(CACHE_FORMAT),
    }


def load_dataset(
    root: str | Path,
    size: int = 256,
    classes: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
) -> Dataset:
    """Index, decode (or load from cache) every image under ``root``; unreadable files become ``skipped``.

    ``classes`` (a trained model's classes) fixes the label indices and drops images of other classes;
    without it the classes are :func:`order_classes` of the folders found. The cache file is named by the
    fingerprint (file contents, relative paths, ``size``, decoder version), so it is valid wherever the folder
    is moved and never stale.
    """
    root = Path(root)
    wanted = None if classes is None else [canonical_label(c) for c in classes]
    if wanted is not None and len(set(wanted)) != len(wanted):
        raise ValueError(f"classes name the same class twice after alias mapping: {list(classes or [])}")
    records, index_skips = index_folder(root, wanted)
    rels = [r.path.relative_to(root).as_posix() for r in records]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashes = list(pool.map(_sha256_file, [r.path for r in records]))
    key = json.dumps([sorted(zip(rels, hashes, strict=True)), size, imageio.DECODER_VERSION, CACHE_FORMAT])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    cache_path = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache_path = cache_path / f"{fingerprint}.npz"
    arrays = _read_cache(cache_path, rels, size)
    if arrays is not None:
        logger.info("loaded %d images of %s from cache %s", len(arrays["paths"]), root, cache_path)
    else:
        arrays = _decode_all(records, rels, size, workers)
        _write_cache(cache_path, arrays)
        logger.info("decoded %d images of %s, cached in %s", len(arrays["paths"]), root, cache_path)
    decode_skips = [Skipped(s["path"], s["reason"]) for s in json.loads(str(arrays["skipped"]))]
    label_names = arrays["labels"].tolist()
    class_list = wanted if wanted is not None else order_classes(label_names)
    if not label_names:
        raise ValueError(f"no readable images in {root} ({len(decode_skips)} unreadable)")
    position = {c: i for i, c in enumerate(class_list)}
    return Dataset(
        images=arrays["images"],
        labels=np.array([position[c] for c in label_names], dtype=np.int64),
        classes=list(class_list),
        paths=arrays["paths"].tolist(),
        splits=np.asarray(arrays["splits"], dtype=str),
        sources=np.asarray(arrays["sources"], dtype=str),
        fingerprint=fingerprint,
        root=str(root),
        skipped=sorted(index_skips + decode_skips, key=lambda s: s.path),
    )


# ------------------------------------------------------------------------------------------------ splits


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) sorted indices; each class holds out round(n * fraction), at least 1 and at most
    n - 1 of a class with n >= 2 members, so validation sees every class and training keeps every class."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_hold = 0 if len(members) < 2 else min(max(1, round(len(members) * fraction)), len(members) - 1)
        held.append(members[:n_hold])
    out = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), out).astype(np.int64)
    return keep, out


def stratified_kfold(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, val) pairs whose val parts partition the indices, each class spread evenly over folds."""
    labels = np.asarray(labels)
    if not 2 <= k <= len(labels):
        raise ValueError(f"k must be between 2 and the number of samples ({len(labels)}), got {k}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < k:
            logger.warning("class %s has %d samples, fewer than k=%d folds", c, len(members), k)
        fold[members] = (offset + np.arange(len(members))) % k  # continue the round-robin across classes
        offset += len(members)
    all_idx = np.arange(len(labels))
    return [(all_idx[fold != f], all_idx[fold == f]) for f in range(k)]

"""lungxray.io.dataset: folder layouts, labels, skips, the decode cache, seeded splits and the duplicate check."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungxray.io import decode as imageio
from lungxray.io.dataset import (
    CANONICAL_ORDER,
    canonical_label,
    index_folder,
    load_dataset,
    order_classes,
    stratified_kfold,
    stratified_split,
)
from lungxray.io.duplicates import Duplicate, find_duplicates, summarize_duplicates

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid19-dataset"


def _smooth(seed: int, side: int = 48) -> np.ndarray:
    """A distinct, X-ray-like smooth image (random low-frequency field) so perceptual hashes differ."""
    coarse = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))


def _tree(root: Path, files: list[str], start_seed: int = 0) -> Path:
    """Write one distinct PNG per relative path."""
    for seed, rel in enumerate(files, start=start_seed):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(seed)).save(path)
    return root


def _layout(records: list) -> list[tuple[str, str, str]]:
    return [(r.label, r.split, r.source) for r in records]


# ------------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("Covid", "covid"),
        ("COVID-19", "covid"),
        ("covid19", "covid"),
        ("covid_19", "covid"),
        ("Viral Pneumonia", "pneumonia"),
        ("PNEUMONIA", "pneumonia"),
        ("viral_pneumonia", "pneumonia"),
        ("Normal", "normal"),
        (" Bacterial Pneumonia ", "bacterial pneumonia"),
        ("Tuberculosis", "tuberculosis"),
    ],
)
def test_canonical_label(folder: str, label: str) -> None:
    assert canonical_label(folder) == label


def test_order_classes() -> None:
    assert order_classes(["pneumonia", "zebra", "covid", "apple", "covid"]) == ["covid", "pneumonia", "apple", "zebra"]
    assert order_classes(CANONICAL_ORDER[::-1]) == list(CANONICAL_ORDER)


# ---------------------------------------------------------------------------------------------- indexing


def test_layouts(tmp_path: Path) -> None:
    flat = _tree(tmp_path / "flat", ["Covid/a.png", "Normal/b.png"])
    assert _layout(index_folder(flat)[0]) == [("covid", "all", ""), ("normal", "all", "")]
    split = _tree(tmp_path / "split", ["train/COVID-19/a.png", "TEST/Normal/b.png", "validation/Normal/c.png"])
    assert _layout(index_folder(split)[0]) == [("normal", "test", ""), ("covid", "train", ""), ("normal", "val", "")]
    sourced = _tree(tmp_path / "src", ["hospA/Covid/a.png", "hospB/Viral Pneumonia/b.png"])
    assert _layout(index_folder(sourced)[0]) == [("covid", "all", "hospA"), ("pneumonia", "all", "hospB")]
    both = _tree(tmp_path / "both", ["hospA/train/Covid/a.png", "hospA/test/Normal/b.png"])
    records, skipped = index_folder(both)
    assert _layout(records) == [("normal", "test", "hospA"), ("covid", "train", "hospA")]
    assert records[0].path == both / "hospA/test/Normal/b.png" and not skipped


def test_index_looks_through_image_containers_and_skips_masks(tmp_path: Path) -> None:
    """The COVID-19 Radiography Database layout: CLASS/images/*.png beside CLASS/masks/*.png, plus classes the
    model does not know (Lung_Opacity), optionally under a source folder."""
    root = _tree(tmp_path / "radiography", [
        "COVID/images/COVID-1.png", "COVID/masks/COVID-1.png",
        "Normal/images/Normal-1.png", "Normal/masks/Normal-1.png",
        "Viral Pneumonia/images/Viral Pneumonia-1.png", "Lung_Opacity/images/Lung_Opacity-1.png",
        "train/images/stray.png",
    ])
    records, skipped = index_folder(root, classes=["covid", "normal", "pneumonia"])
    assert _layout(records) == [("covid", "all", ""), ("normal", "all", ""), ("pneumonia", "all", "")]
    reasons = {s.path: s.reason for s in skipped}
    assert "mask" in reasons["COVID/masks/COVID-1.png"] and "mask" in reasons["Normal/masks/Normal-1.png"]
    assert "maps to no class" in reasons["Lung_Opacity/images/Lung_Opacity-1.png"]
    assert reasons["train/images/stray.png"] == "not inside a class folder"
    sourced = _tree(tmp_path / "ext", ["siteA/test/COVID/images/a.png", "siteB/Normal/IMG/b.png"])
    assert _layout(index_folder(sourced)[0]) == [("covid", "test", "siteA"), ("normal", "all", "siteB")]


def test_junk_non_images_and_loose_files(tmp_path: Path) -> None:
    root = _tree(tmp_path, ["Covid/a.png", "Tuberculosis/t.png", "loose.png", "train/loose.png"])
    for junk in ["Covid/.DS_Store", "Covid/Thumbs.db", "Covid/desktop.ini", "Covid/.hidden.png", ".git/config"]:
        (root / junk).parent.mkdir(exist_ok=True)
        (root / junk).write_bytes(b"junk")
    (root / "Covid/notes.txt").write_text("hello")
    (root / "README.md").write_text("dataset documentation at the top level is ignored silently")
    records, skipped = index_folder(root)
    assert [r.label for r in records] == ["covid", "tuberculosis"]  # unknown class names are kept
    assert {s.path: s.reason for s in skipped} == {
        "Covid/notes.txt": "not an image file",
        "loose.png": "not inside a class folder",
        "train/loose.png": "not inside a class folder",
    }


def test_classes_filter(tmp_path: Path) -> None:
    root = _tree(tmp_path, ["Covid/a.png", "Normal/b.png", "Viral Pneumonia/c.png"])
    records, skipped = index_folder(root, classes=["covid", "normal"])
    assert [r.label for r in records] == ["covid", "normal"]
    assert skipped[0].path == "Viral Pneumonia/c.png"
    assert skipped[0].reason == "folder 'Viral Pneumonia' maps to no class of the model: covid, normal"
    with pytest.raises(ValueError, match="no images of the classes tuberculosis"):
        index_folder(root, classes=["tuberculosis"])


def test_symlink_loop_is_reported_not_followed_forever(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", ["Covid/a.png"])
    os.symlink(root, root / "Covid" / "loop")
    os.symlink(root / "Covid", root / "Again")
    records, skipped = index_folder(root)
    assert [r.path.name for r in records] == ["a.png"]
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["Covid/loop"].startswith("symlink loop")
    assert reasons["Again"].startswith("same folder as 'Covid'")


def test_empty_class_folder_missing_root_and_no_images(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", ["Covid/a.png"])
    (root / "Normal").mkdir()
    records, skipped = index_folder(root)
    assert [r.label for r in records] == ["covid"] and skipped[0].path == "Normal"
    assert skipped[0].reason == "empty folder"
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        index_folder(tmp_path / "missing")
    (tmp_path / "e" / "Covid").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "e")):
        index_folder(tmp_path / "e")


# ----------------------------------------------------------------------------------------------- loading


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = imageio.decode_image

    def counted(source, size=256, name=None):  # type: ignore[no-untyped-def]
        calls.append(str(source))
        return real(source, size=size, name=name)

    monkeypatch.setattr(imageio, "decode_image", counted)
    return calls


def test_load_dataset_skips_corrupt_files_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = ["train/Normal/n1.png", "train/Covid/c1.png", "train/Covid/c2.png", "test/Covid/c3.png"]
    root = _tree(tmp_path / "d", files)
    (root / "train/Covid/broken.png").write_bytes(b"not a png")
    (root / "test/Normal/empty.jpg").parent.mkdir()
    (root / "test/Normal/empty.jpg").write_bytes(b"")
    cache = tmp_path / "cache"
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lungxray.io.dataset"):
        ds = load_dataset(root, size=32, cache_dir=cache)
    assert len(calls) == 6 and len(ds) == 4
    assert ds.images.shape == (4, 32, 32) and ds.images.dtype == np.uint8
    assert ds.classes == ["covid", "normal"] and ds.class_counts() == {"covid": 3, "normal": 1}
    assert ds.paths == ["test/Covid/c3.png", "train/Covid/c1.png", "train/Covid/c2.png", "train/Normal/n1.png"]
    assert list(ds.labels) == [0, 0, 0, 1] and list(ds.splits) == ["test", "train", "train", "train"]
    reasons = {s.path: s.reason for s in ds.skipped}
    assert reasons["train/Covid/broken.png"].startswith("not a recognised image format")  # path not repeated
    assert "0 bytes" in reasons["test/Normal/empty.jpg"]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text
    assert [p.name for p in cache.iterdir()] == [f"{ds.fingerprint}.npz"]  # no temporary file left behind

    calls.clear()
    again = load_dataset(root, size=32, cache_dir=cache)
    assert calls == []  # cache hit: nothing decoded
    np.testing.assert_array_equal(again.images, ds.images)
    assert again.paths == ds.paths and again.skipped == ds.skipped and again.fingerprint == ds.fingerprint

    (cache / f"{ds.fingerprint}.npz").write_bytes(b"garbage")
    rebuilt = load_dataset(root, size=32, cache_dir=cache)
    assert len(calls) == 6 and rebuilt.paths == ds.paths
    calls.clear()
    load_dataset(root, size=32, cache_dir=cache)
    assert calls == []  # the corrupt cache was rewritten

    model = load_dataset(root, size=32, classes=["Normal", "COVID-19", "pneumonia"], cache_dir=cache)
    assert model.classes == ["normal", "covid", "pneumonia"] and list(model.labels) == [1, 1, 1, 0]
    assert model.class_counts() == {"normal": 1, "covid": 3, "pneumonia": 0}


def test_fingerprint_tracks_content_not_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path / "cache"))
    root = _tree(tmp_path / "d", ["Covid/a.png", "Normal/b.png"])
    first = load_dataset(root, size=16)
    assert (tmp_path / "cache" / f"{first.fingerprint}.npz").exists()
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert load_dataset(moved, size=16).fingerprint == first.fingerprint
    assert load_dataset(root, size=24).fingerprint != first.fingerprint
    Image.fromarray(_smooth(99)).save(root / "Normal/b.png")
    changed = load_dataset(root, size=16)
    assert changed.fingerprint != first.fingerprint
    assert not np.array_equal(changed.images[1], first.images[1])


def test_dataset_subset_and_split(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", ["train/Covid/a.png", "train/Normal/b.png", "valid/Normal/c.png"])
    ds = load_dataset(root, size=16, cache_dir=tmp_path / "cache")
    assert len(ds.split("train")) == 2 and ds.split("validation").paths == ["valid/Normal/c.png"]
    sub = ds.subset([2, 0])
    assert sub.paths == ["valid/Normal/c.png", "train/Covid/a.png"] and sub.classes == ds.classes
    np.testing.assert_array_equal(sub.images[1], ds.images[0])
    assert len(ds.subset(np.array([True, False, True]))) == 2
    with pytest.raises(ValueError, match="splits present: train, val"):
        ds.split("test")


# ------------------------------------------------------------------------------------------------ splits


def test_stratified_split_is_proportional_and_seeded() -> None:
    labels = np.repeat([0, 1, 2, 3, 4], [50, 30, 20, 2, 1])
    keep, held = stratified_split(labels, 0.2, seed=7)
    assert np.bincount(labels[held], minlength=5).tolist() == [10, 6, 4, 1, 0]
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)
    assert np.array_equal(stratified_split(labels, 0.2, seed=7)[1], held)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=8)[1], held)
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


def test_stratified_kfold_partitions() -> None:
    labels = np.repeat([0, 1, 2], [23, 11, 7])
    folds = stratified_kfold(labels, 5, seed=3)
    assert len(folds) == 5
    vals = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(vals), np.arange(len(labels)))
    for train, val in folds:
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
        counts = np.bincount(labels[val], minlength=3)
        assert all(abs(c - n / 5) < 1 for c, n in zip(counts, [23, 11, 7], strict=True))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, stratified_kfold(labels, 5, 3), strict=True))


# -------------------------------------------------------------------------------------------- duplicates


def test_find_duplicates(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", [f"train/Covid/{i}.png" for i in range(6)] + ["test/Normal/x.png"])
    shutil.copy(root / "train/Covid/0.png", root / "test/Normal/copy.png")
    base = _smooth(1).astype(float)
    noisy = base * 0.9 + 20 + np.random.default_rng(5).normal(0, 3, base.shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "train/Covid/near.png")
    ds = load_dataset(root, size=64, cache_dir=tmp_path / "cache")
    dups = find_duplicates(ds)
    assert dups == [
        Duplicate("test/Normal/copy.png", "train/Covid/0.png", "test", "train", "exact", 0),
        Duplicate("train/Covid/1.png", "train/Covid/near.png", "train", "train", "near", dups[1].distance),
    ]
    summary = summarize_duplicates(dups)
    assert summary["exact_across"] == 1 and summary["near_within_train"] == 1 and sum(summary.values()) == 2
    assert find_duplicates(ds, max_distance=-1) == dups[:1]  # exact pairs only


@pytest.mark.slow
def test_real_dataset(tmp_path: Path) -> None:
    if not REAL_DATA.is_dir():
        pytest.skip(f"{REAL_DATA} not present")
    ds = load_dataset(REAL_DATA, cache_dir=tmp_path)
    assert ds.classes == ["covid", "normal", "pneumonia"] and ds.images.shape == (317, 256, 256)
    assert ds.split("train").class_counts() == {"covid": 111, "normal": 70, "pneumonia": 70}
    assert ds.split("test").class_counts() == {"covid": 26, "normal": 20, "pneumonia": 20}
    assert ds.skipped == []  # README.md and SHA256SUMS at the top level are not images and not reported
    summary = summarize_duplicates(find_duplicates(ds))
    assert summary["exact_across"] >= 1 and summary["near_across"] >= 1  # the README warns of both

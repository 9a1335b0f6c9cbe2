"""Shared fixtures: a tiny synthetic X-ray-like dataset written by the tests, and one model trained on it.

Nothing is downloaded; the real dataset is only used by tests marked `slow` that skip when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(os.environ.get("LUNGXRAY_DATA", Path(__file__).parents[1] / "../shared/data/covid19-dataset"))
CLASS_FOLDERS = {"covid": "Covid", "normal": "Normal", "pneumonia": "Viral Pneumonia"}


def synthetic_xray(label: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A smooth grey 'chest' with a class-dependent bright pattern the tiny model can learn quickly."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.08)
    if label == 0:  # blobs in the lower half
        for _ in range(3):
            cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.55, 0.8)
            img += 80 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004)
    elif label == 2:  # horizontal streaks
        img += 50 * (np.sin(yy * rng.uniform(25, 35) * np.pi) > 0.6)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 96) -> Path:
    """root/<split>/<Class folder>/<n>.png|jpg with `per_class` = {split: count per class}."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, folder in enumerate(CLASS_FOLDERS.values()):
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = Image.fromarray(synthetic_xray(label, rng, size))
                ext = ".jpg" if i % 3 == 0 else ".png"
                img.save(d / f"{split}_{i:03d}{ext}")
    return root


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or write the user's decode cache."""
    os.environ["LUNGXRAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 training and 6 test images per class, 96x96, PNG and JPEG."""
    return write_dataset(tmp_path_factory.mktemp("tiny"), {"train": 18, "test": 6})


# One thread: tiny models train several times faster than with two threads contending on a shared CPU.
SMOKE_OVERRIDES = {"data.image_size": 64, "train.epochs": 3, "train.batch_size": 16, "train.lr": 0.003,
                   "train.threads": 1}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """One smoke model trained on the tiny dataset (a few seconds), shared by the downstream tests."""
    from lungxray.training.pipeline import train_run

    out = tmp_path_factory.mktemp("runs") / "smoke"
    train_run(Path(__file__).parents[1] / "configs/smoke.yaml", tiny_dataset, out, overrides=SMOKE_OVERRIDES)
    return out


@pytest.fixture(scope="session")
def trained_ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """A 3-member bootstrap ensemble trained packed on the tiny dataset."""
    from lungxray.training.pipeline import train_run

    out = tmp_path_factory.mktemp("runs") / "ensemble"
    overrides = {**SMOKE_OVERRIDES, "ensemble.members": 3, "ensemble.bootstrap": True}
    train_run(Path(__file__).parents[1] / "configs/smoke.yaml", tiny_dataset, out, overrides=overrides)
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and immune to OpenMP spin-waits when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def not_deterministic() -> Iterator[None]:
    """Deterministic mode keeps oneDNN and PyTorch's ops (`use_conv3x3` and the other kernels' checks); a training
    test with `train.deterministic` may have left it on for the process."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before, warn_only=True)

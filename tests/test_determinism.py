"""Repetition: two CPU runs with the same seed in deterministic mode produce the same numbers, byte for byte.

Excluded from the comparison, because they measure wall-clock time and nothing else:
- metrics.json `timing.total_seconds`, `timing.train_seconds`, `timing.load_seconds`,
  `timing.train_images_per_second`;
- history.json `seconds` and `images_per_second` of every epoch.
Everything else (metrics with their bootstrap intervals, calibration, data summary, epochs and images seen,
per-epoch losses, the weights, meta.json, the member plan and the test predictions) must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lungxray.training.pipeline import train_run

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
TIMING_METRICS = ("total_seconds", "train_seconds", "load_seconds", "train_images_per_second")
TIMING_HISTORY = ("seconds", "images_per_second")
# a 2-member bootstrap ensemble, so the member plan, augmentation and dropout are all exercised
OVERRIDES = {"data.image_size": 32, "train.epochs": 3, "train.batch_size": 16, "train.lr": 0.003, "train.threads": 1,
             "train.deterministic": True, "ensemble.members": 2, "ensemble.bootstrap": True,
             "model.args": {"width": 8, "dropout": 0.3}}


def _outputs(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in TIMING_METRICS:
        metrics["timing"].pop(key)
    history = json.loads((run_dir / "history.json").read_text())
    return {
        "metrics": metrics,
        "history": [{k: v for k, v in h.items() if k not in TIMING_HISTORY} for h in history],
        "meta": json.loads((run_dir / "meta.json").read_text()),
        "plan": (run_dir / "plan.json").read_text(),
        "weights": (run_dir / "model.safetensors").read_bytes(),
        "predictions": (run_dir / "predictions_test.csv").read_text(),
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("det") / "a"
    train_run(SMOKE, tiny_dataset, out, overrides=OVERRIDES)
    return _outputs(out)


def test_same_seed_gives_identical_outputs(first_run: dict[str, Any], tiny_dataset: Path, tmp_path: Path) -> None:
    train_run(SMOKE, tiny_dataset, tmp_path / "b", overrides=OVERRIDES)
    second = _outputs(tmp_path / "b")
    assert set(first_run["metrics"]["timing"]) >= {"epochs", "images_seen", "device", "precision", "threads"}
    for key, value in first_run.items():
        assert second[key] == value, f"{key} differs between two runs with the same seed"


def test_another_seed_gives_other_outputs(first_run: dict[str, Any], tiny_dataset: Path, tmp_path: Path) -> None:
    """The comparison above can fail: a different seed changes the plan, the weights and the curves."""
    train_run(SMOKE, tiny_dataset, tmp_path / "c", overrides={**OVERRIDES, "seed": 1})
    other = _outputs(tmp_path / "c")
    for key in ("weights", "history", "plan"):
        assert other[key] != first_run[key], key


def test_each_run_sets_its_own_deterministic_mode() -> None:
    """A deterministic run earlier in the process must not leave the next, non-deterministic one without the fast
    kernels (they stand aside in deterministic mode)."""
    import torch

    from lungxray.runtime import seed_everything

    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)

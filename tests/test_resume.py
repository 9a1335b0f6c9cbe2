"""Interruption, and what is loaded back: checkpoints, bundles and resumed runs.

- Checkpoints are one atomic file per epoch; fit-level tests resume from several epoch boundaries in-process
  (fast) and must end with the weights and curves of an uninterrupted fit.
- The end-to-end test SIGKILLs a real `python -m lungxray train` after its first checkpoint and resumes it with
  `--resume RUN_DIR` alone; in deterministic mode the metrics equal an uninterrupted run's.
- Nothing unsafe: loading reads safetensors and JSON only (a pickled model.pt or checkpoint is never run), and
  the server listens on loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filegen import learnable_problem
from safetensors import safe_open

from lungxray.cli import main
from lungxray.config import TrainConfig, load_config
from lungxray.inference.bundle import load_bundle
from lungxray.inference.predictor import Predictor, expand_paths
from lungxray.models.nets import build_model
from lungxray.runtime import seed_everything
from lungxray.training.checkpoint import (
    CHECKPOINT_TENSORS,
    CheckpointError,
    checkpoint_epoch,
    has_checkpoint,
    remove_checkpoint,
)
from lungxray.training.pipeline import read_run_info, train_run
from lungxray.training.plan import plan_members
from lungxray.transforms.geometric import Augmenter, resolve_params

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# history fields that measure wall-clock time; everything else must match exactly
TIMING_HISTORY = ("seconds", "images_per_second")
TIMING_METRICS = ("total_seconds", "train_seconds", "load_seconds", "train_images_per_second",
                  "runtime")  # the runtime choice carries measured rates and where it came from (resumed)



def _fit(run_dir: Path, epochs: int, resume: bool, seed: int = 0, plan_seed: int = 0,
         ema_epochs: float = 0.0) -> tuple[dict, list]:
    """Fresh model, optimizer and augmenter (as a new process would build them), then fit."""
    from lungxray.training.loop import fit

    seed_everything(seed, deterministic=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see OVERRIDES
    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=2, bootstrap=True, seed=plan_seed)
    model = build_model("compact_cnn", num_classes=3, members=2, width=4, dropout=0.3)
    model = model.to(memory_format=torch.channels_last)  # as train_run has it: the optimizer state follows suit
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, monitor="val_accuracy", plateau_patience=1,
                      early_stopping_patience=2, precision="fp32", ema_epochs=ema_epochs)
    augmenter = Augmenter(resolve_params("seed"), seed=seed + 1)
    try:
        state = fit(model, images, labels, plan, cfg, augmenter, seed=seed, run_dir=run_dir, resume=resume)
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}, state.history


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_HISTORY} for h in history]


def test_checkpoint_is_one_atomic_file_with_every_state(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, resume=False)
    assert has_checkpoint(tmp_path) and checkpoint_epoch(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_TENSORS]  # no JSON beside it, no temp files
    with safe_open(str(tmp_path / CHECKPOINT_TENSORS), framework="pt") as fh:
        keys = set(fh.keys())
        meta = json.loads(fh.metadata()["checkpoint"])
    prefixes = {k.split(".")[0] for k in keys}
    assert {"model", "best", "optim", "rng", "plan"} <= prefixes
    assert {"rng.torch", "rng.augment.generator", "plan.train_index", "plan.val_mask"} <= keys
    assert {"state", "optimizer", "numpy_rng"} <= set(meta) and meta["epoch"] == meta["state"]["epoch"] == 2
    assert meta["state"]["lr"] > 0 and len(meta["state"]["history"]) == 2  # plateau (scheduler) state too


@pytest.fixture(scope="module")
def full_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    """5 uninterrupted epochs; in epoch 4 member 1 stops early and the learning rate is lowered."""
    weights, history = _fit(tmp_path_factory.mktemp("full"), epochs=5, resume=False)
    assert "member 1 stopped early (best epoch 2)" in history[3]["events"], "the scenario this test relies on"
    assert history[4]["lr"] < history[0]["lr"]
    return weights, history


@pytest.mark.parametrize("stop_after", [1, 4, 5])
def test_resume_from_an_epoch_boundary_equals_an_uninterrupted_fit(
    tmp_path: Path, full_fit: tuple[dict, list], stop_after: int
) -> None:
    """Bootstrap members, dropout, augmentation, optimizer moments, LR lowering and early stopping all continue
    identically (5: killed after the last checkpoint, before the bundle was written)."""
    full_weights, full_history = full_fit
    _fit(tmp_path, epochs=stop_after, resume=False)  # the checkpoint a killed run leaves behind
    weights, history = _fit(tmp_path, epochs=5, resume=True)
    assert _strip(history) == _strip(full_history)
    for name, value in full_weights.items():
        assert torch.equal(weights[name], value), name


def test_resume_with_a_weight_average_equals_an_uninterrupted_fit(tmp_path: Path) -> None:
    """The average is checkpointed with the weights: dropping it on resume would restart it from the raw weights."""
    full_weights, full_history = _fit(tmp_path / "full", epochs=4, resume=False, ema_epochs=1.0)
    _fit(tmp_path / "cut", epochs=2, resume=False, ema_epochs=1.0)
    weights, history = _fit(tmp_path / "cut", epochs=4, resume=True, ema_epochs=1.0)
    assert _strip(history) == _strip(full_history)
    for name, value in full_weights.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize(("before", "after"), [(0.0, 1.0), (1.0, 0.0)])
def test_resume_refuses_a_checkpoint_with_another_averaging_setting(tmp_path: Path, before: float,
                                                                    after: float) -> None:
    _fit(tmp_path, epochs=1, resume=False, ema_epochs=before)
    with pytest.raises(CheckpointError, match="weight average"):
        _fit(tmp_path, epochs=2, resume=True, ema_epochs=after)


def test_resume_refuses_a_checkpoint_of_other_training_samples(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1, resume=False, plan_seed=0)
    with pytest.raises(CheckpointError, match="other training samples"):
        _fit(tmp_path, epochs=2, resume=True, plan_seed=1)


def test_garbage_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_TENSORS).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="not a lungxray checkpoint"):
        _fit(tmp_path, epochs=1, resume=True)
    assert checkpoint_epoch(tmp_path) is None


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1, resume=False)
    stale = tmp_path / f".{CHECKPOINT_TENSORS}.k1ll3d.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    _fit(tmp_path, epochs=2, resume=True)
    assert checkpoint_epoch(tmp_path) == 2
    remove_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ a real process, SIGKILLed

# one thread: on a shared 2-core machine two OpenMP threads per process are ~20x slower, not faster
OVERRIDES = {"data.image_size": 32, "train.epochs": 6, "train.batch_size": 16, "train.lr": 0.003, "train.threads": 1,
             "train.deterministic": True, "ensemble.members": 2, "ensemble.bootstrap": True}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lungxray", *args]


def _kill_after_first_checkpoint(cmd: list[str], run_dir: Path, timeout: float = 120.0) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while (checkpoint_epoch(run_dir) or 0) < 1:
            if proc.poll() is not None:
                pytest.fail(f"training ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within the timeout")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return proc.returncode


def test_sigkilled_training_resumes_to_the_same_result(
    tmp_path: Path, tiny_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "killed"
    sets = [f"--set={k}={str(v).lower()}" for k, v in OVERRIDES.items()]
    cmd = _cli("train", "--config", str(SMOKE), "--data", str(tiny_dataset), "--out", str(run_dir), *sets)
    assert _kill_after_first_checkpoint(cmd, run_dir) == -signal.SIGKILL
    epoch = checkpoint_epoch(run_dir)
    assert epoch is not None and 1 <= epoch < OVERRIDES["train.epochs"], "killed mid-run, checkpoint readable"
    assert not read_run_info(run_dir)["complete"] and not (run_dir / "meta.json").exists()

    # --resume needs nothing but the folder: the data root was recorded when the run started. It runs in this
    # process, whose global random state is anything but fresh: the checkpoint must restore all of it.
    caplog.set_level(logging.INFO, logger="lungxray")
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} after epoch {epoch}" in caplog.text
    assert not has_checkpoint(run_dir) and not list(run_dir.glob(".*.tmp"))
    assert read_run_info(run_dir)["complete"]

    bundle = load_bundle(run_dir)  # a valid bundle that predicts
    assert bundle.members == 2
    pred = Predictor.load(run_dir).predict(expand_paths([tiny_dataset / "test"])[:4])
    assert pred.probs.shape == (4, 3)

    reference = tmp_path / "uninterrupted"
    train_run(SMOKE, tiny_dataset, reference, overrides=OVERRIDES)
    expected, resumed = (json.loads((d / "metrics.json").read_text()) for d in (reference, run_dir))
    for metrics in (expected, resumed):
        for key in TIMING_METRICS:
            metrics["timing"].pop(key)
    assert resumed == expected
    history = json.loads((reference / "history.json").read_text())
    assert _strip(json.loads((run_dir / "history.json").read_text())) == _strip(history)

    # resuming a finished run changes nothing
    before = (run_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert (run_dir / "model.safetensors").stat().st_mtime_ns == before


def test_resume_before_the_first_checkpoint_starts_over(tmp_path: Path, tiny_dataset: Path) -> None:
    """Killed while loading data: only config.yaml and run.json exist; --resume trains from the start."""
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    overrides = {**OVERRIDES, "train.epochs": 1, "ensemble.members": 1, "ensemble.bootstrap": False}
    (run_dir / "config.yaml").write_text(load_config(SMOKE, overrides).to_yaml())
    (run_dir / "run.json").write_text(json.dumps({"data": str(tiny_dataset), "complete": False}))
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert (run_dir / "meta.json").is_file() and read_run_info(run_dir)["complete"]


def test_resume_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(SMOKE.read_text())
    assert main(["train", "--resume", str(tmp_path), "--set", "train.epochs=9"]) == 2
    assert "--set cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2  # no run.json: which data? never a silent default
    err = capsys.readouterr().err
    assert "pass --data" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------- nothing unsafe: tensors and JSON, never pickles

_FORBIDDEN = [
    (r"\btorch\.load\b|\btorch\.jit\.load\b", "torch.load unpickles"),
    (r"\bimport (c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b|\bfrom (c?pickle|dill|joblib) import", "pickle"),
    (r"allow_pickle\s*=\s*True|weights_only\s*=\s*False", "pickle switched on"),
    (r"\byaml\.(load|unsafe_load|full_load)\(|Loader\s*=", "yaml that builds objects"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
]


def test_source_never_unpickles() -> None:
    import re

    for path in sorted((ROOT / "src" / "lungxray").rglob("*.py")):
        text = path.read_text()
        for pattern, why in _FORBIDDEN:
            assert not re.search(pattern, text), f"{path.name}: {why}"
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{path.name}: {call} must pass allow_pickle=False"


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _tiny_bundle(run_dir: Path) -> None:
    from lungxray.inference.bundle import save_bundle

    model = build_model("compact_cnn", num_classes=3, members=1, width=4)
    meta = {"classes": ["covid", "normal", "pneumonia"], "arch": "compact_cnn", "arch_args": {"width": 4},
            "members": 1, "input": {"size": 32, "channels": 1, "mean": 0.5, "std": 0.25}}
    save_bundle(run_dir, model, meta)


def test_a_pickled_model_pt_is_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from lungxray.inference.bundle import BundleError

    marker = tmp_path / "pwned"
    _tiny_bundle(tmp_path / "run")
    (tmp_path / "run" / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (tmp_path / "run" / CHECKPOINT_TENSORS).write_bytes(pickle.dumps(_Payload(marker)))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a loader tried to unpickle")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):  # any other route runs the payload
        monkeypatch.setattr(target, name, refuse)
    pred = Predictor.load(tmp_path / "run").predict([np.zeros((40, 40), np.uint8)])  # safetensors + JSON only
    assert pred.probs.shape == (1, 3)
    with pytest.raises(CheckpointError, match="not a lungxray checkpoint"):
        _fit(tmp_path / "run", epochs=1, resume=True)
    (tmp_path / "run" / "model.safetensors").unlink()  # only the pickle is left: refused, not used
    with pytest.raises(BundleError, match=r"has no model\.safetensors"):
        load_bundle(tmp_path / "run")
    assert not marker.exists()


def test_the_server_listens_on_loopback_by_default() -> None:
    import inspect

    from lungxray.cli import build_parser
    from lungxray.serve.app import run_server

    assert build_parser().parse_args(["serve", "runs/x"]).host == "127.0.0.1"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"


def test_sequential_members_resume_after_a_kill_between_their_two_files(tmp_path: Path) -> None:
    """Ensembles trained one member at a time keep each finished member as weights + JSON: a kill between the two
    writes must leave a member that is retrained (from its own checkpoint), not a run that cannot resume."""
    from lungxray.training.loop import fit_sequential

    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=2, bootstrap=True, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, precision="fp32")

    def run(resume: bool) -> list[dict[str, torch.Tensor]]:
        seed_everything(0, deterministic=True)
        states, _ = fit_sequential(
            lambda: build_model("compact_cnn", num_classes=3, members=1, width=4), images, labels, plan, cfg,
            lambda k: Augmenter(resolve_params("seed"), seed=1 + k), seed=0, run_dir=tmp_path, resume=resume)
        return states

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run(resume=False)
        (tmp_path / "members" / "1" / "member.json").unlink()  # as if killed after the weights, before the JSON
        again = run(resume=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)

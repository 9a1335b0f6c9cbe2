"""Scale-out: `torchrun -m lungxray train` on 2 CPU processes (gloo) gives the bundle one process gives.

Data-parallel: each global batch is sharded over the ranks with the augmentations the whole batch would get and
DDP averages gradients, so without BatchNorm and dropout (whose statistics and draws are per rank) a 2-rank run
reproduces the single-process run's losses to float rounding. Members-over-ranks: each rank trains its members
and rank 0 writes one bundle with all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungxray.inference.bundle import load_bundle
from lungxray.inference.predictor import Predictor
from lungxray.training import distributed

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
BASE = {"data.image_size": 64, "train.epochs": 3, "train.batch_size": 16, "train.lr": 0.003}
# No BatchNorm, no dropout, fp32: nothing left that differs between one process and two.
EXACT = {**BASE, "model.args.batch_norm": False, "model.args.dropout": 0, "train.precision": "fp32"}


def torchrun(data: Path, out: Path, overrides: dict, strategy: str = "data", nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lungxray", "train", "--config", str(SMOKE), "--data", str(data), "--out", str(out),
           "--device", "cpu"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "LUNGXRAY_DISTRIBUTE": strategy, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "exitcode: -6" in proc.stderr:
        # Known flake (see the session note): a rank occasionally aborts (SIGABRT) while the process group is torn
        # down after a complete run. Retry once so it does not mask real failures, which fail twice.
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_single_process_helpers_are_identities() -> None:
    ctx = distributed.context()
    assert not ctx.active and ctx.is_main and ctx.threads == 0
    assert distributed.data_world() == 1
    assert distributed.batch_shard(17) == (0, 17)
    assert distributed.should_write()
    assert distributed.share_from_main({"a": 1}) == {"a": 1}


def test_member_share_covers_every_member_once() -> None:
    shares = [distributed.member_share(5, r, 2) for r in range(2)]
    assert shares == [[0, 1], [2, 3, 4]]
    assert sorted(k for r in range(3) for k in distributed.member_share(7, r, 3)) == list(range(7))
    with pytest.raises(ValueError, match="cannot be spread over 4 ranks"):
        distributed.member_share(3, 0, 4)


def test_unknown_strategy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("LUNGXRAY_DISTRIBUTE", "pipeline")
    with pytest.raises(ValueError, match=r"LUNGXRAY_DISTRIBUTE='pipeline'"):
        distributed.setup(torch.device("cpu"))


def test_two_ranks_reproduce_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    from lungxray.training.pipeline import train_run

    single = train_run(SMOKE, tiny_dataset, tmp_path / "one", overrides=EXACT, device="cpu")
    out = tmp_path / "two"
    stdout = torchrun(tiny_dataset, out, EXACT)
    assert stdout.count("test accuracy") == 1  # only rank 0 prints the summary

    bundle = load_bundle(out)  # a valid bundle, written once by rank 0
    assert bundle.members == 1 and not (out / "checkpoint.json").exists()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == len(single.history) == 3
    for mine, ref in zip(history, single.history, strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3, abs=1e-4)
        assert mine["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-3, abs=1e-4)
        assert mine["val_accuracy"] == pytest.approx(ref["val_accuracy"], abs=0.1)  # at most one image flips
    metrics = json.loads((out / "metrics.json").read_text())
    test_acc = single.metrics["test"]["metrics"]["accuracy"]
    assert metrics["test"]["metrics"]["accuracy"] == pytest.approx(test_acc, abs=0.06)
    # The images seen count the global batches once, not once per rank.
    assert metrics["timing"]["images_seen"] == single.metrics["timing"]["images_seen"]


def test_members_spread_over_ranks_make_one_ensemble(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "members"
    torchrun(tiny_dataset, out, {**BASE, "ensemble.members": 2, "ensemble.bootstrap": True}, strategy="members")
    bundle = load_bundle(out)
    assert bundle.members == 2
    assert not (out / distributed.RANKS_DIR).exists()  # per-rank checkpoints cleaned up
    history = json.loads((out / "history.json").read_text())
    assert sorted({h["rank"] for h in history}) == [0, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["members"]["best_epoch"]) == 2
    assert metrics["validation_kind"] == "out-of-bag"
    # Each member was trained (by its own rank): they disagree somewhere, and the ensemble predicts.
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    logits = Predictor(bundle).member_logits(images)
    assert logits.shape == (4, 2, 3) and np.isfinite(logits).all()
    assert not np.allclose(logits[:, 0], logits[:, 1])


def test_local_share_starts_from_the_members_initial_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 under the members strategy trains members 1 and 2 of 3, from their single-process init."""
    import torch

    from lungxray.models.nets import build_model, extract_member
    from lungxray.training.plan import plan_members
    from lungxray.transforms.geometric import Augmenter, resolve_params

    monkeypatch.setattr(distributed, "_CTX", distributed.DistContext(rank=1, world=2, strategy="members"))
    plan = plan_members(np.repeat([0, 1, 2], 10), 3, bootstrap=True, seed=0)
    model = build_model("compact_cnn", members=3, width=4, image_size=64)
    augmenter = Augmenter(resolve_params("seed"), seed=5)
    local_plan, local, ks = distributed.local_share(plan, model, augmenter)
    assert ks == [1, 2] and local.members == 2 and local_plan.members == 2
    np.testing.assert_array_equal(local_plan.train_index, plan.train_index[1:])
    full, mine = model.state_dict(), local.state_dict()
    for i, k in enumerate(ks):
        ref, got = extract_member(full, k, 3), extract_member(mine, i, 2)
        assert all(torch.equal(ref[name], got[name]) for name in ref)
    assert augmenter.generator.initial_seed() == 5 + 1000  # rank-own augmentation draws
    with pytest.raises(ValueError, match=r"needs ensemble\.packed=true"):
        distributed.local_share(plan, model, augmenter, packed=False)

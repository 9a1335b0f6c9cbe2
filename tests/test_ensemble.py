"""Bootstrap plans, out-of-bag scoring and the sequential fallback."""

import json
from pathlib import Path

import numpy as np

from lungxray.inference.bundle import read_meta
from lungxray.inference.combine import average_members, out_of_bag_probs
from lungxray.training.pipeline import train_run
from lungxray.training.plan import bootstrap_sample, plan_members


def test_bootstrap_sample_is_stratified_and_seeded() -> None:
    labels = np.array([0] * 30 + [1] * 20 + [2] * 10)
    a = bootstrap_sample(labels, np.random.default_rng(3))
    b = bootstrap_sample(labels, np.random.default_rng(3))
    assert np.array_equal(a, b) and len(a) == len(labels)
    assert np.array_equal(np.bincount(labels[a]), [30, 20, 10])  # class balance kept exactly
    assert len(np.unique(a)) < len(labels)  # drawn with replacement


def test_plan_out_of_bag_masks_are_exactly_the_unseen_images() -> None:
    labels = np.repeat([0, 1, 2], 20)
    plan = plan_members(labels, members=5, bootstrap=True, seed=0)
    for k in range(5):
        seen = np.zeros(60, bool)
        seen[plan.train_index[k]] = True
        assert np.array_equal(plan.val_mask[k], ~seen)
    assert not np.array_equal(plan.train_index[0], plan.train_index[1])
    again = plan_members(labels, members=5, bootstrap=True, seed=0)
    assert np.array_equal(plan.train_index, again.train_index)


def test_plan_without_bootstrap_uses_the_holdout() -> None:
    labels = np.repeat([0, 1, 2], 10)
    plan = plan_members(labels, members=2, bootstrap=False, seed=0, holdout=np.array([0, 10, 20]))
    assert plan.train_index.shape == (2, 27)
    assert plan.val_mask.sum(1).tolist() == [3, 3]


def test_out_of_bag_probs_use_only_members_that_held_the_image_out() -> None:
    member_probs = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.2, 0.8]]])  # (N=2, K=2, C=2)
    val_mask = np.array([[True, False], [False, False]])  # member 0 held out image 0; nobody held out image 1
    probs, index = out_of_bag_probs(member_probs, val_mask)
    assert index.tolist() == [0] and probs.tolist() == [[1.0, 0.0]]
    assert average_members(member_probs)[1].tolist() == [0.35, 0.65]


def test_sequential_fallback_writes_the_same_kind_of_bundle(tiny_dataset: Path, tmp_path: Path) -> None:
    config = Path(__file__).parents[1] / "configs/smoke.yaml"
    over = {"data.image_size": 48, "train.epochs": 2, "ensemble.members": 2, "ensemble.bootstrap": True,
            "ensemble.packed": False}
    run = train_run(config, tiny_dataset, tmp_path / "seq", overrides=over)
    meta = read_meta(run.run_dir)
    assert meta["members"] == 2 and not (run.run_dir / "members").exists()
    assert {h["member"] for h in run.history} == {0, 1}
    plan = json.loads((run.run_dir / "plan.json").read_text())
    assert np.asarray(plan["train_index"]).shape == (2, 54)

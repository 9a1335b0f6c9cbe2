"""Ensemble members: who trains on what (bootstrap samples, out-of-bag validation). Combining: inference/combine.

A single model is the K=1 case of the same plan, so training has one code path: member k trains on the pool
indices `train_index[k]` and is validated on `val_mask[k]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MemberPlan:
    """Per-member training samples (indices into the training pool) and validation masks."""

    train_index: np.ndarray  # (K, n) int64, with repeats for bootstrap samples
    val_mask: np.ndarray  # (K, N) bool: images of the pool that validate member k
    bootstrap: bool

    @property
    def members(self) -> int:
        return int(self.train_index.shape[0])

    def member(self, k: int) -> MemberPlan:
        """The plan of member k alone (for sequential training)."""
        return MemberPlan(self.train_index[k : k + 1], self.val_mask[k : k + 1], self.bootstrap)


def bootstrap_sample(labels: np.ndarray, rng: np.random.Generator, stratified: bool = True) -> np.ndarray:
    """Indices drawn with replacement, the sample as large as the pool; per class when stratified."""
    n = len(labels)
    if not stratified:
        return np.sort(rng.integers(0, n, size=n))
    parts = [rng.choice(np.flatnonzero(labels == c), size=int((labels == c).sum())) for c in np.unique(labels)]
    return np.sort(np.concatenate(parts))


def plan_members(
    labels: np.ndarray,
    members: int,
    bootstrap: bool,
    seed: int,
    stratified: bool = True,
    holdout: np.ndarray | None = None,
) -> MemberPlan:
    """Assign each member its training sample and validation images.

    With bootstrap, member k trains on a bootstrap sample of the pool and is validated on its out-of-bag images.
    Without bootstrap, every member trains on the pool minus `holdout` and is validated on `holdout` (the
    stratified validation split carved from train/); members then differ only by initialisation and augmentation.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    if bootstrap:
        train_index = np.stack([bootstrap_sample(labels, rng, stratified) for _ in range(members)])
        val_mask = np.ones((members, n), dtype=bool)
        for k in range(members):
            val_mask[k, train_index[k]] = False
        if not val_mask.any(axis=1).all():
            raise ValueError("a bootstrap sample left no out-of-bag image; the training set is too small")
        return MemberPlan(train_index.astype(np.int64), val_mask, bootstrap=True)
    holdout = np.asarray(holdout if holdout is not None else [], dtype=np.int64)
    keep = np.setdiff1d(np.arange(n), holdout)
    train_index = np.tile(keep, (members, 1))
    val_mask = np.zeros((members, n), dtype=bool)
    val_mask[:, holdout] = True
    return MemberPlan(train_index.astype(np.int64), val_mask, bootstrap=False)

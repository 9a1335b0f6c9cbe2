"""Mixup (`train.mixup`): the mixed loss, the pairing, that training still learns, and that a resume is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from filegen import learnable_problem

from lungxray.config import ConfigError, TrainConfig, load_config
from lungxray.models.nets import build_model
from lungxray.runtime import seed_everything
from lungxray.training.loop import evaluate_members, fit, member_losses, mixup_batch
from lungxray.training.plan import plan_members
from lungxray.transforms.geometric import Augmenter, resolve_params


def test_mixed_loss_is_the_cross_entropy_against_the_mixed_label() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 3, generator=gen)
    y, y2 = torch.randint(0, 3, (6, 2), generator=gen), torch.randint(0, 3, (6, 2), generator=gen)
    lam = torch.rand(6, 2, generator=gen) * 0.5 + 0.5
    soft = lam[..., None] * F.one_hot(y, 3) + (1 - lam[..., None]) * F.one_hot(y2, 3)
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean(0)
    assert torch.allclose(member_losses(logits, y, None, 0.0, (y2, lam)), expected, atol=1e-6)
    ones = torch.ones(6, 2)
    assert torch.allclose(member_losses(logits, y, None, 0.0, (y2, ones)), member_losses(logits, y, None, 0.0))
    weights = torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.0, 3.0]])  # (K, C) class weights
    assert torch.allclose(member_losses(logits, y, weights, 0.0, (y2, ones)), member_losses(logits, y, weights, 0.0))


def test_mixup_batch_pairs_neighbours_with_the_larger_share_on_the_image_itself() -> None:
    x = torch.randn(8, 3, 4, 4)
    y = torch.arange(24).view(8, 3) % 3
    mixed, (partner, lam) = mixup_batch(x, y, 0.4, np.random.default_rng(0), total=8, offset=0)
    assert lam.shape == (8, 3) and bool((lam >= 0.5).all()) and bool((lam <= 1).all()) and lam.std() > 0.05
    nxt = torch.roll(torch.arange(8), -1)
    assert torch.equal(partner, y[nxt])
    assert torch.allclose(mixed, lam[..., None, None] * x + (1 - lam[..., None, None]) * x[nxt], atol=1e-6)
    # a data-parallel rank holding rows 4..7 of the global batch gets those rows' weights
    _, (_, lam_shard) = mixup_batch(x[4:], y[4:], 0.4, np.random.default_rng(0), total=8, offset=4)
    assert torch.equal(lam_shard, lam[4:])


def test_negative_mixup_is_refused() -> None:
    with pytest.raises(ConfigError, match="mixup"):
        load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml", ["train.mixup=-0.2"])


def _fit(epochs: int, run_dir: Path | None = None, resume: bool = False) -> tuple[torch.nn.Module, list]:
    seed_everything(0, deterministic=True)
    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=2, bootstrap=True, seed=0)
    model = build_model("compact_cnn", num_classes=3, members=2, width=4, dropout=0.3)
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, early_stopping_patience=0, precision="fp32", mixup=0.4)
    augmenter = Augmenter(resolve_params("seed", erase_prob=0.5), seed=1)
    state = fit(model, images, labels, plan, cfg, augmenter, seed=0, run_dir=run_dir, resume=resume)
    return model, [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in state.history]


def test_mixup_and_erasing_still_learn_and_resume_exactly(tmp_path: Path) -> None:
    full, history = _fit(6, tmp_path / "full")
    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=2, bootstrap=True, seed=0)
    accuracy = evaluate_members(full, images, labels, plan, torch.float32)["member_val_accuracy"]
    assert min(accuracy) > 0.6, accuracy  # chance is 1/3 on the out-of-bag images
    _fit(3, tmp_path / "cut")
    resumed, resumed_history = _fit(6, tmp_path / "cut", resume=True)
    assert resumed_history == history
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

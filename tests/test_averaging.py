"""The weight average (`train.ema_epochs`): its arithmetic, and that the weights validated are the weights kept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from filegen import learnable_problem
from torch import nn

from lungxray.config import ConfigError, TrainConfig, load_config
from lungxray.models.nets import build_model
from lungxray.runtime import seed_everything
from lungxray.training.averaging import WeightAverage, decay_for
from lungxray.training.loop import TrainState, evaluate_members, fit
from lungxray.training.plan import MemberPlan, plan_members
from lungxray.transforms.geometric import Augmenter, resolve_params


def test_decay_gives_the_time_constant_in_epochs() -> None:
    assert decay_for(0.0, 8) == 0.0
    steps = 8
    d = decay_for(2.0, steps)
    # a step change in the weights is 1 - 1/e of the way through after ema_epochs epochs
    assert d ** (2 * steps) == pytest.approx(math.exp(-1.0))
    assert decay_for(2.0, 80) > d  # more steps per epoch: each step counts less


def test_update_lerps_floats_copies_integers_and_applied_restores() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    avg = WeightAverage(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 5
    avg.update(0.75)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            expected = 0.75 * before[k] + 0.25 * v
            assert torch.allclose(avg.shadow[k], expected), k
        else:
            assert torch.equal(avg.shadow[k], v), k  # the step counter is not averaged
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), avg.applied(model):
        assert torch.equal(model[0].weight, avg.shadow["0.weight"])
        raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k  # the live weights are back, even after an error


def test_negative_time_constant_is_refused() -> None:
    smoke = Path(__file__).parents[1] / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError, match="ema_epochs"):
        load_config(smoke, ["train.ema_epochs=-1"])



def _fit_small(ema_epochs: float) -> tuple[nn.Module, TrainState, torch.Tensor, torch.Tensor, MemberPlan]:
    seed_everything(0, deterministic=True)
    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=2, bootstrap=True, seed=0)
    model = build_model("compact_cnn", num_classes=3, members=2, width=4, dropout=0.3)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=3e-3, early_stopping_patience=0, precision="fp32",
                      ema_epochs=ema_epochs)
    state = fit(model, images, labels, plan, cfg, Augmenter(resolve_params("seed"), seed=1), seed=0)
    return model, state, images, labels, plan


@pytest.mark.parametrize("ema_epochs", [0.0, 1.0])
def test_the_weights_kept_are_the_weights_validated(ema_epochs: float) -> None:
    """Each member ends with the weights whose out-of-bag loss was its best: with averaging on, the average's
    (re-scoring the final model reproduces the recorded figure)."""
    model, state, images, labels, plan = _fit_small(ema_epochs)
    rescored = evaluate_members(model, images, labels, plan, torch.float32)["member_val_loss"]
    for k in range(2):
        recorded = state.history[state.member_best_epoch[k] - 1]["member_val_loss"][k]
        assert rescored[k] == pytest.approx(recorded, rel=1e-5), k


def test_averaging_changes_what_is_validated() -> None:
    plain = [h["member_val_loss"] for h in _fit_small(0.0)[1].history]
    averaged = [h["member_val_loss"] for h in _fit_small(1.0)[1].history]
    assert plain[0] != averaged[0] and plain[-1] != averaged[-1]

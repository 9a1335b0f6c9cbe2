"""Members that stopped early leave the packed network (`train.prune_stopped`), without changing what is learned.

- `select_members` / `scatter_members` move members between packed networks exactly (weights, BN statistics,
  memory format), so the smaller network computes what those members of the big one compute.
- In `fit`, a member that stopped costs nothing afterwards (`members_computed` falls), keeps its best weights,
  and the members still training see the same images and augmentations as unpruned: with dropout off, their
  validation curves match an unpruned fit's up to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from filegen import learnable_problem

from lungxray.config import TrainConfig
from lungxray.models.nets import build_model, extract_member, scatter_members, select_members
from lungxray.runtime import seed_everything
from lungxray.training.loop import evaluate_members, fit
from lungxray.training.plan import plan_members
from lungxray.transforms.geometric import Augmenter, resolve_params


@pytest.mark.parametrize("name", ["compact_cnn", "seed_cnn"])
def test_selected_members_compute_what_they_computed_in_the_big_network(name: str) -> None:
    torch.manual_seed(0)
    args = {"image_size": 32, "width": 4}
    big = build_model(name, members=3, **args).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    big.micro_batch = 0  # an instance speed setting: carried over
    x = torch.randn(4, 3, 32, 32)
    small = select_members(big, [2, 0])
    assert small.members == 2 and small.micro_batch == 0 and small.build_args["members"] == 2
    conv = next(p for p in small.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    big.eval(), small.eval()
    with torch.no_grad():
        want, got = big(x), small(x[:, [2, 0]].contiguous())
    torch.testing.assert_close(got, want[:, [2, 0]], rtol=1e-5, atol=1e-5)
    for k, v in extract_member(small.state_dict(), 1, 2).items():  # small's member 1 is big's member 0
        torch.testing.assert_close(v, extract_member(big.state_dict(), 0, 3)[k])


def test_scatter_writes_back_only_the_selected_members() -> None:
    torch.manual_seed(0)
    big = build_model("compact_cnn", members=3, width=4, image_size=32)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    small = select_members(big, [1])
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    scatter_members(big.state_dict(), small.state_dict(), [1], 3)
    after = big.state_dict()
    for k in (0, 2):
        for name, v in extract_member(after, k, 3).items():
            assert torch.equal(v, extract_member(before, k, 3)[name]), name
    for name, v in extract_member(after, 1, 3).items():
        assert torch.equal(v, extract_member(small.state_dict(), 0, 1)[name]), name
    with pytest.raises(ValueError, match="distinct members"):
        select_members(big, [1, 1])


def _fit(prune: bool, dropout: float = 0.0) -> tuple[torch.nn.Module, list, list, tuple]:
    seed_everything(0, deterministic=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images, labels = learnable_problem()
    plan = plan_members(labels.numpy(), members=3, bootstrap=True, seed=0)
    model = build_model("compact_cnn", num_classes=3, members=3, width=4, dropout=dropout)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    cfg = TrainConfig(epochs=7, batch_size=8, lr=3e-3, monitor="val_accuracy", plateau_patience=1,
                      early_stopping_patience=2, precision="fp32", prune_stopped=prune, mixup=0.2)
    augmenter = Augmenter(resolve_params("seed"), seed=1)
    try:
        state = fit(model, images, labels, plan, cfg, augmenter, seed=0)
    finally:
        torch.set_num_threads(threads)
    return model, state.history, state.member_stopped, (images, labels, plan)


def test_stopped_members_leave_the_computation_and_the_others_learn_the_same() -> None:
    _, pruned, stopped, _ = _fit(prune=True)
    _, unpruned, stopped_unpruned, _ = _fit(prune=False)
    computed = [h["members_computed"] for h in pruned]
    assert computed[0] == 3 and min(computed) < 3, "the scenario: a member stops and the network shrinks"
    assert all(h["members_computed"] == 3 for h in unpruned)
    assert stopped == stopped_unpruned
    done: set[int] = set()  # members stopped before this epoch: unpruned, their drifting weights are scored
    for a, b in zip(pruned, unpruned, strict=True):  # same images, augmentations and mixup draws per member
        assert a["events"] == b["events"]
        live = [k for k in range(3) if k not in done]
        assert [a["member_val_accuracy"][k] for k in live] == [b["member_val_accuracy"][k] for k in live]
        torch.testing.assert_close(torch.tensor([a["member_val_loss"][k] for k in live]),
                                   torch.tensor([b["member_val_loss"][k] for k in live]), rtol=1e-3, atol=1e-4)
        done |= {int(e.split()[1]) for e in a["events"] if "stopped early" in e}


def test_a_stopped_member_ends_with_its_best_weights() -> None:
    """restore_best: every member, stopped or not, scores what it scored in its best validation epoch."""
    model, history, stopped, (images, labels, plan) = _fit(prune=True, dropout=0.3)
    assert any(stopped) and history[-1]["members_computed"] < 3
    val = evaluate_members(model, images, labels, plan, torch.float32)
    for k in range(3):
        best = max(h["member_val_accuracy"][k] for h in history)
        assert val["member_val_accuracy"][k] == pytest.approx(best), k

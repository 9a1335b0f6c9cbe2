"""The training loop's validation runs the training kernels in eval mode (`models.kernels.inference`) and scores
what the plain modules score; everywhere else eval mode keeps the plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lungxray.models import nets
from lungxray.models.kernels import conv3x3 as c3
from lungxray.models.kernels import patch_stem
from lungxray.models.kernels.inference import kernels_allowed, kernels_for_inference
from lungxray.models.nets import build_model
from lungxray.training.loop import evaluate_members, member_columns, predict_members
from lungxray.training.plan import plan_members

pytestmark = pytest.mark.usefixtures("not_deterministic")  # another test may have left deterministic mode on
needs_kernel = pytest.mark.skipif(not c3.conv3x3_available(), reason="the conv3x3 kernel needs gcc and AVX2+FMA")


def test_eval_mode_uses_the_kernels_only_inside_the_context_and_without_gradients() -> None:
    module = torch.nn.Conv2d(16, 16, 3).eval()
    assert not kernels_allowed(module)
    with kernels_for_inference():
        assert not kernels_allowed(module)  # gradients on: Grad-CAM and the like keep the plain module
        with torch.no_grad():
            assert kernels_allowed(module)
    with torch.no_grad():
        assert not kernels_allowed(module)  # prediction, evaluation, the server: the plain module
    assert kernels_allowed(module.train())


@needs_kernel
def test_validation_scores_equal_the_plain_modules(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model("compact_cnn", members=3, image_size=64).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (10, 64, 64), dtype=torch.uint8)
    calls = []
    monkeypatch.setattr(nets, "conv3x3", lambda conv, t: calls.append(conv) or c3.conv3x3(conv, t))
    fast = predict_members(model, images, torch.float32, batch_size=4)
    assert calls and model.training  # the kernels ran, and the model is back in the mode it was in
    calls.clear()
    for module in (nets, c3, patch_stem):
        monkeypatch.setattr(module, "kernels_allowed", lambda m: m.training)
    plain = predict_members(model, images, torch.float32, batch_size=4)
    assert not calls
    assert (fast - plain).abs().max().item() <= 1e-4 * plain.abs().max().item()


def test_member_columns_put_each_members_own_images_side_by_side() -> None:
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = member_columns(mask)
    assert index.tolist() == [[0, 2, 3], [1, 1, 1], [0, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [False, False, False]]


def test_validation_on_own_columns_scores_what_scoring_the_union_scores() -> None:
    """Each member on its own out-of-bag images, packed side by side, equals every member on every image masked."""
    torch.manual_seed(1)
    model = build_model("compact_cnn", members=3, image_size=64)
    images = torch.randint(0, 256, (11, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 3, (11,))
    plan = plan_members(labels.numpy(), members=3, bootstrap=True, seed=4)
    got = evaluate_members(model, images, labels, plan, torch.float32, batch_size=4)
    logits = predict_members(model, images, torch.float32, batch_size=4)  # (N, K, C): every member, every image
    for k in range(3):
        own = torch.as_tensor(plan.val_mask[k])
        ce = F.cross_entropy(logits[own, k], labels[own]).item()
        acc = (logits[own, k].argmax(-1) == labels[own]).float().mean().item()
        assert got["member_val_loss"][k] == pytest.approx(ce, rel=1e-4)
        assert got["member_val_accuracy"][k] == pytest.approx(acc)

"""The training loop's validation runs the training kernels in eval mode (`models.kernels.inference`) and scores
what the plain modules score; everywhere else eval mode keeps the plain modules."""

from __future__ import annotations

import pytest
import torch

from lungxray.models import nets
from lungxray.models.kernels import conv3x3 as c3
from lungxray.models.kernels import patch_stem
from lungxray.models.kernels.inference import kernels_allowed, kernels_for_inference
from lungxray.models.nets import build_model
from lungxray.training.loop import predict_members

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

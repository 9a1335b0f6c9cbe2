"""The patch-stem kernel (`models.kernels.patch_stem`) computes what nn.Conv2d computes, output and weight/bias
gradients, in whichever layout the batch comes, and stands aside where it does not apply."""

from __future__ import annotations

import pytest
import torch
from pooling import gradients_where_pools_agree

from lungxray.models import nets
from lungxray.models.kernels import patch_stem as ps
from lungxray.models.nets import build_model

needs_kernel = pytest.mark.skipif(not ps.patch_stem_available(), reason="the patch-stem kernel needs gcc, AVX2+FMA")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item() or 1.0
    assert (a - b).abs().max().item() <= 2e-5 * scale, (a - b).abs().max().item() / scale


def _input(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    x = torch.randn(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a crop of a bigger batch: no dimension is contiguous with the next
        big = torch.randn(shape[0], shape[1] + 1, shape[2] + 3, shape[3] + 5)
        return big[:, 1:, 2:-1, 3:-2]
    return x


@needs_kernel
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("groups,cin,s,cout,size,bias", [
    (10, 1, 4, 16, (32, 32), False),  # the reference's stem, smaller images
    (3, 2, 2, 8, (13, 11), True),     # sizes that s does not divide: the last row and column are dropped
    (2, 1, 4, 24, (9, 12), True),     # 16 + 8 output channels
    (1, 4, 4, 32, (8, 8), True),      # a 64-value patch, the most the kernel takes
])
def test_forward_and_gradients_match_conv2d(layout, groups, cin, s, cout, size, bias) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(groups * cin, groups * cout, s, s, groups=groups, bias=bias).train()
    x = _input((3, groups * cin, *size), layout)
    assert ps.use_patch_stem(conv, x)
    y = ps.patch_stem(conv, x)
    g = torch.randn_like(y)
    y.backward(g)
    got = [conv.weight.grad.clone()] + ([conv.bias.grad.clone()] if bias else [])
    conv.zero_grad()
    ref = conv(x)
    ref.backward(g)
    _close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, [conv.weight.grad] + ([conv.bias.grad] if bias else []), strict=True):
        _close(a, b)


@needs_kernel
def test_it_stands_aside_where_it_does_not_compute_the_same_function(monkeypatch) -> None:
    conv = torch.nn.Conv2d(2, 32, 4, 4, groups=2, bias=False).train()
    x = torch.randn(2, 2, 16, 16)
    assert ps.use_patch_stem(conv, x)
    assert not ps.use_patch_stem(conv, x.clone().requires_grad_())  # no input gradient in the kernel
    assert not ps.use_patch_stem(conv.eval(), x)  # evaluation, Grad-CAM and export run the plain module
    conv.train()
    assert not ps.use_patch_stem(conv, x.double())
    assert not ps.use_patch_stem(torch.nn.Conv2d(2, 32, 4, 2, groups=2).train(), x)  # overlapping patches
    assert not ps.use_patch_stem(torch.nn.Conv2d(2, 20, 4, 4, groups=2).train(), x)  # 10 per group: not 8 | co
    assert not ps.use_patch_stem(torch.nn.Conv2d(10, 16, 4, 4).train(), torch.randn(2, 10, 16, 16))  # 160 > 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ps.use_patch_stem(conv, x)
    monkeypatch.setenv("LUNGXRAY_FUSED", "0")
    assert not ps.use_patch_stem(conv, x)


@needs_kernel
def test_a_compact_cnn_training_step_gives_the_same_gradients_with_the_kernel(monkeypatch) -> None:
    torch.manual_seed(3)
    model = build_model("compact_cnn", members=3, image_size=64, dropout=0.0).train()
    calls = []
    monkeypatch.setattr(nets, "patch_stem", lambda conv, t: calls.append(conv) or ps.patch_stem(conv, t))
    with_kernel = lambda: monkeypatch.setattr(nets, "use_patch_stem", ps.use_patch_stem)  # noqa: E731
    without = lambda: monkeypatch.setattr(nets, "use_patch_stem", lambda conv, t: False)  # noqa: E731
    ours, theirs = gradients_where_pools_agree(model, [with_kernel, without], (4, 3, 64, 64), monkeypatch)
    assert calls
    for name, g in ours.items():
        _close(g, theirs[name])

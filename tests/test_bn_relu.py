"""The fused BatchNorm -> ReLU kernel (`models.kernels.bn_relu`) computes what nn.BatchNorm2d and F.relu compute in
training: output, every gradient, and the running statistics the module keeps; and stands aside elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pooling import gradients_where_pools_agree

from lungxray.models import nets
from lungxray.models.kernels import bn_relu as br
from lungxray.models.nets import build_model

needs_kernel = pytest.mark.skipif(not br.bn_relu_available(), reason="the BN-ReLU kernel needs gcc and AVX2+FMA")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    scale = b.abs().max().item() or 1.0
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale


def _pair(c: int, momentum: float | None) -> tuple[torch.nn.BatchNorm2d, torch.nn.BatchNorm2d]:
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn, copy.deepcopy(bn)


@needs_kernel
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape,momentum", [((4, 16, 8, 8), 0.1), ((3, 24, 5, 7), None), ((16, 64, 1, 1), 0.3)])
def test_two_steps_match_batchnorm_and_relu(shape, momentum, relu) -> None:
    torch.manual_seed(0)
    bn, ref = _pair(shape[1], momentum)
    for step in range(2):  # the second step starts from the running statistics the first one left
        x = (torch.randn(shape) * 3 + step).contiguous(memory_format=torch.channels_last).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        assert br.use_bn_relu(bn, x)
        y = br.bn_relu(bn, x, relu)
        y_ref = F.relu(ref(x_ref)) if relu else ref(x_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert y.is_contiguous(memory_format=torch.channels_last)
        _close(y, y_ref)
        _close(x.grad, x_ref.grad)
        for name in ("weight", "bias"):
            _close(getattr(bn, name).grad, getattr(ref, name).grad)
        _close(bn.running_mean, ref.running_mean)
        _close(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


@needs_kernel
def test_a_nan_in_the_map_comes_out_as_nan() -> None:
    """The ReLU must not turn a diverged activation into a silent zero."""
    bn, _ = _pair(8, 0.1)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 3, 1, 1] = float("nan")
    assert torch.isnan(br.bn_relu(bn, x)[:, 3]).all()  # the channel's statistics are NaN, so is all of it


@needs_kernel
def test_it_stands_aside_where_it_does_not_compute_the_same_function(monkeypatch) -> None:
    bn, _ = _pair(16, 0.1)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert br.use_bn_relu(bn, x)
    assert not br.use_bn_relu(bn, x.contiguous())  # NCHW
    assert not br.use_bn_relu(bn, x.double())
    assert not br.use_bn_relu(bn, torch.randn(1, 16, 1, 1).contiguous(memory_format=torch.channels_last))
    assert not br.use_bn_relu(torch.nn.BatchNorm2d(12).train(), torch.randn(2, 12, 4, 4))  # 8 does not divide 12
    assert not br.use_bn_relu(torch.nn.BatchNorm2d(16, track_running_stats=False).train(), x)
    assert not br.use_bn_relu(bn.eval(), x)  # evaluation uses the running statistics: PyTorch's op
    bn.train()
    handle = bn.register_forward_hook(lambda *a: None)
    assert not br.use_bn_relu(bn, x)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not br.use_bn_relu(bn, x)
    monkeypatch.setenv("LUNGXRAY_FUSED", "0")
    assert not br.use_bn_relu(bn, x)


@needs_kernel
def test_a_compact_cnn_training_step_gives_the_same_gradients_and_statistics(monkeypatch) -> None:
    torch.manual_seed(4)
    model = build_model("compact_cnn", members=2, image_size=64, dropout=0.0).train()
    calls = []
    monkeypatch.setattr(nets, "bn_relu", lambda bn, t, relu: calls.append(bn) or br.bn_relu(bn, t, relu))

    def use(on: bool) -> None:
        monkeypatch.setattr(nets, "use_bn_relu", br.use_bn_relu if on else lambda bn, t: False)
        for m in model.modules():  # every run starts from the same running statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()

    ours, theirs = gradients_where_pools_agree(model, [lambda: use(True), lambda: use(False)], (4, 2, 64, 64),
                                               monkeypatch)
    assert len(calls) >= 5  # every block of the last draw's fused run
    for name, g in ours.items():
        _close(g, theirs[name], 1e-4)

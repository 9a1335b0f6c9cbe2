"""BatchNorm2d in training (batch statistics) followed by ReLU, for fp32 channels-last maps on CPU, in two C passes
each way (csrc/bn_relu.c).

PyTorch runs the pair as five passes over the map forward and backward together plus a masked copy of the
gradient; on 2 Zen 3 cores they were ~190 ms of the reference's ~1.1 s training step, all memory traffic
(docs/performance.md). The kernel reads x twice and writes y once forward; backward recomputes the ReLU's mask from
x (nothing else is saved: not y, not a mask) and writes dx once. The running statistics are updated as
`nn.BatchNorm2d` does (momentum, or the cumulative average when it is None; the unbiased variance), so a module
trained either way is the same module. Results equal PyTorch's up to float rounding (tests/test_bn_relu.py); the
statistics are summed in double.

Used where it computes the same function: a training-mode `nn.BatchNorm2d` with affine parameters and running
statistics and no hooks, on a 4-D fp32 channels-last CPU map of more than one value per channel and a multiple of
8 channels, no autocast or tracing. Elsewhere, or under `LUNGXRAY_FUSED=0`, the modules run as they are.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lungxray.models.kernels.fused_stem import ENV_SWITCH, tracing
from lungxray.models.kernels.loader import LazyLibrary

__all__ = ["bn_relu", "bn_relu_available", "use_bn_relu"]

SOURCE = Path(__file__).with_name("csrc") / "bn_relu.c"
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {"bn_relu_forward": (_P,) * 7 + (_I64, _I64, ctypes.c_double, _INT, _INT),
              "bn_relu_backward": (_P,) * 9 + (_I64, _I64, _INT, _INT)}
_kernels = LazyLibrary(SOURCE, SIGNATURES, "BatchNorm and ReLU stay PyTorch's")


def bn_relu_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call); False under LUNGXRAY_FUSED=0."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _kernels.get() is not None


def use_bn_relu(bn: nn.Module, x: Tensor) -> bool:
    """Whether `bn_relu(bn, x, relu)` can stand in for `relu(bn(x))` / `bn(x)` (terms in the module docstring)."""
    if not (isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats):
        return False
    if bn._forward_hooks or bn._forward_pre_hooks or tracing() or torch.is_autocast_enabled("cpu"):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or bn.weight.dtype != torch.float32:
        return False
    n, c, h, w = x.shape
    return (c % 8 == 0 and n * h * w > 1 and x.is_contiguous(memory_format=torch.channels_last)
            and bn.running_mean is not None and bn_relu_available())


def bn_relu(bn: nn.BatchNorm2d, x: Tensor, relu: bool = True) -> Tensor:
    """relu(bn(x)) (or bn(x)) in training, updating `bn`'s running statistics; channels_last like x."""
    y, mean, var = _BatchNormReLU.apply(x, bn.weight, bn.bias, bn.eps, relu)
    rows = x.numel() // x.shape[1]
    tracked, running_mean, running_var = bn.num_batches_tracked, bn.running_mean, bn.running_var
    assert tracked is not None and running_mean is not None and running_var is not None  # use_bn_relu checked
    with torch.no_grad():
        tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(tracked)
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var * (rows / (rows - 1)), factor)  # the unbiased variance, as nn.BatchNorm2d keeps
    return y


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float,  # type: ignore[override]
                relu: bool) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        y = torch.empty_like(x)  # channels_last, like x
        mean, invstd, var = torch.empty(c), torch.empty(c), torch.empty(c)
        w, b = weight.detach().contiguous(), bias.detach().contiguous()
        _kernels.loaded().bn_relu_forward(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                          invstd.data_ptr(), var.data_ptr(), x.numel() // c, c, eps, int(relu),
                                          torch.get_num_threads())
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.relu = relu
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, g: Tensor, _gm: Tensor | None, _gv: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w, b, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        gl = g.contiguous(memory_format=torch.channels_last)  # free when it already is
        dx, dw, db = torch.empty_like(x), torch.empty(c), torch.empty(c)
        _kernels.loaded().bn_relu_backward(x.data_ptr(), gl.data_ptr(), w.data_ptr(), b.data_ptr(), mean.data_ptr(),
                                           invstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(),
                                           x.numel() // c, c, int(ctx.relu), torch.get_num_threads())
        return dx, dw, db, None, None

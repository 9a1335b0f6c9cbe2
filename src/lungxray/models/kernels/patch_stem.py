"""compact_cnn's patch stem (an s x s convolution with stride s, one group per packed member) for fp32 training on
CPU, in one C pass each way (csrc/patch_stem.c).

oneDNN runs this convolution, 1 input channel per group, at ~23 GFLOP/s on 2 Zen 3 cores and wants its input
channels-last, which cost the reference's training step a transposing copy of the (32, 10, 256, 256) batch; the
kernel reads the batch in whatever layout it comes in (by strides), writes the output channels-last as the next
layer wants it, and computes the weight gradient as a sum of patch (x) output-gradient products: ~90 ms of a
~1.2 s step became ~30 (docs/performance.md). No input gradient: the input of a stem is data. Results equal
oneDNN's up to float summation order (tests/test_patch_stem.py).

Used where it computes the same function: training (and the training loop's validation, inside
`inference.kernels_for_inference`), a CPU fp32 input that needs no gradient, fp32 weights and no
autocast (under bf16 autocast oneDNN's bf16 path stays), kernel size equal to the stride, no padding or dilation,
output channels per group a multiple of 8 and at most 64 values per patch (in-channels per group x s^2), no hooks
or tracing. Where gcc or AVX2+FMA is missing, or under `LUNGXRAY_FUSED=0`, the convolution stays oneDNN's.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lungxray.models.kernels.fused_stem import ENV_SWITCH, tracing
from lungxray.models.kernels.inference import kernels_allowed
from lungxray.models.kernels.loader import LazyLibrary

__all__ = ["MAX_PATCH", "patch_stem", "patch_stem_available", "use_patch_stem"]

SOURCE = Path(__file__).with_name("csrc") / "patch_stem.c"
MAX_PATCH = 64  # MAX_L in the C file: values per member's patch
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"patch_stem_forward": (_P,) * 4 + (_I64,) * 11 + (ctypes.c_int,),
              "patch_stem_backward_weight": (_P,) * 4 + (_I64,) * 11 + (ctypes.c_int,)}
_kernels = LazyLibrary(SOURCE, SIGNATURES, "the patch stem stays oneDNN's convolution")


def patch_stem_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call); False under LUNGXRAY_FUSED=0."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _kernels.get() is not None


def use_patch_stem(conv: torch.nn.Module, x: Tensor) -> bool:
    """Whether `patch_stem(conv, x)` can stand in for `conv(x)` (the terms are in the module docstring)."""
    if not (isinstance(conv, torch.nn.Conv2d) and kernels_allowed(conv)) or tracing() or x.requires_grad:
        return False
    if conv._forward_hooks or conv._forward_pre_hooks or torch.is_autocast_enabled("cpu"):
        return False
    w = conv.weight
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    s = conv.kernel_size[0]
    if (conv.kernel_size != (s, s) or conv.stride != (s, s) or conv.padding != (0, 0) or conv.dilation != (1, 1)
            or x.dim() != 4 or min(x.shape[-2:]) < s or x.shape[0] == 0):
        return False
    cout = w.shape[0] // conv.groups
    return cout % 8 == 0 and w.shape[1] * s * s <= MAX_PATCH and patch_stem_available()


def patch_stem(conv: torch.nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` as (N, C_out, H // s, W // s), channels_last. Check `use_patch_stem` first."""
    out: Tensor = _PatchStem.apply(x, conv.weight, conv.bias, conv.groups)
    return out


def _shape_args(x: Tensor, weight: Tensor, groups: int) -> tuple[int, ...]:
    """The C functions' (n, groups, cin, h, w, s, co, sn, sc, sh, sw)."""
    n, _, h, w = x.shape
    return (n, groups, weight.shape[1], h, w, weight.shape[-1], weight.shape[0] // groups, *x.stride())


def _per_group(weight: Tensor, groups: int) -> Tensor:
    """(G*Co, Cin, s, s) -> (G, L, Co), L = Cin*s*s: each member's weights with its output channels innermost."""
    return weight.detach().reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2).contiguous()


class _PatchStem(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        n, _, h, w = x.shape
        s = weight.shape[-1]
        out = torch.empty((n, weight.shape[0], h // s, w // s), memory_format=torch.channels_last)  # not a view
        wt, b = _per_group(weight, groups), bias.detach().contiguous() if bias is not None else None
        _kernels.loaded().patch_stem_forward(x.data_ptr(), wt.data_ptr(), b.data_ptr() if b is not None else None,
                                             out.data_ptr(), *_shape_args(x, weight, groups), torch.get_num_threads())
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.has_bias = groups, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        groups = ctx.groups
        g = grad.permute(0, 2, 3, 1).contiguous()  # (N, Ho, Wo, G*Co): free when grad is channels_last
        co = weight.shape[0] // groups
        dwt = torch.empty((groups, weight[0].numel(), co))
        db = torch.empty((groups * co,)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        _kernels.loaded().patch_stem_backward_weight(x.data_ptr(), g.data_ptr(), dwt.data_ptr(),
                                                     db.data_ptr() if db is not None else None,
                                                     *_shape_args(x, weight, groups), torch.get_num_threads())
        dw = dwt.transpose(1, 2).reshape(weight.shape) if ctx.needs_input_grad[1] else None
        return None, dw, db, None

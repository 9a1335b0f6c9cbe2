"""Fused kernels of `seed_cnn` on CPU: the first block (3x3 valid conv -> 2x2 max-pool -> ReLU) in one small C
kernel, and the 2x2 max-pool -> ReLU after the (oneDNN) convolutions of blocks 2 and 3 in another.

The eager block is the most expensive part of a seed training step: oneDNN's convolution with a single input
channel cannot use the matrix units, and the max-pool reads and writes a 32x254x254 map per image, stores int64
indices and zero-fills a full-resolution gradient. The kernel (csrc/seed_stem.c) computes, per pooled output,
the four conv values of its 2x2 window from the 4x4 input patch, keeps their maximum, adds the bias and applies
the ReLU; it stores only the pooled output and a uint8 code (argmax 0-3, +4 where the ReLU clipped). Backward
recomputes nothing: dW and db are sums of the output gradient times the input at the argmax offset.

Blocks 2-3 (`fused_pool_relu`): one pass over the conv output writes the pooled, ReLU'd map (same dtype,
channels_last) and a uint8 code per output (argmax, +4 where the ReLU clipped); backward writes the conv output's
whole gradient in one pass from it. Values and gradients are bit-identical to relu(max_pool2d(x, 2)), NaN
included; PyTorch's max-pool stores int64 indices, zero-fills a full-resolution gradient and then scatters into
it, and the ReLU reads and writes the pooled map twice more.

First block: same network, same parameters: the result equals `relu(max_pool2d(conv2d(x, w, b, groups=K), 2))` up
to floating-point rounding (the kernel accumulates in fp32 even under bf16 autocast, where the eager conv runs in
bf16). Under bf16 autocast the output is written in bf16, channels_last, as the next convolution wants it.

The kernels are plain C (csrc/seed_stem.c), compiled at first use by `loader.load_library` into
`$LUNGXRAY_CACHE/kernels` and loaded with ctypes. Where it is
unavailable (no gcc, not x86-64, a failed build, `LUNGXRAY_FUSED=0`) callers keep the eager path; one warning
is logged. Nothing here is needed for correctness: every model runs without it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lungxray.models.kernels.loader import declare_all, load_library

log = logging.getLogger(__name__)

__all__ = ["ENV_SWITCH", "bf16_autocast", "fused_available", "fused_pool_relu", "fused_stem", "kernel_info",
           "library", "tracing", "use_fused_pool_relu", "use_fused_stem"]

ENV_SWITCH = "LUNGXRAY_FUSED"  # "0" turns the kernel off
SOURCE = Path(__file__).with_name("csrc") / "seed_stem.c"

# The C functions' parameters, in order, as ctypes types: the one place the Python side states them.
# "p" a pointer, "i64" int64_t, "i" int; every kernel returns void. tests/test_fused_stem.py parses the prototypes
# in SOURCE and checks them against this table, so the two cannot drift apart.
_CTYPES = {"p": ctypes.c_void_p, "i64": ctypes.c_int64, "i": ctypes.c_int}
SIGNATURES: dict[str, tuple[str, ...]] = {
    "seed_stem_forward": ("p",) * 5 + ("i64",) * 5 + ("i", "i"),
    "seed_stem_backward_weight": ("p",) * 5 + ("i64",) * 5 + ("i", "i"),
    "seed_stem_backward_input": ("p",) * 4 + ("i64",) * 5 + ("i", "i"),
    "seed_pool_relu_forward": ("p",) * 3 + ("i64",) * 4 + ("i", "i", "i"),
    "seed_pool_relu_backward": ("p",) * 3 + ("i64",) * 4 + ("i", "i"),
}


declare = declare_all(  # ctypes types of SIGNATURES; every kernel returns its status
    {name: tuple(_CTYPES[p] for p in params) for name, params in SIGNATURES.items()})
_lock = threading.Lock()
_state: dict[str, Any] = {"lib": None, "tried": False, "reason": None, "compile_s": None, "path": None}


def _load() -> ctypes.CDLL | None:
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["tried"] = True
        reason = None
        if _switched_off():
            reason = f"{ENV_SWITCH}=0"
        else:
            built = load_library(SOURCE, declare)
            _state.update(lib=built.lib, path=built.path, compile_s=built.compile_s)
            reason = built.reason
        if reason is not None:
            _state["reason"] = reason
            if reason != f"{ENV_SWITCH}=0":
                log.warning("fused seed_cnn first block unavailable (%s); using the eager path", reason)
        return _state["lib"]


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first call), or None where it is unavailable or switched off."""
    return None if _switched_off() else _load()


def fused_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call); False under LUNGXRAY_FUSED=0."""
    return library() is not None


def kernel_info() -> dict[str, Any]:
    """Where the library is, how long its compilation took in this process (None: found in the cache), or why
    it is unavailable."""
    if not fused_available():
        reason = f"{ENV_SWITCH}=0" if _switched_off() else _state["reason"]
        return {"available": False, "path": None, "compile_s": None, "reason": reason}
    return {"available": True, "path": _state["path"], "compile_s": _state["compile_s"], "reason": None}


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class _FusedStem(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, groups: int, out_bf16: bool) -> Tensor:
        lib = _state["lib"]
        n, _, h, w = x.shape
        kc = weight.shape[0]
        k, c = groups, kc // groups
        ho, wo = (h - 2) // 2, (w - 2) // 2
        x32 = x.detach().to(torch.float32).contiguous()
        wt = weight.detach().to(torch.float32).reshape(k, c, 9).transpose(1, 2).contiguous()  # (K, 9, C)
        b32 = bias.detach().to(torch.float32).contiguous()
        out = torch.empty((n, kc, ho, wo), dtype=torch.bfloat16 if out_bf16 else torch.float32,
                          memory_format=torch.channels_last)  # (N, Ho, Wo, K*C) in memory; not a view
        code = torch.empty((n, ho, wo, kc), dtype=torch.uint8)
        lib.seed_stem_forward(_ptr(x32), _ptr(wt), _ptr(b32), _ptr(out), _ptr(code), n, k, c, h, w, int(out_bf16),
                              torch.get_num_threads())
        ctx.save_for_backward(x32, weight, code)
        ctx.groups = groups
        return out  # (N, K*C, Ho, Wo), channels_last

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        lib = _state["lib"]
        x32, weight, code = ctx.saved_tensors
        n, _, h, w = x32.shape
        kc = weight.shape[0]
        k, c = ctx.groups, kc // ctx.groups
        g_bf16 = grad.dtype == torch.bfloat16
        g = grad if g_bf16 else grad.to(torch.float32)
        g = g.permute(0, 2, 3, 1).contiguous()  # (N, Ho, Wo, K*C): free when grad is channels_last
        threads = torch.get_num_threads()
        dx = dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw32 = torch.empty((kc, 9), dtype=torch.float32)
            db32 = torch.empty((kc,), dtype=torch.float32)
            lib.seed_stem_backward_weight(_ptr(x32), _ptr(g), _ptr(code), _ptr(dw32), _ptr(db32), n, k, c, h, w,
                                          int(g_bf16), threads)
            dw = dw32.view(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db32.to(weight.dtype) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            w32 = weight.detach().to(torch.float32).reshape(kc, 9).contiguous()
            dx32 = torch.empty((n, k, h, w), dtype=torch.float32)
            lib.seed_stem_backward_input(_ptr(w32), _ptr(g), _ptr(code), _ptr(dx32), n, k, c, h, w, int(g_bf16),
                                         threads)
            dx = dx32
        return dx, dw, db, None, None


def tracing() -> bool:
    """Under TorchScript tracing, ONNX export, torch.compile or torch.export: the graph must see plain ops."""
    compiler = torch.compiler
    if compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting()):
        return True
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export())


def bf16_autocast() -> bool:
    """Whether CPU autocast is on with bf16: the kernels then write bf16, as the replaced ops would."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def use_fused_stem(conv: torch.nn.Module, x: Tensor) -> bool:
    """Whether `fused_stem(x, conv.weight, conv.bias, conv.groups)` can replace conv -> 2x2 max-pool -> ReLU.

    Needs: the kernel, a CPU tensor, a 3x3 valid stride-1 undilated conv with bias and one input channel per
    group, an fp32 weight, fp32/bf16 input of at least 4x4, no tracing or export, and no autocast other than bf16.
    """
    if tracing():  # fused_available() below also honours LUNGXRAY_FUSED=0
        return False
    if not isinstance(conv, torch.nn.Conv2d) or conv.bias is None:
        return False
    w = conv.weight
    if (x.device.type != "cpu" or w.device.type != "cpu" or w.dtype != torch.float32 or x.dim() != 4
            or x.dtype not in (torch.float32, torch.bfloat16)):
        return False
    if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1)
            or conv.padding_mode != "zeros" or w.shape[1] != 1 or x.shape[1] != conv.groups
            or w.shape[0] % conv.groups or x.shape[-1] < 4 or x.shape[-2] < 4):
        return False
    if torch.is_autocast_enabled("cpu") and not bf16_autocast():
        return False
    return fused_available()


def fused_stem(x: Tensor, weight: Tensor, bias: Tensor, groups: int) -> Tensor:
    """relu(max_pool2d(conv2d(x, weight, bias, groups=groups), 2)) on CPU; (N, K, H, W) -> (N, K*C, Ho, Wo).

    Check `use_fused_stem` first. The output is channels_last; bf16 under bf16 autocast, else fp32.
    """
    out: Tensor = _FusedStem.apply(x, weight, bias, groups, bf16_autocast())
    return out


# ------------------------------------------------------------------------------ blocks 2-3: max-pool -> ReLU
class _FusedPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, relu: bool) -> Tensor:
        lib = _state["lib"]
        n, c, h, w = x.shape
        xl = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): free when x is channels_last
        out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)  # not a view
        code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        bf16 = x.dtype == torch.bfloat16
        lib.seed_pool_relu_forward(_ptr(xl), _ptr(out), _ptr(code), n, h, w, c, int(relu), int(bf16),
                                   torch.get_num_threads())
        ctx.save_for_backward(code)
        ctx.in_shape = (h, w)
        return out  # (N, C, Ho, Wo), channels_last: an in-place ReLU or BN after it is allowed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        lib = _state["lib"]
        (code,) = ctx.saved_tensors
        n, _, _, c = code.shape
        h, w = ctx.in_shape
        dtype = torch.bfloat16 if grad.dtype == torch.bfloat16 else torch.float32
        g = grad.to(dtype).permute(0, 2, 3, 1).contiguous()  # free when grad is channels_last
        dx = torch.empty((n, h, w, c), dtype=dtype)
        lib.seed_pool_relu_backward(_ptr(g), _ptr(code), _ptr(dx), n, h, w, c, int(dtype == torch.bfloat16),
                                    torch.get_num_threads())
        return dx.permute(0, 3, 1, 2), None  # channels_last; autograd casts it to the input's dtype if they differ


def use_fused_pool_relu(x: Tensor) -> bool:
    """Whether `fused_pool_relu(x)` can replace relu(max_pool2d(x, 2)): the kernel, a 4-D fp32/bf16 CPU tensor of at
    least 2x2, no tracing or export."""
    if tracing():  # fused_available() below also honours LUNGXRAY_FUSED=0
        return False
    if (x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16)
            or x.shape[-1] < 2 or x.shape[-2] < 2 or x.numel() == 0):
        return False
    return fused_available()


def fused_pool_relu(x: Tensor, relu: bool = True) -> Tensor:
    """relu(max_pool2d(x, 2)) on CPU in one pass, (N, C, H, W) -> (N, C, H//2, W//2), same dtype, channels_last;
    with `relu=False` max_pool2d(x, 2) alone (the pool before BatchNorm of `pool_first` blocks).

    Check `use_fused_pool_relu` first. Values are exact (the selected input or 0), and so are gradients: backward
    writes the input gradient in one pass (the output gradient at the argmax, where the ReLU passed; 0 elsewhere)
    from a uint8 code per output, instead of int64 indices and a zero-filled map.
    """
    out: Tensor = _FusedPoolReLU.apply(x, relu)
    return out

"""3x3 stride-1 convolutions for fp32 training on AVX2 CPUs, where oneDNN leaves much of the FMA peak unused.

Measured on a 2-core AMD EPYC Zen 3 (AVX2 + FMA, fp32; docs/performance.md, "AVX2"): oneDNN's forward of the seed
network's convolutions runs near the peak, but its weight gradient at 25-50% of it, and the grouped convolutions
of packed ensemble members (16-128 channels per member) at 10-70%. csrc/conv3x3.c computes forward and weight
gradient with register tiles over channels-last data, and both also as Winograd F(2x2, 3x3) and F(4x4, 3x3) (2.25x
and 4x fewer multiplies); the input gradient is the forward of the output gradient, zero-padded by 2 - padding, with
the kernel flipped and its channels swapped.

Which implementation runs is decided per pass and per layer shape by measurement, not by rule: the first time a
shape is seen, `plan_for` times this file's kernel against oneDNN for the forward, input-gradient and weight-gradient
passes (interleaved, best of 3) and keeps the faster of each, cached in memory and on disk under
`$LUNGXRAY_CACHE/autotune/conv3x3/plans.json` per CPU, instruction-set limit and torch version. A shape next to a
measured one (another batch or group bucket, fewer threads in the calibration) borrows its plan where measuring
would cost more than the choice could gain (`_borrowed_plan`). `LUNGXRAY_CONV3X3`
forces it: `direct` (the direct loops), `winograd` (every pass as F(2x2, 3x3) where the channels allow),
`winograd4` (the same with F(4x4, 3x3)), `onednn`, or `auto` (the default). `LUNGXRAY_FUSED=0` turns it off with
the other kernels.

Used only where it computes the same function: training and the training loop's validation (eval-mode forward
under no_grad inside `inference.kernels_for_inference`; other evaluation, export, Grad-CAM and tracing run the
plain module; deterministic runs too, as a measured choice could differ between a run and its resumption), CPU, fp32
weights and input with no autocast, 3x3 kernel, stride 1, padding 0 or 1, no dilation, zero padding mode, output
channels per group a multiple of 16 and input channels per group a multiple of 2 (of 16 for the kernel's input
gradient). Results equal oneDNN's up to float summation order (tests/test_conv3x3.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lungxray.hostinfo import cache_root
from lungxray.io.files import write_json
from lungxray.models.kernels.fused_stem import ENV_SWITCH, tracing
from lungxray.models.kernels.inference import kernels_allowed
from lungxray.models.kernels.loader import LazyLibrary
from lungxray.runtime import cpu_features

log = logging.getLogger(__name__)

__all__ = ["CHOICE_ENV", "Plan", "borrowing_plans", "candidates", "chosen", "conv3x3", "conv3x3_available", "plan_for",
           "use_conv3x3"]

SOURCE = Path(__file__).with_name("csrc") / "conv3x3.c"
CHOICE_ENV = "LUNGXRAY_CONV3X3"  # auto | onednn | direct | winograd | winograd4
PLAN_VERSION = 4  # 2: the direct loops named "direct"; 3: F(4x4, 3x3) a candidate; 4: Winograd pads itself
MIN_GAIN = 1.05  # the kernel must beat oneDNN by this factor on a pass to replace it
OUT_OF_RACE = 1.6  # a pass this much slower than the fastest after one timed round is not timed again
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"conv3x3_forward": (_P,) * 4 + (_I64,) * 6 + (ctypes.c_int,),
              "conv3x3_winograd_forward": (_P,) * 4 + (_I64,) * 7 + (ctypes.c_int,) * 2,
              "conv3x3_backward_weight": (_P,) * 4 + (_I64,) * 6 + (ctypes.c_int,),
              "conv3x3_winograd_backward_weight": (_P,) * 3 + (_I64,) * 7 + (ctypes.c_int,) * 2}
WINOGRAD_TILE = {"winograd": 2, "winograd4": 4}  # plan name -> output tile side m of F(m x m, 3x3)

_kernels = LazyLibrary(SOURCE, SIGNATURES, "convolutions stay oneDNN's")
_lock = threading.Lock()
_plans: dict[str, Plan] = {}
_borrowing = False  # inside `borrowing_plans`


@dataclass(frozen=True)
class Plan:
    """Per pass, which runs: the kernel's direct loop ("direct"), its Winograd F(2x2, 3x3) or F(4x4, 3x3) loops
    ("winograd", "winograd4") or oneDNN ("onednn"); and the measured times (ms)."""

    forward: str
    input_grad: str
    weight_grad: str
    times_ms: dict[str, float] | None = None
    like: str = ""  # the layer shape whose measured plan this one borrowed ("" where measured or cached)


def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or os.environ.get(CHOICE_ENV) == "onednn":
        return None
    return _kernels.get()


def conv3x3_available() -> bool:
    """Whether the kernel library is built and loaded (builds it on first call)."""
    return _library() is not None


def use_conv3x3(conv: torch.nn.Module, x: Tensor) -> bool:
    """Whether `conv3x3` can stand in for `conv(x)` during training (see the module docstring for the terms)."""
    if not (isinstance(conv, torch.nn.Conv2d) and kernels_allowed(conv)) or tracing():
        return False
    if conv._forward_hooks or conv._forward_pre_hooks or torch.is_autocast_enabled("cpu"):
        return False
    if torch.are_deterministic_algorithms_enabled():  # a measured choice could differ between processes
        return False
    w = conv.weight
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.dilation != (1, 1) or x.dim() != 4
            or conv.padding not in ((0, 0), (1, 1)) or conv.padding_mode != "zeros"):
        return False
    cin, cout = w.shape[1], w.shape[0] // conv.groups
    return cout % 16 == 0 and cin % 2 == 0 and min(x.shape[-2:]) + 2 * _pad(conv) >= 3 and conv3x3_available()


def _pad(conv: torch.nn.Conv2d) -> int:
    """The padding of a conv `use_conv3x3` accepted: (0, 0) or (1, 1), never a string ("same")."""
    return int(conv.padding[0])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- the passes
def _nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) in any layout -> contiguous (N, H, W, C): free when `t` is channels_last."""
    return t.permute(0, 2, 3, 1).contiguous()


def _nhwc_padded(t: Tensor, pad: int) -> Tensor:
    """(N, C, H, W) in any layout -> contiguous (N, H + 2 pad, W + 2 pad, C) with a zero border, for the direct
    loops (the Winograd ones read the unpadded `_nhwc` and supply the zeros themselves)."""
    nhwc = t.permute(0, 2, 3, 1)
    if pad == 0:
        return nhwc.contiguous()
    n, h, w, c = nhwc.shape
    out = t.new_empty((n, h + 2 * pad, w + 2 * pad, c))
    out[:, :pad].zero_()
    out[:, h + pad:].zero_()
    out[:, pad:h + pad, :pad].zero_()
    out[:, pad:h + pad, w + pad:].zero_()
    out[:, pad:h + pad, pad:w + pad] = nhwc
    return out


def _direct_forward(xp: Tensor, wk: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """xp (N, Hp, Wp, G*Ci) padded, wk (G, 9, Ci, Co) -> (N, G*Co, Hp-2, Wp-2), channels_last."""
    n, hp, wp, _ = xp.shape
    g, _, ci, co = wk.shape
    out = torch.empty((n, g * co, hp - 2, wp - 2), memory_format=torch.channels_last)  # not a view: in-place ops after
    b = bias.contiguous() if bias is not None else None
    _kernels.loaded().conv3x3_forward(xp.data_ptr(), wk.data_ptr(), b.data_ptr() if b is not None else None,
                                      out.data_ptr(), n, hp, wp, g, ci, co, torch.get_num_threads())
    return out


# G of F(m x m, 3x3) per tile side m (Lavin & Gray 2016; m = 4 interpolates at 0, +-1, +-2 and infinity)
_WINOGRAD_G = {2: torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]),
               4: torch.tensor([[1 / 4, 0.0, 0.0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                                [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0.0, 0.0, 1.0]])}
# G (x) G: row i*(m+2)+j, column 3r+s holds G[i, r] G[j, s], so U = G w G^T is one ((m+2)^2 x 9) product per pair
_WINOGRAD_KRON = {m: torch.kron(g, g) for m, g in _WINOGRAD_G.items()}


def _winograd_weights(weight: Tensor, groups: int, m: int) -> Tensor:
    """U = G w G^T per (output, input) channel pair, as (G, (m+2)^2, Co/16, Ci, 16): F(m x m, 3x3)'s transformed
    kernel, each block of 16 output channels contiguous as the kernel's GEMM streams it.

    One GEMM per group by the Kronecker product G (x) G on the weights ordered (tap, Co/16, Ci, 16), which lands in
    that layout with no copy; `g @ w @ g.T` over 3x3 matrices ran as batched 3x3 products and was ~9% of the
    reference's step.
    """
    co, ci, a = weight.shape[0] // groups, weight.shape[1], m + 2
    taps = weight.detach().reshape(groups, co // 16, 16, ci, 9).permute(0, 4, 1, 3, 2).contiguous()
    u = torch.bmm(_WINOGRAD_KRON[m].expand(groups, -1, -1), taps.view(groups, 9, ci * co))  # contiguous
    return u.view(groups, a * a, co // 16, ci, 16)


def _winograd_forward(xl: Tensor, u: Tensor, bias: Tensor | None, groups: int, pad: int) -> Tensor:
    """xl (N, H, W, G*Ci) unpadded, zero-padded by `pad` where the tiles read it -> (N, G*Co, H+2pad-2, W+2pad-2),
    channels_last, on m x m output tiles (csrc/conv3x3.c): u from `_winograd_weights`, which says m."""
    n, h, w, _ = xl.shape
    g, k, blocks, ci, _ = u.shape
    co = 16 * blocks
    out = torch.empty((n, g * co, h + 2 * pad - 2, w + 2 * pad - 2), memory_format=torch.channels_last)
    b = bias.contiguous() if bias is not None else None
    _kernels.loaded().conv3x3_winograd_forward(xl.data_ptr(), u.data_ptr(), b.data_ptr() if b is not None else None,
                                               out.data_ptr(), n, h, w, g, ci, co, pad, _tile_side(k),
                                               torch.get_num_threads())
    return out


def _tile_side(k: int) -> int:
    """m from the (m+2)^2 transformed positions."""
    return {16: 2, 36: 4}[k]


def _tap_major(weight: Tensor, groups: int) -> Tensor:
    """(G*Co, Ci, 3, 3) -> (G, 9, Ci, Co)."""
    co = weight.shape[0] // groups
    return weight.detach().reshape(groups, co, weight.shape[1], 9).permute(0, 3, 2, 1).contiguous()


def _input_grad_weight(weight: Tensor, groups: int) -> Tensor:
    """The input gradient's kernel in PyTorch's layout, (G*Ci, Co, 3, 3): taps reversed, channels exchanged."""
    co, ci = weight.shape[0] // groups, weight.shape[1]
    w = weight.detach().reshape(groups, co, ci, 3, 3).flip(3, 4).transpose(1, 2)
    return w.reshape(groups * ci, co, 3, 3)


def _forward_as(plan: str, t: Tensor, pad: int, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """The convolution of `t` (N, C, H, W), zero-padded by `pad`, by the kernel's direct ("direct") or Winograd
    loops ("winograd": F(2x2, 3x3), "winograd4": F(4x4, 3x3))."""
    if plan in WINOGRAD_TILE:
        return _winograd_forward(_nhwc(t), _winograd_weights(weight, groups, WINOGRAD_TILE[plan]), bias, groups, pad)
    return _direct_forward(_nhwc_padded(t, pad), _tap_major(weight, groups), bias, groups)


def _direct_weight_grad(xp: Tensor, g: Tensor, groups: int, with_bias: bool) -> tuple[Tensor, Tensor | None]:
    n, hp, wp, ct = xp.shape
    gl = g.permute(0, 2, 3, 1).contiguous()
    ci, co = ct // groups, gl.shape[-1] // groups
    dw = xp.new_empty((groups, 9, ci, co))
    db = xp.new_empty((groups * co,)) if with_bias else None
    _kernels.loaded().conv3x3_backward_weight(xp.data_ptr(), gl.data_ptr(), dw.data_ptr(),
                                              db.data_ptr() if db is not None else None, n, hp, wp, groups, ci, co,
                                              torch.get_num_threads())
    return dw.permute(0, 3, 2, 1).reshape(groups * co, ci, 3, 3), db


def _winograd_weight_grad(xl: Tensor, g: Tensor, groups: int, with_bias: bool, m: int,
                          pad: int) -> tuple[Tensor, Tensor | None]:
    """The weight gradient through F(m x m, 3x3) from the unpadded input `xl` (N, H, W, G*Ci): the kernel sums
    dL/dU over tiles, then dL/dw = G^T (dL/dU) G."""
    n, h, w, ct = xl.shape
    gl = _nhwc(g)
    ci, co, a = ct // groups, gl.shape[-1] // groups, m + 2
    du = xl.new_empty((groups, a * a, ci, co))
    _kernels.loaded().conv3x3_winograd_backward_weight(xl.data_ptr(), gl.data_ptr(), du.data_ptr(), n, h, w,
                                                       groups, ci, co, pad, m, torch.get_num_threads())
    dw = _WINOGRAD_KRON[m].T @ du.view(groups, a * a, ci * co)  # G^T (dL/dU) G, tap-major (G, 9, Ci*Co)
    db = gl.sum((0, 1, 2)) if with_bias else None
    return dw.view(groups, 9, ci, co).permute(0, 3, 2, 1).reshape(groups * co, ci, 3, 3), db


def _onednn_backward(g: Tensor, x: Tensor | None, weight: Tensor, pad: int, groups: int, x_shape: tuple[int, ...],
                     mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    inp = x if x is not None else torch.empty(x_shape, memory_format=torch.channels_last)  # only its shape is read
    out: tuple[Tensor | None, Tensor | None, Tensor | None] = torch.ops.aten.convolution_backward(
        g, inp, weight, [weight.shape[0]] if mask[2] else None, [1, 1], [pad, pad], [1, 1], False, [0, 0], groups,
        mask)
    return out


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, pad: int, groups: int,  # type: ignore[override]
                plan: Plan) -> Tensor:
        if not any(ctx.needs_input_grad):  # inference (`kernels_for_inference`): nothing to keep
            keep = x
        elif plan.weight_grad == "direct":  # the direct loops read a padded copy; forward shares it if direct too
            keep = _nhwc_padded(x, pad)
        else:  # Winograd reads the unpadded input (a view of x when channels_last), oneDNN x itself
            keep = _nhwc(x) if plan.weight_grad in WINOGRAD_TILE else x
        if plan.forward == "direct":
            xp = keep if keep is not x and plan.weight_grad == "direct" else _nhwc_padded(x, pad)
            out = _direct_forward(xp, _tap_major(weight, groups), bias, groups)
        elif plan.forward in WINOGRAD_TILE:
            out = _forward_as(plan.forward, x, pad, weight, bias, groups)
        else:
            out = F.conv2d(x, weight, bias, 1, pad, 1, groups)
        ctx.save_for_backward(keep, weight)
        ctx.pad, ctx.groups, ctx.plan, ctx.x_shape, ctx.has_bias = pad, groups, plan, tuple(x.shape), bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        kept, weight = ctx.saved_tensors
        plan, pad, groups = ctx.plan, ctx.pad, ctx.groups
        want_x, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx = dw = db = None
        if want_x and plan.input_grad != "onednn":
            dx = _forward_as(plan.input_grad, g, 2 - pad, _input_grad_weight(weight, groups), None, groups)
        elif want_x:
            dx = _onednn_backward(g, None, weight, pad, groups, ctx.x_shape, [True, False, False])[0]
        if (want_w or want_b) and plan.weight_grad != "onednn":
            with_bias = ctx.has_bias and want_b
            if plan.weight_grad in WINOGRAD_TILE:
                dw, db = _winograd_weight_grad(kept, g, groups, with_bias, WINOGRAD_TILE[plan.weight_grad], pad)
            else:
                dw, db = _direct_weight_grad(kept, g, groups, with_bias)
        elif want_w or want_b:
            _, dw, db = _onednn_backward(g, kept, weight, pad, groups, ctx.x_shape,
                                         [False, True, bool(ctx.has_bias and want_b)])
        return dx, dw if want_w else None, db if want_b else None, None, None, None


def conv3x3(conv: torch.nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` through the passes `plan_for` chose for this shape. Check `use_conv3x3` first."""
    plan = plan_for(conv, x)
    out: Tensor = _Conv3x3.apply(x, conv.weight, conv.bias, _pad(conv), conv.groups, plan)
    return out


# ------------------------------------------------------------------------------------------ the choice
def _bucket(v: int) -> int:
    """The next power of two: an epoch's short last batch, or a packed network that lost a stopped member, reuses
    the choice measured for its bucket instead of paying seconds of measurement again (and across buckets:
    `_borrowed_plan`)."""
    return 1 << max(v - 1, 0).bit_length()


def _shape_key(conv: torch.nn.Conv2d, x: Tensor) -> str:
    """Per-group channels, spatial size, padding, groups and batch (power-of-two buckets), threads: what the
    speed depends on."""
    n, _, h, w = x.shape
    ci, co, g = conv.weight.shape[1], conv.weight.shape[0] // conv.groups, conv.groups
    return f"ci{ci}-co{co}-{h}x{w}-p{_pad(conv)}-g{_bucket(g)}-n{_bucket(n)}-t{torch.get_num_threads()}"


def _machine_key() -> str:
    feats = cpu_features()
    limits = "|".join(os.environ.get(v, "") for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))
    raw = f"{PLAN_VERSION}|{feats['cpu']}|{feats['isa']}|{limits}|{torch.__version__}".encode()
    return hashlib.sha256(raw + SOURCE.read_bytes()).hexdigest()[:16]  # a changed kernel is measured again


def _cache_file() -> Path:
    return cache_root() / "autotune" / "conv3x3" / "plans.json"  # beside the training calibration's files


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def plan_for(conv: torch.nn.Conv2d, x: Tensor) -> Plan:
    """The passes to run for this layer shape: forced by LUNGXRAY_CONV3X3, else measured once and cached."""
    forced = os.environ.get(CHOICE_ENV, "auto")
    if forced in ("direct", *WINOGRAD_TILE):  # where the shape allows (8 | Ci forward, 16 | Ci backward)
        cin = conv.weight.shape[1]
        fwd = forced if forced == "direct" or cin % 8 == 0 else "direct"
        return Plan(fwd, forced if cin % 16 == 0 else "onednn", fwd)
    key = f"{_machine_key()}/{_shape_key(conv, x)}"
    with _lock:
        if key in _plans:
            return _plans[key]
        cached = _read_cache().get(key)
        if isinstance(cached, dict):
            try:
                _plans[key] = Plan(**cached)
                return _plans[key]
            except TypeError:
                pass
        if (near := _borrowed_plan(key)) is not None:
            return near
    plan = _measure(conv, x)
    with _lock:
        _plans[key] = plan
        data = _read_cache()
        data[key] = asdict(plan)
        try:
            write_json(_cache_file(), data)
        except OSError as e:  # a read-only cache still leaves the choice for this process
            log.debug("could not cache the conv3x3 choice: %s", e)
    log.info("conv3x3 %s: forward %s, input gradient %s, weight gradient %s (measured, ms: %s)", _shape_key(conv, x),
             plan.forward, plan.input_grad, plan.weight_grad, plan.times_ms)
    return plan


def _borrowed_plan(key: str) -> Plan | None:
    """A neighbour's plan where measuring this shape would cost more than a neighbour's choice could lose, else None.

    - calibration (`borrowing_plans`): its candidates (half the threads, say) run on the plans of the nearest
      measured shape; the real training measures its own if that candidate wins;
    - inference (no gradients): only the forward runs, and a short last batch or another member count borrows
      the nearest measured batch or group bucket;
    - training, a packed network that lost stopped members (fewer groups): the same layer at the nearest measured
      group count, kept for the process. The passes' relative speeds hardly move with the group count (the choices
      for 16, 8, 4 and 2 groups were the same on Zen 3), and each new bucket cost the reference 6-23 s of its
      training to measure.
    """
    free = "gnt" if _borrowing else ("gn" if not torch.is_grad_enabled() else "g")
    near = _nearest_plan(key, free)
    if near is None:
        return None
    like, plan = near
    borrowed = Plan(plan.forward, plan.input_grad, plan.weight_grad, None, like)
    if free == "g":
        _plans[key] = borrowed
        log.info("conv3x3 %s: the plan measured for %s", key.split("/", 1)[1], like)
    return borrowed


def _key_fields(key: str) -> tuple[str, dict[str, int]]:
    """A plan key's layer part and its numbers for g(roups), n (batch) and t(hreads)."""
    head, *tail = key.rsplit("-", 3)
    return head, {f[0]: int(f[1:]) for f in tail}


def _nearest_plan(key: str, free: str) -> tuple[str, Plan] | None:
    """(shape key, plan) measured in this process for the same layer with only the fields in `free` different, the
    nearest in powers of two; None if there is none."""
    head, mine = _key_fields(key)
    near = []
    for k, plan in _plans.items():
        h, theirs = _key_fields(k)
        if h == head and not plan.like and all(theirs[f] == mine[f] for f in "gnt" if f not in free):
            near.append((sum(abs(math.log2(theirs[f] / mine[f])) for f in free), k.split("/", 1)[1], plan))
    return min(near, key=lambda t: t[0])[1:] if near else None


@contextmanager
def borrowing_plans() -> Iterator[None]:
    """Inside, a shape without a plan borrows its nearest measured neighbour's instead of being measured
    (`speed.autotune`'s candidates: measuring every layer again for each would cost more than the calibration)."""
    global _borrowing
    before, _borrowing = _borrowing, True
    try:
        yield
    finally:
        _borrowing = before


def chosen() -> dict[str, str]:
    """The passes chosen for every layer shape this process trained or calibrated, one line each (run.json, metrics)."""
    with _lock:
        return {key.split("/", 1)[1]: f"forward {p.forward}, input gradient {p.input_grad}, weight gradient "
                f"{p.weight_grad}" + (f" (as {p.like})" if p.like else "") for key, p in _plans.items()}


def _pass(candidate: str) -> str:
    """"forward/winograd4" -> "forward"."""
    return candidate.split("/")[0]


def _best_ms(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Best time of each function over interleaved rounds, after one untimed call each. After the first round, a
    function more than OUT_OF_RACE times slower than the fastest of its pass ("forward/..." and so on) is not timed
    again: it cannot win, and its further calls were ~1/3 of a layer's measurement (seconds on the first run)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    racing = dict(fns)
    for round_ in range(rounds):
        for name, fn in racing.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
        if round_ == 0:
            fastest: dict[str, float] = {}
            for name, ms in best.items():
                fastest[_pass(name)] = min(ms, fastest.get(_pass(name), ms))
            racing = {n: fn for n, fn in racing.items() if best[n] <= OUT_OF_RACE * fastest[_pass(n)]}
    return best


def candidates(x_shape: tuple[int, ...], weight: Tensor, pad: int, groups: int) -> dict[str, Callable[[], object]]:
    """Each pass both ways ("forward/direct", "forward/onednn", "input_grad/...", "weight_grad/...") on random data of
    this shape, ready to time (`plan_for` does, and so does bench/conv3x3_ab.py)."""
    gen = torch.Generator().manual_seed(0)  # its own: measuring must not move training's random stream
    xr = torch.randn(x_shape, generator=gen).contiguous(memory_format=torch.channels_last)
    n, _, h, wd = x_shape
    out_shape = (n, weight.shape[0], h + 2 * pad - 2, wd + 2 * pad - 2)
    gr = torch.randn(out_shape, generator=gen).contiguous(memory_format=torch.channels_last)
    w = weight.detach()
    xp = _nhwc_padded(xr, pad)
    wi = _input_grad_weight(w, groups)
    wk, wf = _tap_major(w, groups), _tap_major(wi, groups)
    fns: dict[str, Callable[[], object]] = {
        "forward/direct": lambda: _direct_forward(xp, wk, None, groups),
        "forward/onednn": lambda: F.conv2d(xr, w, None, 1, pad, 1, groups),
        "input_grad/onednn": lambda: _onednn_backward(gr, None, w, pad, groups, x_shape, [True, False, False]),
        "weight_grad/direct": lambda: _direct_weight_grad(xp, gr, groups, False),
        "weight_grad/onednn": lambda: _onednn_backward(gr, xr, w, pad, groups, x_shape, [False, True, False]),
    }
    if w.shape[1] % 16 == 0:
        fns["input_grad/direct"] = lambda: _direct_forward(_nhwc_padded(gr, 2 - pad), wf, None, groups)
    for name, m in WINOGRAD_TILE.items():
        fns.update(_winograd_candidates(name, m, _nhwc(xr), gr, w, wi, pad, groups))
    return fns


def _winograd_candidates(name: str, m: int, xl: Tensor, gr: Tensor, w: Tensor, wi: Tensor, pad: int,
                         groups: int) -> dict[str, Callable[[], object]]:
    """The passes of one Winograd tile size, where the input channels allow them."""
    fns: dict[str, Callable[[], object]] = {}
    if w.shape[1] % 8 == 0:
        uf = _winograd_weights(w, groups, m)
        fns[f"forward/{name}"] = lambda: _winograd_forward(xl, uf, None, groups, pad)
        fns[f"weight_grad/{name}"] = lambda: _winograd_weight_grad(xl, gr, groups, False, m, pad)
    if w.shape[1] % 16 == 0:
        ui = _winograd_weights(wi, groups, m)
        fns[f"input_grad/{name}"] = lambda: _winograd_forward(_nhwc(gr), ui, None, groups, 2 - pad)
    return fns


def _measure(conv: torch.nn.Conv2d, x: Tensor) -> Plan:
    """Time each pass both ways (about 20 passes; a second or two per layer) and keep the faster of each."""
    ms = _best_ms(candidates(tuple(x.shape), conv.weight, _pad(conv), conv.groups))

    def pick(stage: str) -> str:
        mine = [k for k in ms if _pass(k) == stage and not k.endswith("/onednn")]
        best = min(mine, key=ms.__getitem__, default=None)  # none where the channels rule the kernels out
        return best.split("/")[1] if best and ms[best] * MIN_GAIN < ms[f"{stage}/onednn"] else "onednn"

    return Plan(pick("forward"), pick("input_grad"), pick("weight_grad"), {k: round(v, 2) for k, v in ms.items()})

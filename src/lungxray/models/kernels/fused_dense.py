"""The seed network's dense layer trained from a bf16 copy that the optimizer writes, on CPU.

`seed_cnn`'s first dense layer holds 14.7 M of its 14.8 M weights, and under bf16 autocast every training step
makes three passes over them besides the two GEMMs that need them: autocast casts the fp32 weight to bf16 for the
forward, the bf16 weight gradient is cast back to fp32 for `.grad`, and AdamW reads and writes weight and moments.
On the 2-core development CPU the two casts alone took ~35 ms of a ~200 ms step (`bench/profile_step.py`).

Here the layer keeps a `DenseMaster`: the bf16 copy the forward reads, and a bf16 buffer the backward writes the
weight gradient into (autograd never sees a weight gradient, so `.grad` stays None and PyTorch's AdamW skips the
weight). After `optimizer.step()` a post-hook runs one C kernel (csrc/seed_stem.c, `seed_adamw_bf16`) that applies
PyTorch's AdamW arithmetic to the fp32 weight from the bf16 gradient and writes the next bf16 copy in the same pass.
The numbers are those of autocast + fused AdamW: the gradient was bf16 there too, the copy is the same
round-to-nearest-even cast, and the moments live in `optimizer.state[weight]` under AdamW's own keys, so checkpoints
and resumed runs see an ordinary AdamW state.

It is switched on only by `attach_dense_masters(model, optimizer)` (called by `train.make_optimizer`), for
AdamW on CPU, one member (`PackedLinear` with K = 1) and at least `MIN_WEIGHTS` weights, and it runs only in
training mode under bf16 CPU autocast with gradients enabled, outside torch.distributed (DDP expects every weight
to receive a gradient) and outside tracing/compilation; everywhere else the layer is an ordinary `F.linear`.
A loop that calls backward twice before `step()` gets the last backward's weight gradient, not the sum.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lungxray.models.kernels.fused_stem import bf16_autocast, kernel_info, library, tracing

__all__ = ["MIN_WEIGHTS", "DenseMaster", "attach_dense_masters"]

MIN_WEIGHTS = 1 << 20  # below this the casts cost nothing worth a special path


class DenseMaster:
    """The bf16 copy of one fp32 weight and the bf16 gradient buffer of its last backward."""

    def __init__(self, weight: nn.Parameter, group: dict[str, Any]) -> None:
        self.weight, self.group = weight, group
        self.shape = (weight.shape[-2], weight.shape[-1])  # (out, in)
        self.w16 = torch.empty(self.shape, dtype=torch.bfloat16)
        self.grad16 = torch.empty(self.shape, dtype=torch.bfloat16)
        self.version = -1  # weight._version when w16 was last written; anything else means "cast again"
        self.pending = False  # grad16 holds a gradient the optimizer has not applied yet

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A copied model has no optimizer applying the buffer: the copy's layer takes the plain path."""
        return None

    def usable(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad and bf16_autocast()
            and not (dist.is_available() and dist.is_initialized()) and not tracing()
        )

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x (..., in) -> (..., out) in bf16, as autocast's F.linear would give."""
        if self.version != self.weight._version:  # changed outside the optimizer (loaded, restored, initialised)
            with torch.no_grad():
                self.w16.copy_(self.weight.view(self.shape))
            self.version = self.weight._version
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.shape[1]).to(torch.bfloat16)
        b16 = bias.to(torch.bfloat16) if bias is not None else None  # autograd casts its gradient back to fp32
        return _MasterLinear.apply(x2, b16, self).reshape(*lead, self.shape[0])

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply AdamW to the weight from grad16 and refresh w16, in one pass (see the module docstring)."""
        if not self.pending:
            return
        lib = library()
        if lib is None:  # switched off after the optimizer was built: never drop an update silently
            reason = kernel_info()["reason"]
            raise RuntimeError(f"the fused kernels are unavailable now ({reason}); rebuild the optimizer")
        p, g = self.weight, self.group
        if p.grad is not None:  # e.g. a loss term on the weight itself: AdamW just stepped it from that alone
            raise RuntimeError("a DenseMaster weight also received an autograd gradient (a penalty on the weight?); "
                               "build the optimizer without attach_dense_masters for such a loss")
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = (float(b) for b in g["betas"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise RuntimeError("DenseMaster.step needs contiguous weight and moments")
        lr, wd, eps = float(g["lr"]), float(g["weight_decay"]), float(g["eps"])
        lib.seed_adamw_bf16(  # coefficients in double, as torch's fused AdamW computes them
            p.data_ptr(), self.grad16.data_ptr(), m.data_ptr(), v.data_ptr(), self.w16.data_ptr(), p.numel(),
            1 - lr * wd, lr / (1 - beta1**t), beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps,
            torch.get_num_threads(),
        )
        self.version = p._version  # written through its pointer: the version did not move, w16 is current
        self.pending = False


class _MasterLinear(torch.autograd.Function):
    """y = x @ w16^T + b in bf16; backward returns dx and db to autograd and writes dW into the master's buffer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, master: DenseMaster) -> Tensor:
        ctx.save_for_backward(x)
        ctx.master = master
        if bias is None:
            return x.mm(master.w16.t())
        return torch.addmm(bias, x, master.w16.t())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        master: DenseMaster = ctx.master
        grad = grad.to(torch.bfloat16)
        torch.mm(grad.t(), x, out=master.grad16)
        master.pending = True
        dx = grad.mm(master.w16) if ctx.needs_input_grad[0] else None
        db = grad.sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None


def attach_dense_masters(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Give every large single-member dense layer of `model` a DenseMaster driven by `optimizer`; returns how many.

    Nothing is attached (0) unless the optimizer is AdamW without amsgrad/maximize, the weights are fp32 on the
    CPU, the C kernels are available (not under LUNGXRAY_FUSED=0), the model has not set `fused` or
    `fused_dense` to False, and
    torch.distributed is not running.
    """
    from lungxray.models.nets import PackedLinear

    if type(optimizer) is not torch.optim.AdamW or library() is None:
        return 0
    if getattr(model, "fused", True) is False or getattr(model, "fused_dense", True) is False:
        return 0
    if dist.is_available() and dist.is_initialized():
        return 0
    masters = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not (isinstance(module, PackedLinear) and module.members == 1 and w is not None
                and w.numel() >= MIN_WEIGHTS and w.device.type == "cpu" and w.dtype == torch.float32):
            continue
        group = next((g for g in optimizer.param_groups if any(p is w for p in g["params"])), None)
        if group is None or group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            continue
        module.master = DenseMaster(w, group)
        masters.append(module.master)
    if masters:

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for master in masters:
                master.step(opt)

        optimizer.register_step_post_hook(after_step)
    return len(masters)

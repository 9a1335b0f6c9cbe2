"""Where the training kernels may also run a forward pass in evaluation mode: inside `kernels_for_inference()`.

The per-epoch validation of a training run scores every out-of-bag image with every member in eval mode; with
oneDNN's convolutions it was ~40% of the reference's epoch on 2 Zen 3 cores (5.5 s of validation against 8.5 s
of training steps). Inside this context a module in eval mode, under no_grad, runs the 3x3 convolutions, the
patch stem and the pool-first max-pool through the same kernels as training (forward only; the results equal
the plain modules' up to float rounding, the pool's exactly). Elsewhere evaluation, prediction, export, Grad-CAM
and tracing keep the plain modules, so a bundle's predictions do not depend on measured plans or on the kernels
being built.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["kernels_allowed", "kernels_for_inference"]

_INFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("lungxray_kernels_for_inference", default=False)


@contextmanager
def kernels_for_inference() -> Iterator[None]:
    """Let eval-mode modules use the kernels under no_grad within this block (the training loop's validation)."""
    token = _INFERENCE.set(True)
    try:
        yield
    finally:
        _INFERENCE.reset(token)


def kernels_allowed(module: torch.nn.Module) -> bool:
    """Whether a kernel may stand in for `module`: always in training mode, in eval mode only inside
    `kernels_for_inference()` with gradients off."""
    return module.training or (_INFERENCE.get() and not torch.is_grad_enabled())

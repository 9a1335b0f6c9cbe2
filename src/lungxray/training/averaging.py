"""An exponential moving average (EMA) of a model's weights, validated and kept in place of the raw weights.

Why: with a few hundred images an epoch is only ~8 optimizer steps, so the weights at the end of an epoch carry
the noise of its last few batches; out-of-bag accuracy then jumps from epoch to epoch and early stopping picks a
lucky epoch as often as a good one. The average over the last epoch or so is a smoother estimate of the same
trajectory (Polyak averaging; the "EMA" of timm and of many small-data recipes).

The time constant is given in epochs (`train.ema_epochs`), not as a per-step decay, so the same setting means
the same thing whatever the dataset size and batch size (the batch may grow on a plateau): the per-step decay
is exp(-1 / (ema_epochs * steps per epoch)). Buffers (BatchNorm running statistics) are averaged the same way;
integer buffers (BatchNorm's step counter) are copied. Packed members are averaged alike, element by element,
so member k's average is the average of member k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightAverage", "decay_for"]


def decay_for(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay giving a time constant of `ema_epochs` epochs (0 keeps no memory: the live weights)."""
    if ema_epochs <= 0:
        return 0.0
    return math.exp(-1.0 / (ema_epochs * max(steps_per_epoch, 1)))


class WeightAverage:
    """Shadow copies of every state_dict entry of `model`, keyed like model.state_dict().

    `shadow` is what the training loop validates, copies into its best weights and checkpoints.
    """

    def __init__(self, model: nn.Module) -> None:
        self._live = dict(model.state_dict(keep_vars=True))
        self.shadow = {k: v.detach().clone() for k, v in self._live.items()}  # same strides: one fused lerp
        self._float = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._other = [k for k in self.shadow if k not in self._float]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live, after an optimizer step."""
        shadow = [self.shadow[k] for k in self._float]
        live = [self._live[k].detach() for k in self._float]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)
        for k in self._other:
            self.shadow[k].copy_(self._live[k])

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the shadow from a checkpoint (same keys and shapes, or a ValueError)."""
        if set(tensors) != set(self.shadow):
            raise ValueError("the checkpoint's weight average does not match this model")
        for k, v in tensors.items():
            self.shadow[k].copy_(v)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own weights again after it."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(live)

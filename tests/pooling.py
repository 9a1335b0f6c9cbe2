"""Comparing whole training steps of two implementations of a layer, where the network max-pools.

Two valid roundings of a near-tie send a pool's gradient to different pixels, a ~1e-3 difference downstream
whichever implementation is right (seed_cnn failed so for 2 of 8 input draws with either F(4x4) transform), so
the gradients are compared for inputs on which every run's pools pick the same elements; most draws qualify.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from lungxray.models import nets
from lungxray.models.kernels.fused_stem import fused_pool_relu

Grads = dict[str, torch.Tensor]


def gradients_where_pools_agree(model: torch.nn.Module, setups: Sequence[Callable[[], None]], shape: tuple[int, ...],
                                monkeypatch: pytest.MonkeyPatch, draws: int = 10) -> list[Grads]:
    """Each setup's parameter gradients of mean(model(x)^2), for the first input x (of `shape`) on which all the
    runs' fused max-pools (`nets.fused_pool_relu`) select the same elements."""
    picks: list[torch.Tensor] = []

    def recording_pool(t: torch.Tensor, relu: bool = True) -> torch.Tensor:
        picks.append(F.max_pool2d(t.detach(), 2, return_indices=True)[1])
        return fused_pool_relu(t, relu)

    monkeypatch.setattr(nets, "fused_pool_relu", recording_pool)
    for _draw in range(draws):
        x = torch.randn(shape)
        runs = []
        for setup in setups:
            setup()
            model.zero_grad()
            picks.clear()
            model(x).square().mean().backward()
            runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, list(picks)))
        first = runs[0][1]
        assert first, "no fused max-pool ran: nothing to compare selections of"
        if all(all(torch.equal(a, b) for a, b in zip(first, sel, strict=True)) for _, sel in runs[1:]):
            return [grads for grads, _ in runs]
    pytest.fail(f"{draws} draws of inputs all had a max-pool near-tie rounded differently")

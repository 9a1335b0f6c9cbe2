"""Optional C kernels for CPU training, compiled on first use; every one has a pure-PyTorch twin."""

from __future__ import annotations


def available() -> dict[str, bool]:
    """Which kernel libraries are built and loaded here (each builds on first call): run.json says so, beside the
    convolutions' measured plans, so a run's speed can be traced to what it ran."""
    from lungxray.models.kernels import bn_relu, conv3x3, fused_stem, patch_stem, warp

    return {"conv3x3": conv3x3.conv3x3_available(), "patch_stem": patch_stem.patch_stem_available(),
            "bn_relu": bn_relu.bn_relu_available(), "warp": warp.warp_available(),
            "seed_stem": fused_stem.fused_available()}

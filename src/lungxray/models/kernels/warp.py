"""The augmentation's affine resampling of uint8 training images in one C pass (csrc/warp.c).

`Augmenter.apply` builds an (N, H, W, 2) grid and calls `grid_sample` on images already gathered and converted to
float; for the reference's steps (320 images of 256x256) those three passes were ~18% of a step on 2 Zen 3 cores.
`warp_uint8` computes the same function, `normalize(images[rows])` resampled bilinearly with border padding
(align_corners=True), from the uint8 images and a per-output affine matrix in pixel coordinates, up to float
rounding of the coordinates (tests/test_warp.py). It needs AVX2 + FMA and gcc; where either is missing, or under
`LUNGXRAY_FUSED=0`, `warp_available()` is False and callers keep the PyTorch path.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from lungxray.models.kernels.fused_stem import ENV_SWITCH
from lungxray.models.kernels.loader import LazyLibrary

__all__ = ["warp_available", "warp_uint8"]

SOURCE = Path(__file__).with_name("csrc") / "warp.c"
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"warp_affine_u8": (_P,) * 4 + (_I64,) * 4 + (ctypes.c_float, ctypes.c_float, ctypes.c_int)}
_kernels = LazyLibrary(SOURCE, SIGNATURES, "the augmentation keeps grid_sample")


def warp_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call); False under LUNGXRAY_FUSED=0."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _kernels.get() is not None


def warp_uint8(images: Tensor, rows: Tensor, matrix: Tensor, scale: float, shift: float) -> Tensor:
    """(n, 1, H, W) float32: image `rows[k]` of `images` (N, H, W) uint8 sampled at output pixel (i, j) from
    column ``m[0, 0] j + m[0, 1] i + m[0, 2]`` and row ``m[1, 0] j + m[1, 1] i + m[1, 2]`` of ``m = matrix[k]``
    (n, 2, 3), bilinearly with coordinates clamped to the image, times `scale` plus `shift`."""
    lib = _kernels.get()
    if lib is None:
        raise RuntimeError("the warp kernel is unavailable; check warp_available() first")
    if images.dtype != torch.uint8 or images.device.type != "cpu" or images.ndim != 3 or min(images.shape[1:]) < 2:
        raise ValueError(f"expected CPU uint8 (N, H, W) images of at least 2x2, got {images.dtype} "
                         f"{tuple(images.shape)} on {images.device}")
    n_src, h, w = images.shape
    rows = rows.to("cpu", torch.int64).contiguous()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_src):
        raise IndexError(f"rows must lie in [0, {n_src}), got [{int(rows.min())}, {int(rows.max())}]")
    mat = matrix.to("cpu", torch.float64).reshape(-1, 6).contiguous()
    if mat.shape[0] != rows.numel():
        raise ValueError(f"{mat.shape[0]} matrices for {rows.numel()} rows")
    src = images.contiguous()
    out = torch.empty((rows.numel(), 1, h, w), dtype=torch.float32)
    lib.warp_affine_u8(src.data_ptr(), rows.data_ptr(), mat.data_ptr(), out.data_ptr(), n_src, rows.numel(), h, w,
                       scale, shift, torch.get_num_threads())
    return out

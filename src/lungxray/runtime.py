"""Where and how tensors run: device choice, mixed precision, seeding, threads and the input normalisation.

Kept in one place so training, prediction, export and benchmarks make the same choices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

# The input contract every model is trained with; it is written into each bundle and read back by predict.
INPUT_MEAN = 0.5
INPUT_STD = 0.25


def normalize(images: torch.Tensor, mean: float = INPUT_MEAN, std: float = INPUT_STD) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 standardised values."""
    return (images.float() * (1.0 / 255.0) - mean) * (1.0 / std)


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `limit_bytes` from its heap and keep freed memory there.

    Why: by default glibc hands every block above 32 MB straight to the kernel (mmap) and unmaps it when freed, so a
    training step that allocates the same large tensors every time (seed_cnn's 59 MB dense-layer gradient) pays
    ~14k page faults and the kernel's zero-filling of fresh pages on each step: measured 1.09x per seed_cnn step
    (docs/performance.md). Freed blocks are then reused instead; the process's resident memory stays at its
    high-water mark rather than shrinking between steps (it does not grow with the number of steps). Process-wide,
    so it is called by the `lungxray` command, not on import. Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, limit_bytes) and mallopt(m_trim_threshold, limit_bytes))


def resolve_device(name: str | None = None) -> torch.device:
    """'auto' / None picks CUDA when present; asking for CUDA on a machine without it is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    return device


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 where the hardware runs it natively (AMX/AVX512-BF16 CPUs, Ampere+ GPUs).

    Measured on the 2-core Sapphire Rapids development machine: bf16 autocast + channels_last trains the seed CNN
    several times faster than fp32 (see bench/). fp16 is only offered on CUDA (it needs a loss scaler).
    """
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 precision needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast for the chosen dtype, or a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch; in deterministic mode also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(threads: int = 0) -> int:
    """Use all cores by default (PyTorch sometimes picks fewer in containers)."""
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily switch to eval mode and no_grad, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)

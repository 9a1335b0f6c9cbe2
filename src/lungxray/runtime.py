"""Where and how tensors run: device choice, mixed precision, seeding, threads and the input normalisation.

Kept in one place so training, prediction, export and benchmarks make the same choices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungxray.hostinfo import usable_cores

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
    """Native bf16 arithmetic (AVX512-BF16 or AMX-BF16), within any ONEDNN_MAX_CPU_ISA limit.

    oneDNN also runs bf16 on AVX-512 CPUs without it, by emulation, and PyTorch's own check says yes there; but
    emulated bf16 is no faster than fp32 and rounds more, so `auto` keeps fp32 on those (and on AVX2-only CPUs).
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False
    return cpu_features()["native_bf16"]


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from the lowest; those from AVX512_CORE_BF16 up have native bf16.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")


def cpu_features() -> dict[str, Any]:
    """The CPU's model, its vector ISA as the kernels may use it (`isa`, e.g. "AVX2+FMA" or "AVX-512 + AMX-BF16")
    and whether it has native bf16 arithmetic, with the ONEDNN_MAX_CPU_ISA limit applied when one is set."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:  # pragma: no cover - non-Linux
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    rank = _ONEDNN_ISAS.index(limit) if limit in _ONEDNN_ISAS else len(_ONEDNN_ISAS)
    allowed = {name for i, name in enumerate(_ONEDNN_ISAS) if i <= rank}
    amx = "amx_bf16" in flags and "AVX512_CORE_AMX" in allowed
    avx512_bf16 = "avx512_bf16" in flags and "AVX512_CORE_BF16" in allowed
    avx512 = "avx512f" in flags and "AVX512_CORE" in allowed
    if amx:
        isa = "AVX-512 + AMX-BF16"
    elif avx512_bf16:
        isa = "AVX-512 + AVX512-BF16 (no AMX)"
    elif avx512:
        isa = "AVX-512 (no bf16)"
    elif "avx2" in flags and "AVX2" in allowed:
        isa = "AVX2+FMA" if "fma" in flags else "AVX2"
    elif "asimd" in flags:
        isa = "ARM NEON" + (" + BF16" if "bf16" in flags else "")
    else:
        isa = "SSE/other"
    native = amx or avx512_bf16 or ("asimd" in flags and "bf16" in flags)
    if limit:
        isa += f" [ONEDNN_MAX_CPU_ISA={limit}]"
    return {"cpu": model, "isa": isa, "native_bf16": native, "amx": amx, "onednn_max_isa": limit or None}


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast for the chosen dtype, or a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch, and set torch's deterministic-algorithms mode to this run's: a deterministic
    run earlier in the process (a notebook, the test suite) must not leave the next run without its fast kernels,
    which stand aside in deterministic mode."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def set_threads(threads: int = 0) -> int:
    """Use all cores by default (PyTorch sometimes picks fewer in containers)."""
    n = threads or usable_cores()
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

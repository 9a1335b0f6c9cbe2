"""Benchmarks: training and inference speed on images already in memory, against the machine's measured peak.

`bench_train` times the real training step, `train.train_one_epoch` (gather a batch per member, batched
augmentation with the `seed` preset, forward under autocast, backward, fused optimizer), on synthetic uint8 images
resident on the device, so the data path costs what it costs in training and nothing is faked. The first
`warmup` steps (oneDNN primitive creation, `torch.compile`) are timed separately and left out of the rate.

`bench_predict` times what `lungxray predict` and the server run per request after decoding
(`Predictor.member_logits`, and ONNX Runtime via `export.OnnxPredictor`): batch-1 latency percentiles and
batch-64 throughput. `bench_epochs` times whole epochs of `fit()` and records memory after each, to show how cost
grows with the dataset and that memory does not grow with the epochs.

The CPU is often shared: every result carries the load average and both the median and the best step, and
`achieved / peak` uses a peak measured the same way (a large matmul in the same dtype).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungxray.config import TrainConfig
from lungxray.hostinfo import usable_cores
from lungxray.models.kernels import conv3x3
from lungxray.models.nets import build_model, count_flops
from lungxray.runtime import cpu_features, resolve_device, resolve_precision, set_threads
from lungxray.training.loop import EpochInputs, StepHooks, TrainState, fit, make_optimizer, train_one_epoch
from lungxray.training.plan import MemberPlan, plan_members
from lungxray.transforms.geometric import Augmenter, resolve_params
from lungxray.waitpolicy import wait_policy

log = logging.getLogger(__name__)

__all__ = [
    "bench_epochs",
    "bench_predict",
    "bench_train",
    "format_predict",
    "format_train",
    "machine_info",
    "peak_flops",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    """Resident memory now (not the peak), from /proc; the peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was (1-minute load average)."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "isa": cpu_features()["isa"],  # what the kernels may use (ONEDNN_MAX_CPU_ISA applied)
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": wait_policy(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
               repeats: int = 5) -> float:
    """Best achieved FLOP/s of large square matmuls: the practical ceiling the models are compared with.

    On a shared CPU the smaller size often wins (less time to be preempted), so both are tried.
    """
    device = torch.device(device)
    sizes = (size,) if size else ((8192,) if device.type == "cuda" else (1024, 2048))
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library initialisation, AMX tile configuration
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _synthetic_images(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 'radiographs' (content does not change the cost of any step)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, size // 16, size // 16, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img[:, 0] * 255).to(torch.uint8).to(device)


def bench_train(
    arch: str = "seed_cnn",
    batch_size: int = 32,
    steps: int = 30,
    warmup: int = 5,
    members: int = 1,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    channels_last: bool | None = None,
    compile: bool | None = None,
    threads: int = 0,
    image_size: int = 256,
    augment: str = "seed",
    model_args: dict[str, Any] | None = None,
    optimizer: str | None = None,
    with_peak: bool = True,
    model_attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Training images per second of `arch` through `training.loop.train_one_epoch`, after `warmup` steps.

    Unset options take `TrainConfig`'s defaults, so the default benchmark measures what `lungxray train` runs
    without the per-machine choice (`speed.autotune.bench_train_tuned` measures with it). Rates count
    member-images (batch_size x members per step), like the training log. `model_attrs` sets per-instance speed
    switches on the model (e.g. {"fused": False}) before the optimizer is built.
    """
    if steps < 1 or warmup < 0 or batch_size < 2 or members < 1:
        raise ValueError("bench train needs steps >= 1, warmup >= 0, batch size >= 2 and members >= 1")
    dev = resolve_device(str(device))
    set_threads(threads)
    defaults = TrainConfig()
    cfg = TrainConfig(
        batch_size=batch_size,
        precision=precision or defaults.precision,  # type: ignore[arg-type]
        channels_last=defaults.channels_last if channels_last is None else channels_last,
        compile=defaults.compile if compile is None else compile,
        optimizer=optimizer or defaults.optimizer,  # type: ignore[arg-type]
    )
    amp_dtype = resolve_precision(dev, cfg.precision)
    torch.manual_seed(0)
    model = build_model(arch, members=members, image_size=image_size, **(model_args or {}))
    for attr, value in (model_attrs or {}).items():
        setattr(model, attr, value)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)  # type: ignore[call-overload]
    t0, stamps = _timed_steps(model, cfg, dev, amp_dtype, augment, warmup + steps)
    times = np.diff([t0, *stamps])[warmup:]  # (steps,) seconds per timed step
    result = _train_result(arch, model, cfg, dev, amp_dtype, augment, steps, warmup, times)
    result["warmup_seconds"] = float(stamps[warmup - 1] - t0) if warmup else 0.0
    log.debug("bench train %s: %.1f img/s (median of %d steps)", arch, result["images_per_second"], steps)
    if with_peak:
        peak = peak_flops(dev, amp_dtype)
        result["peak_gflops"] = peak / 1e9
        result["fraction_of_peak"] = result["achieved_gflops"] * 1e9 / peak
    return result


def _timed_steps(model: Any, cfg: TrainConfig, dev: torch.device, amp_dtype: torch.dtype,
                 augment: str, total: int) -> tuple[float, list[float]]:
    """`total` training steps on synthetic images through the real epoch loop: (start time, end time of each)."""
    batch_size, members, size = cfg.batch_size, model.members, model.image_size
    n_images = min(batch_size * total, 512)
    images = _synthetic_images(n_images, size, dev)
    labels = torch.arange(n_images, device=dev) % 3
    order = np.arange(batch_size * total) % n_images
    plan = MemberPlan(np.tile(order, (members, 1)), np.ones((members, n_images), dtype=bool), bootstrap=False)
    optimizer_ = make_optimizer(model, cfg)
    augmenter = Augmenter(resolve_params(augment), seed=1, device=dev)
    state = TrainState(batch_size=batch_size, member_stopped=[False] * members)
    step_model: Any = torch.compile(model) if cfg.compile else model  # as fit() does
    stamps: list[float] = []

    def on_step(_: int) -> None:
        _sync(dev)
        stamps.append(time.perf_counter())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    train_one_epoch(step_model, EpochInputs(images, labels, plan, augmenter, amp_dtype=amp_dtype), optimizer_, state,
                    cfg, np.random.default_rng(0), StepHooks(on_step=on_step))
    return t0, stamps


def _train_result(arch: str, model: Any, cfg: TrainConfig, dev: torch.device, amp_dtype: torch.dtype,
                  augment: str, steps: int, warmup: int, times: np.ndarray) -> dict[str, Any]:
    """The figures of one training benchmark, from the timed steps' durations (seconds)."""
    members, size = model.members, model.image_size
    fwd_flops = count_flops(model, size)  # per image per member, forward
    rate = cfg.batch_size * members / float(np.median(times))
    return {
        "arch": arch,
        "batch_size": cfg.batch_size,
        "members": members,
        "image_size": size,
        "device": str(dev),
        "dtype": _dtype_name(amp_dtype),
        "channels_last": cfg.channels_last,
        "compiled": cfg.compile,
        "optimizer": cfg.optimizer,
        "augment": augment,
        "steps": steps,
        "warmup": warmup,
        "step_seconds_median": float(np.median(times)),
        "step_seconds_min": float(times.min()),
        "images_per_second": rate,
        "images_per_second_best": cfg.batch_size * members / float(times.min()),
        "forward_gflops_per_image": fwd_flops / 1e9,
        "params": sum(p.numel() for p in model.parameters()) // members,
        "achieved_gflops": 3 * fwd_flops * rate / 1e9,  # forward + backward (2x forward) per image
        # the Winograd passes do 2.25-4x fewer multiplies than these direct-convolution FLOPs count
        "winograd": any("winograd" in plan for plan in conv3x3.chosen().values()),
        "peak_memory_mb": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_mb() * 2**20)
        / 2**20,
        **machine_info(dev),
        "fused": getattr(model, "fused", None), "micro_batch": getattr(model, "micro_batch", None),
        "runtime": None,
    }


def latencies(fn: Callable[[], Any], runs: int, warmup: int = 3) -> np.ndarray:
    """Seconds per call of `fn`, `runs` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def _scratch_bundle(folder: Path, arch: str, members: int, image_size: int) -> Path:
    """An untrained bundle of `arch` (weights do not change the cost of inference)."""
    from lungxray.inference.bundle import save_bundle
    from lungxray.runtime import INPUT_MEAN, INPUT_STD

    torch.manual_seed(0)
    args = {"image_size": image_size}
    model = build_model(arch, members=members, **args)
    meta = {
        "name": f"bench-{arch}", "classes": ["covid", "normal", "pneumonia"], "arch": arch, "arch_args": args,
        "members": members, "bootstrap": False, "temperature": 1.0, "refer_threshold": 1.0,
        "input": {"size": image_size, "channels": 1, "mean": INPUT_MEAN, "std": INPUT_STD, "standardize": "none",
                  "crop_border": 0.0},
    }
    return save_bundle(folder, model, meta)


def bench_predict(
    run_dir: str | Path | None = None,
    arch: str = "compact_cnn",
    members: int = 1,
    device: str = "cpu",
    runs: int = 100,
    batch_size: int = 64,
    engines: tuple[str, ...] = ("torch", "onnx"),
    threads: int = 0,
    onnx_path: str | Path | None = None,
) -> dict[str, Any]:
    """Per-request inference cost after decoding: batch-1 latency p50/p99 and batch throughput, per engine.

    Without `run_dir` an untrained bundle of `arch` is made in a temporary folder (weights do not change the
    cost); with one, `model.onnx` is exported into it on first use, as `lungxray predict --engine onnx` does.
    `onnx_path` times another export of the same bundle instead, e.g. an int8 one (`lungxray export --quantize`).
    `threads` applies to both engines; 0 keeps each one's default (all cores for PyTorch, `export.ONNX_THREADS`
    for ONNX Runtime).
    """
    from lungxray.inference.predictor import Predictor

    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="lungxray-bench-") as tmp:
        folder = Path(run_dir) if run_dir is not None else _scratch_bundle(Path(tmp), arch, members, 256)
        result: dict[str, Any] = {"run_dir": str(run_dir) if run_dir else None, "engines": {}}
        for engine in engines:
            if engine == "torch":
                predictor = Predictor.load(folder, device)
            elif engine == "onnx":
                from lungxray.inference.onnx import ONNX_THREADS, OnnxPredictor
                from lungxray.inference.quantize import quantization_info

                predictor = OnnxPredictor.load(folder, device, onnx_path=onnx_path, threads=threads or ONNX_THREADS)
                quant = quantization_info(onnx_path) if onnx_path is not None else None
            else:
                raise ValueError(f"unknown engine {engine!r}; choose torch or onnx")
            size = int(predictor.meta["input"]["size"])
            images = _synthetic_images(batch_size, size, torch.device("cpu")).numpy()
            one = images[:1]
            lat = latencies(functools.partial(predictor.member_logits, one), runs)
            big = latencies(functools.partial(predictor.member_logits, images, batch_size=batch_size), 5, warmup=1)
            result["engines"][engine] = {
                "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
                "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
                "latency_ms_min": float(lat.min() * 1e3),
                "batch": batch_size,
                "images_per_second": batch_size / float(np.median(big)),
            }
            if engine == "onnx":
                result["engines"][engine]["model"] = str(onnx_path or folder / "model.onnx")
                result["engines"][engine]["quantization"] = quant
        meta = predictor.meta
        result.update(arch=meta["arch"], members=int(meta["members"]), image_size=int(meta["input"]["size"]),
                      device=device, runs=runs, **machine_info(device))
    return result


def bench_epochs(
    images: np.ndarray,
    labels: np.ndarray,
    arch: str = "compact_cnn",
    epochs: int = 3,
    batch_size: int = 32,
    device: str = "cpu",
    members: int = 1,
    threads: int = 0,
    model_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Whole epochs of `fit()` on `images` (uint8 (N, S, S)): seconds, images/s and memory after each epoch.

    Resident memory is read after every epoch: a leak (history holding tensors, a growing cache) shows as growth
    from epoch to epoch; a dataset 4x larger should cost ~4x the time and add only its own bytes.
    """
    dev = resolve_device(device)
    set_threads(threads)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, early_stopping_patience=0, plateau_action="none")
    amp_dtype = resolve_precision(dev, cfg.precision)
    n, size = len(images), images.shape[-1]
    holdout = np.arange(0, n, 10)  # 10% validation, as cheap as in a real run
    plan = plan_members(labels, members, False, 0, holdout=holdout)
    torch.manual_seed(0)
    model = build_model(arch, members=members, image_size=size, **(model_args or {}))
    model = model.to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
    records: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        records.append({
            "epoch": record["epoch"], "seconds": record["seconds"], "images_per_second": record["images_per_second"],
            "rss_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb(),
            "gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        })

    fit(model, torch.as_tensor(images, device=dev), torch.as_tensor(labels, device=dev), plan, cfg,
        Augmenter(resolve_params("seed"), seed=1, device=dev), amp_dtype=amp_dtype, on_epoch=on_epoch)
    return records


def format_train(r: dict[str, Any]) -> str:
    """One human-readable paragraph of a `bench_train` result."""
    lines = [
        f"{r['arch']} x{r['members']}  batch {r['batch_size']}  {r['image_size']}px  {r['device']} {r['dtype']}"
        f"  channels_last={r['channels_last']}  compiled={r['compiled']}  {r['threads']} threads",
        f"  {r['images_per_second']:.1f} img/s median ({r['images_per_second_best']:.1f} best step) over "
        f"{r['steps']} steps after {r['warmup']} warm-up ({r['warmup_seconds']:.1f} s)",
        f"  {r['forward_gflops_per_image']:.3f} GFLOPs/img forward, {r['achieved_gflops']:.0f} GFLOP/s achieved",
    ]
    if "peak_gflops" in r:
        lines[-1] += f" of {r['peak_gflops']:.0f} peak ({r['dtype']} matmul): {100 * r['fraction_of_peak']:.0f}%"
    if r.get("winograd"):
        lines[-1] += " (direct-convolution FLOPs; the Winograd passes that ran do fewer multiplies)"
    lines.append(f"  load average {r['load_average']} on {r['cores']} cores ({r['cpu']}, {r.get('isa', '?')})")
    if r.get("runtime"):
        lines.append(f"  {r['runtime']['line']}")
    return "\n".join(lines)


def format_predict(r: dict[str, Any]) -> str:
    """One line per engine of a `bench_predict` result."""
    head = (f"{r['arch']} x{r['members']}  {r['image_size']}px  {r['device']}  load average {r['load_average']}"
            f"  ({r['cpu']}, {r.get('isa', '?')})")
    rows = [
        f"  {name + (' int8' if e.get('quantization') else ''):<11} batch 1: p50 {e['latency_ms_p50']:.2f} ms  "
        f"p99 {e['latency_ms_p99']:.2f} ms   "
        f"batch {e['batch']}: {e['images_per_second']:.0f} img/s"
        for name, e in r["engines"].items()
    ]
    return "\n".join([head, *rows])

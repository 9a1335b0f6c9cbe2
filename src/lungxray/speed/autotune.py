"""Per-machine choice of how training runs, by a short measurement on first use, cached per CPU and model shape.

Why: what is fastest depends on the CPU. On Intel Sapphire Rapids (AMX) bf16 autocast trains the seed network
several times faster than fp32; on an AVX2-only CPU (AMD Zen 3, older Intel, most laptops) there is no native
bf16 and oneDNN's emulated bf16 is slower than fp32; whether channels_last, the fused C kernels or every core pays
differs too. So instead of fixed defaults tuned on one machine, `choose` times a few training steps of each
candidate (the real step, `bench.bench_train`, on synthetic images of the run's shape) and keeps the fastest:

1. precision: bf16 against fp32, only where the CPU has native bf16 (AVX512-BF16 or AMX; on CUDA where the
   GPU supports it) and `train.precision` is `auto`; elsewhere fp32 (`runtime.resolve_precision`);
2. memory format: channels_last against the default layout;
3. the fused C kernels (models that have them: `seed_cnn`), on against off, and its micro-batches (slices of 8
   images through the conv blocks, `SeedCNN.micro_batch`) against the whole batch: the slices keep maps in cache
   on AMX, but on AVX2 fp32 they cost more in the weight gradients' reductions than they save (1.3x, measured);
4. threads: all cores against half of them, when `train.threads` is 0 and there are at least 2 cores.

Coordinate descent (each stage keeps the winner of the one before), candidates interleaved over two rounds, the
best step of each; a candidate must be 3% faster than the current choice to replace it (15% on a busy CPU, load
average above the cores, where step times jitter more; such a result is cached as provisional and measured again
once the CPU is idle). Where the first round already shows a 25% gap the second is skipped. About 6-10 short
runs of 3 steps: 10-40 s once per machine and model shape on an idle CPU (a few minutes under heavy load).
The result is cached as JSON under `$LUNGXRAY_CACHE/autotune` (default ~/.cache/lungxray), keyed by CPU model and
flags, the ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY limits, torch version, device, architecture,
its arguments, members, image and batch size; a cached file that does not parse is measured again.

Overrides: `train.autotune: false` runs exactly the settings written in the config; `train.precision` other
than `auto` and `train.threads` other than 0 are never changed. Deterministic runs, distributed (torchrun) runs
and `LUNGXRAY_AUTOTUNE=0` keep the config as written too. torch.compile is not a candidate (measured slower on
CPU for every model here, and compiling costs tens of seconds per candidate: docs/performance.md); it stays
`train.compile: true`. Packed against sequential members is a recipe choice (the learning-rate rule differs),
not a speed setting: `ensemble.packed` stays as written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lungxray.config import RunConfig, TrainConfig
from lungxray.hostinfo import cache_root, usable_cores
from lungxray.io.files import write_json
from lungxray.models.kernels.conv3x3 import borrowing_plans
from lungxray.runtime import cpu_features, resolve_device, resolve_precision
from lungxray.speed.bench import bench_train

log = logging.getLogger(__name__)

__all__ = ["Choice", "choose", "for_run", "from_config"]

CACHE_VERSION = 2  # 2: the AVX2 kernels (conv3x3, 8-lane seed stem) change what is fastest
MIN_GAIN = 1.03  # a candidate must beat the current choice by this factor
BUSY_GAIN = 1.15  # ... by this one when the CPU is busy (load average above the cores): step times jitter by 10%+
CLEAR_GAIN = 1.25  # after one round, a gap this large needs no second round


@dataclass(frozen=True)
class Choice:
    """What training runs with, and why."""

    precision: str  # bf16, fp16 or fp32
    channels_last: bool
    threads: int  # 0 = all cores
    fused: bool | None  # the fused C kernels; None where the model has none
    source: str  # measured, cache, config
    reason: str
    rates: dict[str, float] = field(default_factory=dict)  # candidate -> best-step member-images/s
    isa: str = ""
    cpu: str = ""
    micro_batch: int | None = None  # SeedCNN.micro_batch; None where the model has none

    @property
    def model_attrs(self) -> dict[str, Any]:
        """The per-instance speed switches to set on the model."""
        attrs = {"fused": self.fused, "micro_batch": self.micro_batch}
        return {k: v for k, v in attrs.items() if v is not None}

    def line(self) -> str:
        """One line for the training log, run.json and `lungxray bench`."""
        threads = "all cores" if self.threads == 0 else f"{self.threads} threads"
        fused = "" if self.fused is None else f", fused kernels {'on' if self.fused else 'off'}"
        fused += "" if self.micro_batch is None else f", micro-batch {self.micro_batch or 'off'}"
        return (f"runtime: {self.precision}, {'channels_last' if self.channels_last else 'NCHW'}, {threads}{fused}"
                f" ({self.source}: {self.reason}) on {self.cpu}, {self.isa}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "line": self.line()}

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """The training config with these settings."""
        precision: Any = self.precision
        return dataclasses.replace(cfg, precision=precision, channels_last=self.channels_last, threads=self.threads)

    def apply_model(self, model: torch.nn.Module) -> None:
        """Set the per-instance speed switches (on models that have them)."""
        for attr, value in self.model_attrs.items():
            if hasattr(model, attr):
                setattr(model, attr, value)


def _cache_dir() -> Path:
    return cache_root() / "autotune"


def _switches(arch: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The model's speed switches with their defaults: `fused` and `micro_batch` (seed_cnn without BatchNorm)."""
    from lungxray.models.nets import build_model

    model = build_model(arch, **model_args)
    if getattr(model, "batch_norm", False):
        return {}
    return {k: getattr(model, k) for k in ("fused", "micro_batch") if getattr(model, k, None) is not None}


def from_config(cfg: TrainConfig, device: torch.device, reason: str, fused: bool | None = None,
                micro_batch: int | None = None) -> Choice:
    """The settings as written (no measurement)."""
    feats = cpu_features()
    isa = feats["isa"] if device.type == "cpu" else torch.cuda.get_device_name(device)
    precision = str(resolve_precision(device, cfg.precision)).replace("torch.", "")
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(precision, precision)
    return Choice(precision, cfg.channels_last, cfg.threads, fused, "config", reason, isa=isa, cpu=feats["cpu"],
                  micro_batch=micro_batch)


def _key(arch: str, model_args: dict[str, Any], members: int, image_size: int, batch_size: int,
         device: torch.device, cfg: TrainConfig) -> dict[str, Any]:
    feats = cpu_features()
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:  # pragma: no cover
        flags = ""
    return {
        "version": CACHE_VERSION, "cpu": feats["cpu"], "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "onednn_max_isa": feats["onednn_max_isa"], "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "fused_env": os.environ.get("LUNGXRAY_FUSED"), "torch": torch.__version__, "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cores": usable_cores(),
        "arch": arch, "model_args": {k: model_args[k] for k in sorted(model_args)}, "members": members,
        "image_size": image_size, "batch_size": batch_size, "precision": cfg.precision, "threads": cfg.threads,
        "optimizer": cfg.optimizer, "kernels": _kernel_sources(),
    }


def _kernel_sources() -> str:
    """A hash of the C kernels' sources: a changed kernel changes what is fastest, so it is measured again."""
    csrc = Path(__file__).resolve().parents[1] / "models" / "kernels" / "csrc"
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(csrc.glob("*.c")))).hexdigest()[:16]


def _busy() -> tuple[float, bool]:
    """(1-minute load average, whether it exceeds the cores): a busy CPU's measurements are provisional."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = usable_cores()
    return load, load > cores


def _load(path: Path, key: dict[str, Any]) -> Choice | None:
    """A cached choice for exactly this key, or None (missing, unreadable, other key, implausible values, or
    measured on a busy CPU while it is idle now: measured again)."""
    try:
        raw = json.loads(path.read_text())
        c = raw["choice"]
        if raw.get("busy") and not _busy()[1]:
            return None
        ok = (raw.get("key") == key and c["precision"] in ("bf16", "fp16", "fp32")
              and isinstance(c["channels_last"], bool) and isinstance(c["threads"], int) and c["threads"] >= 0
              and c["fused"] in (None, True, False) and isinstance(c["reason"], str) and _micro_ok(c))
        if not ok:
            return None
        rates = {str(k): float(v) for k, v in c.get("rates", {}).items()}
        return Choice(c["precision"], c["channels_last"], c["threads"], c["fused"], "cache", c["reason"], rates,
                      c.get("isa", ""), c.get("cpu", ""), c.get("micro_batch"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _micro_ok(c: dict[str, Any]) -> bool:
    m = c.get("micro_batch")
    return m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 0)


def _label(c: dict[str, Any]) -> str:
    threads = "all" if c["threads"] == 0 else str(c["threads"])
    fused = "" if c["fused"] is None else ("+fused" if c["fused"] else "-fused")
    micro = "" if c.get("micro_batch") is None else f"/mb{c['micro_batch']}"
    return f"{c['precision']}/{'CL' if c['channels_last'] else 'NCHW'}/{threads}t{fused}{micro}"


def choose(
    arch: str,
    model_args: dict[str, Any] | None,
    members: int,
    image_size: int,
    batch_size: int,
    device: torch.device | str,
    cfg: TrainConfig,
    *,
    use_cache: bool = True,
    steps: int = 2,
) -> Choice:
    """The fastest settings for training this model shape on this machine: cached, or measured now (and cached)."""
    device = torch.device(device)
    model_args = dict(model_args or {})
    switches = _switches(arch, {**model_args, "image_size": image_size}) if device.type == "cpu" else {}
    if not cfg.autotune or os.environ.get("LUNGXRAY_AUTOTUNE", "1") == "0":
        return from_config(cfg, device, "train.autotune is off" if not cfg.autotune else "LUNGXRAY_AUTOTUNE=0",
                           switches.get("fused"), switches.get("micro_batch"))
    key = _key(arch, model_args, members, image_size, batch_size, device, cfg)
    path = _cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    if use_cache and (cached := _load(path, key)) is not None:
        return cached
    choice = _measure(arch, model_args, members, image_size, batch_size, device, cfg, switches, steps)
    try:
        load, busy = _busy()
        write_json(path, {"key": key, "choice": dataclasses.asdict(choice), "measured_at": time.time(),
                          "load_average": load, "busy": busy})
    except OSError as exc:  # a read-only cache: measure again next time
        log.warning("autotune: could not cache the choice in %s (%s)", path, exc)
    return choice


def _measure(arch: str, model_args: dict[str, Any], members: int, image_size: int, batch_size: int,
             device: torch.device, cfg: TrainConfig, switches: dict[str, Any], steps: int) -> Choice:
    feats = cpu_features()
    native = feats["native_bf16"] if device.type == "cpu" else torch.cuda.is_bf16_supported()
    base = from_config(dataclasses.replace(cfg, channels_last=True), device, "")
    current: dict[str, Any] = {"precision": base.precision, "channels_last": True, "threads": cfg.threads,
                               "fused": switches.get("fused"), "micro_batch": switches.get("micro_batch")}
    rates: dict[str, float] = {}
    threads_before = torch.get_num_threads()
    reasons = []

    def rate(c: dict[str, Any]) -> float:
        r = bench_train(arch, batch_size, steps, 1, members, device, c["precision"], c["channels_last"], False,
                        c["threads"], image_size, model_args=model_args, optimizer=cfg.optimizer, with_peak=False,
                        model_attrs={k: c[k] for k in ("fused", "micro_batch") if c[k] is not None})
        rates[_label(c)] = max(rates.get(_label(c), 0.0), float(r["images_per_second_best"]))
        return rates[_label(c)]

    def stage(what: str, alternative: dict[str, Any]) -> None:
        nonlocal current
        candidates = [current, {**current, **alternative}]
        best = [0.0, 0.0]
        for round_ in range(2):
            for i, c in enumerate(candidates):
                best[i] = max(best[i], rate(c))
            if round_ == 0 and max(best) > CLEAR_GAIN * min(best):
                break
        if best[1] > (BUSY_GAIN if _busy()[1] else MIN_GAIN) * best[0]:
            current = candidates[1]
            reasons.append(f"{what} {best[1] / best[0]:.2f}x")
        else:
            reasons.append(f"{what} not faster ({best[1] / max(best[0], 1e-9):.2f}x)")

    try:
        rate(current)  # the process's first steps pay one-time set-up (thread pool, oneDNN): not a candidate's cost
        rates.clear()
        if cfg.precision == "auto":
            if native:
                current["precision"] = "bf16"
                stage("fp32", {"precision": "fp32"})
            else:
                reasons.append("fp32: no native bf16" + (f" ({feats['isa']})" if device.type == "cpu" else ""))
        stage("NCHW", {"channels_last": False})
        if switches.get("fused"):
            stage("unfused", {"fused": False})
        if switches.get("micro_batch"):
            stage("no micro-batches", {"micro_batch": 0})
        if device.type == "cpu" and cfg.threads == 0:
            _thread_stage(stage, reasons)
    finally:
        torch.set_num_threads(threads_before)
    isa = feats["isa"] if device.type == "cpu" else torch.cuda.get_device_name(device)
    best = rates.get(_label(current), 0.0)
    reason = f"{best:.0f} member-img/s; " + "; ".join(reasons)
    return Choice(current["precision"], current["channels_last"], current["threads"], current["fused"], "measured",
                  reason, rates, isa, feats["cpu"], current["micro_batch"])


def _thread_stage(stage: Callable[[str, dict[str, Any]], None], reasons: list[str]) -> None:
    """Half the cores against all of them, measured only on an idle CPU: on a busy one fewer threads win for the
    moment only, which is not a fact about the machine to cache. The half-core candidate runs the 3x3 layers'
    plans measured for all cores (a slight handicap for it; training measures its own if it wins)."""
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores < 2:
        return
    if load < cores:
        with borrowing_plans():  # the 3x3 plans measured for all cores: measuring each layer again cost ~30 s
            stage(f"{cores // 2} threads", {"threads": cores // 2})
    else:
        reasons.append(f"threads: all cores (CPU busy, load {load:.1f}: not measured)")


def _from_record(record: Any) -> Choice | None:
    """The choice a run recorded in run.json (a resumed run keeps it), or None if there is no valid one."""
    try:
        c = dict(record)
        ok = (c["precision"] in ("bf16", "fp16", "fp32") and isinstance(c["channels_last"], bool)
              and isinstance(c["threads"], int) and c["threads"] >= 0 and c["fused"] in (None, True, False)
              and _micro_ok(c))
        return Choice(c["precision"], c["channels_last"], c["threads"], c["fused"], "resumed", str(c["reason"]),
                      {str(k): float(v) for k, v in c.get("rates", {}).items()}, str(c.get("isa", "")),
                      str(c.get("cpu", "")), c.get("micro_batch")) if ok else None
    except (KeyError, TypeError, ValueError):
        return None


def for_run(cfg: RunConfig, device: torch.device, distributed: bool = False, recorded: Any = None) -> Choice:
    """The settings a training run uses: those it recorded (resume), as written (deterministic or distributed
    runs, `train.autotune: false`), or `choose` for its model shape."""
    members = cfg.ensemble.members if cfg.ensemble.packed else 1
    args = {**cfg.model.args, "image_size": cfg.data.image_size}
    if recorded is not None and (previous := _from_record(recorded)) is not None:
        return previous
    if cfg.train.deterministic or distributed:
        switches = _switches(cfg.model.arch, args) if device.type == "cpu" else {}
        why = "deterministic run" if cfg.train.deterministic else "distributed run: every rank the same"
        return from_config(cfg.train, device, why, switches.get("fused"), switches.get("micro_batch"))
    model_args = {k: v for k, v in args.items() if k != "image_size"}
    return choose(cfg.model.arch, model_args, members, cfg.data.image_size, cfg.train.batch_size, device, cfg.train)


def bench_train_tuned(arch: str = "seed_cnn", batch_size: int = 32, steps: int = 30, warmup: int = 5,
                      members: int = 1, device: str | torch.device = "cpu", precision: str | None = None,
                      channels_last: bool | None = None, compile: bool | None = None, threads: int = 0,
                      image_size: int = 256, with_peak: bool = True) -> dict[str, Any]:
    """`bench.bench_train` with what `lungxray train` would run on this machine for the options left unset
    (precision None or auto, channels_last None, threads 0), reported as `runtime` (`lungxray bench --autotune`)."""
    dev = resolve_device(str(device))
    base = TrainConfig(precision=precision or "auto", threads=threads)  # type: ignore[arg-type]
    runtime = choose(arch, None, members, image_size, batch_size, dev, base)
    result = bench_train(arch, batch_size, steps, warmup, members, dev, runtime.precision,
                         runtime.channels_last if channels_last is None else channels_last, compile, runtime.threads,
                         image_size, with_peak=with_peak, model_attrs=runtime.model_attrs)
    result["runtime"] = runtime.to_dict()
    return result

"""The per-machine runtime choice: native bf16 only, measured once, cached per shape, overridable, recorded.

Tiny shapes (32 px, batch 4, one timed step): the point is the bookkeeping, not which candidate wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungxray.config import TrainConfig, load_config
from lungxray.runtime import cpu_features, resolve_precision
from lungxray.speed import autotune

TINY = {"arch": "compact_cnn", "model_args": {"width": 4}, "members": 2, "image_size": 32, "batch_size": 4}


def _choose(cfg: TrainConfig, **kw: object) -> autotune.Choice:
    return autotune.choose(**TINY, device="cpu", cfg=cfg, steps=1, **kw)  # type: ignore[arg-type]


def _has_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(not _has_flag("avx2"), reason="needs an x86 CPU with AVX2")
def test_an_avx2_limit_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    feats = cpu_features()
    assert not feats["native_bf16"] and feats["isa"].startswith("AVX2") and "ONEDNN_MAX_CPU_ISA=AVX2" in feats["isa"]
    assert resolve_precision(torch.device("cpu"), "auto") == torch.float32
    assert resolve_precision(torch.device("cpu"), "bf16") == torch.bfloat16  # asked for by name: kept


@pytest.mark.skipif(not _has_flag("avx512f") or _has_flag("avx512_bf16") or _has_flag("amx_bf16"),
                    reason="needs AVX-512 without native bf16")
def test_emulated_bf16_is_not_native() -> None:
    assert not cpu_features()["native_bf16"]


def test_measured_once_then_cached_and_a_broken_cache_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    first = _choose(TrainConfig())
    assert first.source == "measured" and first.rates and first.line().startswith("runtime: ")
    assert first.precision in (("bf16", "fp32") if cpu_features()["native_bf16"] else ("fp32",))
    files = list((tmp_path / "autotune").glob("*.json"))
    assert len(files) == 1
    again = _choose(TrainConfig())
    assert again.source == "cache"
    assert (again.precision, again.channels_last, again.threads) == (first.precision, first.channels_last,
                                                                      first.threads)
    other = autotune._key(**{**TINY, "batch_size": 6}, device=torch.device("cpu"), cfg=TrainConfig())
    assert other != autotune._key(**TINY, device=torch.device("cpu"), cfg=TrainConfig())  # a shape: its own entry
    raw = json.loads(files[0].read_text())
    raw["choice"]["precision"] = "int3"
    files[0].write_text(json.dumps(raw))
    assert _choose(TrainConfig()).source == "measured"


def test_config_overrides_are_never_measured_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    off = _choose(TrainConfig(autotune=False, channels_last=False, threads=1))
    assert off.source == "config" and (off.channels_last, off.threads) == (False, 1)
    assert not (tmp_path / "autotune").exists()
    fixed = _choose(TrainConfig(precision="fp32", threads=1))
    assert fixed.source == "measured" and fixed.precision == "fp32" and fixed.threads == 1
    applied = fixed.apply(TrainConfig(precision="fp32", threads=1))
    assert (applied.precision, applied.channels_last, applied.threads) == ("fp32", fixed.channels_last, 1)
    monkeypatch.setenv("LUNGXRAY_AUTOTUNE", "0")
    assert _choose(TrainConfig()).source == "config"


def test_a_run_keeps_what_it_recorded_and_deterministic_runs_keep_the_config() -> None:
    cfg = load_config({"model": {"arch": "compact_cnn", "args": {"width": 4}}, "data": {"image_size": 32}})
    recorded = {"precision": "fp32", "channels_last": False, "threads": 1, "fused": None, "reason": "r"}
    resumed = autotune.for_run(cfg, torch.device("cpu"), recorded=recorded)
    assert resumed.source == "resumed" and (resumed.precision, resumed.channels_last) == ("fp32", False)
    det = autotune.for_run(load_config(cfg, ["train.deterministic=true"]), torch.device("cpu"),
                           recorded={"precision": "int3"})  # an unreadable record is ignored
    assert det.source == "config" and "deterministic" in det.reason


def test_the_training_run_records_its_runtime(trained_run: Path) -> None:
    info = json.loads((trained_run / "run.json").read_text())
    assert info["runtime"]["line"].startswith("runtime: ") and info["runtime"]["threads"] == 1  # SMOKE_OVERRIDES
    timing = json.loads((trained_run / "metrics.json").read_text())["timing"]
    assert timing["runtime"]["precision"] == {"bfloat16": "bf16", "float32": "fp32"}[timing["precision"]]
    for record in (info, timing):  # and which C kernels it could use
        assert set(record["kernels"]) == {"conv3x3", "patch_stem", "bn_relu", "warp", "seed_stem"}
        assert all(isinstance(v, bool) for v in record["kernels"].values())

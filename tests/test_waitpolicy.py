"""The OpenMP wait policy chosen before torch loads: spin on a free CPU, sleep on a shared one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lungxray import waitpolicy
from lungxray.waitpolicy import busy_cpus, choose_wait_policy

ROOT = Path(__file__).parents[1]


def _stat(path: Path, busy: int, idle: int) -> None:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 ...\n")


def test_busy_cpus_reads_the_share_of_non_idle_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    _stat(stat, busy=100, idle=100)
    monkeypatch.setattr(waitpolicy.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(waitpolicy.time, "sleep", lambda s: _stat(stat, busy=130, idle=190))  # 30 of 120 busy
    assert busy_cpus(0.0, str(stat)) == pytest.approx(1.0)  # a quarter of 4 CPUs
    assert busy_cpus(0.0, str(tmp_path / "missing")) is None


def test_real_proc_stat_gives_a_plausible_figure() -> None:
    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat")
    busy = busy_cpus(0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.parametrize(("busy", "expected"), [(0.1, None), (1.5, "PASSIVE"), (None, "PASSIVE")])
def test_spin_only_when_the_cpu_is_free(monkeypatch: pytest.MonkeyPatch, busy: float | None,
                                        expected: str | None) -> None:
    monkeypatch.setattr(waitpolicy, "busy_cpus", lambda: busy)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh `lungxray` process
    env: dict[str, str] = {}
    message = choose_wait_policy("train", env)
    assert env.get("OMP_WAIT_POLICY") == expected
    assert ("threads spin" in message) == (expected is None)


def test_the_server_sleeps_and_the_user_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waitpolicy, "busy_cpus", lambda: 0.0)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    env: dict[str, str] = {}
    choose_wait_policy("serve", env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "from the environment" in choose_wait_policy("train", env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_real_command_reports_its_policy(tmp_path: Path) -> None:
    """`lungxray bench train` in a fresh process: the JSON says which policy its OpenMP threads ran with."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, "-m", "lungxray", "bench", "train", "--arch", "compact_cnn", "--steps", "2",
           "--batch-size", "4", "--image-size", "64", "--no-peak", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    policy = json.loads(out[out.index("{"):])["omp_wait_policy"]
    assert policy in ("PASSIVE", "libgomp default (spin, then sleep)")

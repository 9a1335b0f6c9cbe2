"""bench/select_oob.py: candidates trained per seed, ranked on out-of-bag figures, the stated rule applied."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def select(data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench/select_oob.py"), "--config", str(ROOT / "configs/smoke.yaml"),
           "--data", str(data), "--out", str(out), "--seeds", "0", "--threads", "1", "--shift-top", "1",
           "--set", "data.image_size=48", "--set", "train.epochs=2", "--set", "ensemble.members=2",
           "--set", "ensemble.bootstrap=true",
           "--candidate", "base", "--candidate", "ls:train.label_smoothing=0.1", *extra]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads((out / "selection.json").read_text())
    result["printed"] = printed
    return result


def test_rule_decides_and_finished_runs_are_reused(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "select"
    taken = select(tiny_dataset, out, "--min-gain", "-1", "--max-shift-drop", "1")  # any challenger passes
    assert taken["choice"] == "ls"
    for name in ("base", "ls"):
        s = taken["summary"][name]
        assert s["errors"] == [] and 0 <= s["oob_accuracy"] <= 1 and s["shift_mean"] is not None
        metrics = json.loads((out / f"{name}_s0" / "metrics.json").read_text())
        assert s["oob_accuracy"] == metrics["validation"]["metrics"]["accuracy"]
        assert metrics["validation_kind"] == "out-of-bag"
    assert "| base | (base) |" in taken["printed"] and "Choice: **ls**" in taken["printed"]
    assert "test" not in taken["printed"].replace("Test figures not read", "")

    log = out / "ls_s0.log"
    before = log.stat().st_mtime_ns
    kept = select(tiny_dataset, out, "--min-gain", "1", "--reveal-test")  # no challenger can gain a whole unit
    assert kept["choice"] == "base" and "the incumbent stays" in kept["printed"]
    assert log.stat().st_mtime_ns == before  # the finished run was read, not trained again
    choice_at = kept["printed"].index("Choice:")
    assert kept["printed"].index("read after the choice") > choice_at  # revealed only below the decision
    test = json.loads((out / "base_s0" / "metrics.json").read_text())["test"]["metrics"]
    assert kept["test_after_choice"]["base"] == [f"{round(test['accuracy'] * test['n'])}/{test['n']}"]

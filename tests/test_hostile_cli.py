"""Issue 18, the command line in careless hands: each case ends in one line and a non-zero exit, or in an error row,
and nothing that exists is lost or overwritten."""

from __future__ import annotations

import csv
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hostile
import pytest
import torch

from lungxray.cli import main
from lungxray.speed.bench import _scratch_bundle

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["--set", "data.image_size=32", "--set", "train.epochs=1", "--set", "train.threads=1", "--device", "cpu"]


def _one_line(rc: int, capsys: pytest.CaptureFixture[str], pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "error:" in ln or "Traceback" in ln]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--config", str(SMOKE), "--data", str(data), "--out", str(out), *FAST, *extra])


def test_config_values_out_of_range_are_refused(tiny_dataset: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    _one_line(_train(tiny_dataset, out, "--set", "train.lr=.inf"), capsys, r"train\.lr: expected a finite number")
    _one_line(_train(tiny_dataset, out, "--set", "train.lr=.nan"), capsys, r"train\.lr: expected a finite number")
    _one_line(_train(tiny_dataset, out, "--set", "data.image_size=100000"), capsys,
              r"data\.image_size must be in \[32, 2048\]")
    _one_line(_train(tiny_dataset, out, "--set", "ensemble.members=100000"), capsys, r"ensemble\.members must be in")
    _one_line(_train(tiny_dataset, out, "--set", "model.args.width=1000000000"), capsys,
              r"model\.args\.width: '1000000000' is not a number in \[-65536, 65536\]")
    assert not (out / "meta.json").exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tiny_dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["name: bomb", "model:", "  arch: compact_cnn", "  args:", '    a0: &a0 ["x", "x", "x", "x", "x", "x"]']
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 6)}]" for i in range(1, 30)]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    rc = main(["train", "--config", str(config), "--data", str(tiny_dataset), "--out", str(tmp_path / "r")])
    _one_line(rc, capsys, r"bomb\.yaml: more than 64 YAML aliases .* alias bomb")
    assert time.perf_counter() - start < 10


def test_a_run_name_never_escapes_the_runs_folder(tiny_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    (victim / "members").mkdir(parents=True)
    (victim / ".keep.tmp").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for name in (str(victim), "../victim", "a/b", ".hidden"):
        rc = main(["train", "--config", str(SMOKE), "--data", str(tiny_dataset), "--set", f"name={name}", *FAST])
        _one_line(rc, capsys, r"name: .* is not a plain folder name")
    assert (victim / "members").is_dir() and (victim / ".keep.tmp").read_text() == "mine"


def test_training_that_diverges_stops_with_one_line(tiny_dataset: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    train = importlib.import_module("lungxray.training.loop")
    real = train.train_one_epoch

    def poisoned(model: torch.nn.Module, *args: object, **kwargs: object) -> dict[str, float]:
        out = real(model, *args, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return {**out, "train_loss": float("nan")}

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    out = tmp_path / "r"
    _one_line(_train(tiny_dataset, out), capsys, r"training diverged in epoch 1: the training loss is nan")
    assert not (out / "meta.json").exists() and not (out / "model.safetensors").exists()
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(train.TrainingDiverged, match=r"weight weight holds NaN or infinite"):
        train.check_finite(0.5, model, 3)


def test_train_out_protects_a_finished_bundle_and_a_run_in_progress(tiny_dataset: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert _train(tiny_dataset, out) == 0
    capsys.readouterr()
    weights = (out / "model.safetensors").read_bytes()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    _one_line(_train(tiny_dataset, out), capsys, r"holds a finished bundle; choose another --out, or pass --force")
    assert (out / "model.safetensors").read_bytes() == weights and not (out / ".lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        _one_line(_train(tiny_dataset, out, "--force"), capsys, rf"is in use by another training \(pid {sleeper.pid}\)")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (out / "model.safetensors").read_bytes() == weights
    # the lock of a process that died (kill -9) is recognised and taken over; --force replaces the bundle
    assert _train(tiny_dataset, out, "--force", "--set", "seed=1") == 0
    assert (out / "model.safetensors").read_bytes() != weights and not (out / ".lock").exists()
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line(_train(tiny_dataset, other, "--force"), capsys, r"is not empty and is not a lungxray run folder")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scratch_bundle(tmp_path_factory.mktemp("hostile_cli") / "b", "compact_cnn", 1, 32)


def _predict(bundle: Path, *paths: Path | str) -> tuple[int, list[dict[str, str]], str]:
    """`lungxray predict` in a subprocess with a deadline: a hang (FIFO, /dev/zero) fails the test, not CI."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "lungxray", "predict", str(bundle), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, env=env)
    return proc.returncode, list(csv.DictReader(io.StringIO(proc.stdout))), proc.stderr


def test_predict_reads_only_regular_files(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.png"
    good.write_bytes(hostile.good_png(64))
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a link to a folder above: not followed, no loop
    (folder / "notes.txt").write_text("not an image, left out as before")
    os.mkfifo(tmp_path / "direct.fifo")
    rc, rows, err = _predict(bundle, folder, good, tmp_path / "direct.fifo", "/dev/zero")
    assert rc == 0, err
    by_path = {Path(r["path"]).name: r for r in rows}
    assert [Path(r["path"]).name for r in rows].count("good.png") == 1  # given directly and inside the folder
    assert by_path["good.png"]["error"] == "" and by_path["good.png"]["label"]
    assert "not a regular file (a FIFO)" in by_path["pipe.png"]["error"]
    assert "No such file" in by_path["dangling.png"]["error"]
    assert "Too many levels of symbolic links" in by_path["loop"]["error"]
    assert "not a regular file (a FIFO)" in by_path["direct.fifo"]["error"]
    assert "not a regular file (a character device)" in by_path["zero"]["error"]
    assert "notes.txt" not in by_path and "up" not in by_path
    assert len(rows) == 6


def test_predict_of_only_bad_files_exits_non_zero(bundle: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.png")
    rc, rows, _ = _predict(bundle, tmp_path / "p.png")
    assert rc == 1 and len(rows) == 1 and rows[0]["error"]


def test_the_kernel_cache_refuses_libraries_it_cannot_trust(tmp_path: Path) -> None:
    from lungxray.models.kernels import loader

    folder = tmp_path / "kernels"
    folder.mkdir()
    os.chmod(folder, 0o777)
    loader.trusted_folder(folder)  # our own folder: its group/other write bit is removed, not trusted as is
    assert folder.stat().st_mode & 0o022 == 0
    lib = folder / "seed_stem-x.so"
    lib.write_bytes(b"\x7fELF")
    os.chmod(lib, 0o775)
    with pytest.raises(RuntimeError, match="writable by other users"):
        loader.trusted(lib)
    os.chmod(lib, 0o755)
    assert loader.trusted(lib) == lib
    link = folder / "seed_stem-y.so"
    link.symlink_to(lib)
    with pytest.raises(RuntimeError, match="not a regular file"):
        loader.trusted(link)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(lib, 12345, 12345)
        with pytest.raises(RuntimeError, match=r"belongs to another user \(uid 12345\)"):
            loader.trusted(lib)
        os.chown(folder, 12345, 12345)
        with pytest.raises(RuntimeError, match="belongs to another user"):
            loader.trusted_folder(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_an_interrupted_run_is_protected_but_a_run_that_never_trained_is_not(tmp_path: Path) -> None:
    from lungxray.training.runlock import RunFolderError, check_new_run

    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("name: r\n")
    (out / "run.json").write_text('{"complete": false}')
    check_new_run(out)  # stopped on a data error before its first epoch: nothing to lose
    (out / "members" / "0").mkdir(parents=True)
    (out / "members" / "0" / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=r"holds an interrupted run; continue it with --resume"):
        check_new_run(out)
    check_new_run(out, force=True)

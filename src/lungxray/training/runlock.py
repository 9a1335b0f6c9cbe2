"""Protect what exists: one training per run folder, and never over a finished bundle without `--force`.

Why: two trainings into one `--out` used to overwrite each other's checkpoints and bundle without a word, and
`train --out` on a finished reference bundle replaced it. A run now holds `RUN_DIR/.lock` (its pid and host) for
its whole life; a second run into the same folder is refused while that process lives, and a lock left by a
crashed (killed) process is recognised by its dead pid and taken over. A new run (not `--resume`) is also refused
in a folder that holds a finished bundle or an interrupted run (a checkpoint) unless `force=True`, and always in a
non-empty folder that is not a lungxray run at all (the end of a run deletes `members/`, `ranks/` and stale `.*.tmp`
files, which must never be someone else's).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK = ".lock"
RUN_INFO = "run.json"  # the data root and whether the run finished, so `--resume RUN_DIR` needs nothing else
RUN_FILES = ("config.yaml", "run.json", "meta.json", "checkpoint.safetensors")


class RunFolderError(ValueError):
    """The run folder is in use or holds something a new run must not overwrite (one line, names the folder)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock file, or None when it cannot be read (then it is treated as stale)."""
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None


def _held_by_other(lock: Path) -> int | None:
    owner = _owner(lock)
    if owner is None:
        return None
    pid, host = owner
    if host and host != socket.gethostname():
        return pid  # another machine's process (a shared file system): cannot tell, so assume it runs
    return pid if pid != os.getpid() and _alive(pid) else None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """What train_run recorded in RUN_DIR/run.json ({} for runs without one, or an unreadable one).

    It lives here, beside the lock, because both the run-folder guard and the pipeline read it; in pipeline it made
    runlock import pipeline back (a cycle). `lungxray.training.pipeline.read_run_info` stays importable (re-exported).
    """
    try:
        info = json.loads((Path(run_dir) / RUN_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def check_new_run(run_dir: Path, force: bool = False) -> None:
    """Refuse to start a new run in `run_dir` when that would overwrite something (see the module docstring)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} exists and is not a folder")
    entries = [p.name for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return
    if not any(name in entries for name in RUN_FILES):
        raise RunFolderError(f"{run_dir} is not empty and is not a lungxray run folder; choose an empty or new --out")
    if force:
        log.warning("%s: --force: replacing what it holds", run_dir)
        return
    if (run_dir / "meta.json").is_file() or read_run_info(run_dir).get("complete"):
        raise RunFolderError(f"{run_dir} holds a finished bundle; choose another --out, or pass --force to replace it")
    if _has_progress(run_dir):
        raise RunFolderError(f"{run_dir} holds an interrupted run; continue it with --resume {run_dir}, or pass "
                             "--force to start it over")
    # only config.yaml / run.json of a run that stopped before its first epoch (a data error): nothing to lose


def _has_progress(run_dir: Path) -> bool:
    """A checkpoint of the run itself, of a sequential member (members/) or of a rank (ranks/)."""
    if (run_dir / "checkpoint.safetensors").is_file():
        return True
    return any(next((run_dir / sub).rglob("*.safetensors"), None) is not None for sub in ("members", "ranks")
               if (run_dir / sub).is_dir())


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold RUN_DIR/.lock for the block; RunFolderError when a live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = _held_by_other(lock)
            if pid is not None:
                raise RunFolderError(f"{run_dir} is in use by another training (pid {pid}); wait for it to end or "
                                     "choose another --out") from None
            log.info("%s: removing the lock of a process that no longer runs", run_dir)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES):
                raise RunFolderError(f"{run_dir}: cannot write into it ({exc.strerror})") from exc
            raise
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    else:
        raise RunFolderError(f"{run_dir}: could not take its lock (another training starting at the same time?)")
    try:
        yield lock
    finally:
        if _owner(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)

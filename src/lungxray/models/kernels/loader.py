"""Build the C kernels at first use and load them with ctypes: one place for the compiler call, the cache and the
checks on what gets loaded.

Each kernel file in csrc/ is compiled with the system gcc (`-O3 -march=native -fopenmp`) into
`$LUNGXRAY_CACHE/kernels` (default ~/.cache/lungxray/kernels), named by a hash of source, flags, compiler and CPU,
so a change to any of them builds a new library and a network home shared by different CPUs never loads code built
for another. The OpenMP runtime is the one PyTorch already loaded (same soname), so the kernels share its threads.
A library is loaded only from a folder this user owns and no one else can write; where building or loading fails
(no gcc, not x86-64, an instruction set the file needs is missing) the caller gets the reason and keeps PyTorch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungxray.hostinfo import cache_root

log = logging.getLogger(__name__)

__all__ = ["FLAGS", "Built", "LazyLibrary", "build", "declare_all", "load_library", "trusted", "trusted_folder"]

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class Built:
    """A loaded kernel library, or why there is none."""

    lib: ctypes.CDLL | None
    path: str | None = None
    compile_s: float | None = None  # None: found in the cache
    reason: str | None = None


def load_library(source: Path, declare: Callable[[ctypes.CDLL], None]) -> Built:
    """Build (or find in the cache) and load `source`; `declare` gives the functions their ctypes signatures."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Built(None, reason=f"CPU is {platform.machine()}, not x86-64")
    cc = os.environ.get("CC") or shutil.which("gcc")
    if cc is None:
        return Built(None, reason="no gcc on PATH")
    try:
        path, compile_s = build(cc, source)
        lib = ctypes.CDLL(str(path))
        declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return Built(None, reason=f"could not build/load {source.name}: {e}")
    return Built(lib, str(path), compile_s)


def declare_all(signatures: Mapping[str, tuple[type, ...]]) -> Callable[[ctypes.CDLL], None]:
    """A `declare` for `load_library`: each named function gets these ctypes argument types and returns its status,
    which `_check_status` turns into an exception."""

    def declare(lib: ctypes.CDLL) -> None:
        for name, params in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype, fn.errcheck = list(params), ctypes.c_int, _check_status

    return declare


def _check_status(status: int, fn: Any, _args: tuple[Any, ...]) -> int:
    """Every kernel returns 0 when done; -1 when it could not allocate its work space (its output is then not
    written: a silent return would hand the caller uninitialised memory as a result); another value for arguments
    it does not take."""
    if status == -1:
        raise MemoryError(f"{fn.__name__}: could not allocate its work space")
    if status:
        raise RuntimeError(f"{fn.__name__} refused its arguments (status {status})")
    return status


class LazyLibrary:
    """One kernel file's library, built and loaded at its first use in the process and kept; None where it is
    unavailable (the reason is logged once, at info level: every caller has a PyTorch path to fall back on)."""

    def __init__(self, source: Path, signatures: Mapping[str, tuple[type, ...]], fallback: str) -> None:
        self.source, self.signatures, self.fallback = source, signatures, fallback
        self.built: Built | None = None
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        with self._lock:
            if self.built is None:
                self.built = load_library(self.source, declare_all(self.signatures))
                if self.built.reason:
                    log.info("%s unavailable (%s); %s", self.source.name, self.built.reason, self.fallback)
        return self.built.lib

    def loaded(self) -> ctypes.CDLL:
        """The library, for code that runs only after its `use_*` check said yes (which built it)."""
        lib = self.get()
        if lib is None:
            raise RuntimeError(f"{self.source.name} is unavailable; check its use_* function first")
        return lib


def _cpu_id() -> str:
    """The CPU's model and feature flags: -march=native code built on one machine may not run on another that
    shares the cache directory (a network home)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # pragma: no cover - non-Linux
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(next((ln for ln in lines if ln.startswith(w)), "") for w in wanted)


def build(cc: str, source: Path) -> tuple[Path, float | None]:
    """Compile (or find in the cache) the shared library; its path and the compile time (None: cached)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    ident = "\0".join([*FLAGS, version, _cpu_id()]).encode()
    key = hashlib.sha256(source.read_bytes() + ident).hexdigest()[:16]
    out = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    trusted_folder(out.parent)
    if out.exists():
        return trusted(out), None
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        compile_s = time.perf_counter() - t0
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a concurrent process sees either no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, compile_s


def trusted_folder(folder: Path) -> None:
    """Refuse a kernel folder another account owns or can write into (it could plant a library we would load)."""
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"{folder} belongs to another user (uid {info.st_uid}); not loading code from it")
    if info.st_mode & 0o022:
        os.chmod(folder, info.st_mode & ~0o022)  # our own folder, made group/other-writable by a loose umask
    for parent in folder.parents:  # a folder above that others can write could be swapped for another
        pinfo = parent.stat()
        if pinfo.st_mode & 0o002 and not pinfo.st_mode & 0o1000:  # world-writable without the sticky bit
            raise RuntimeError(f"{parent} is writable by every user; not loading code from below it")


def trusted(path: Path) -> Path:
    """A cached library is loaded only when this user owns it and no one else can write it."""
    info = path.lstat()
    if not path.is_file() or path.is_symlink():
        raise RuntimeError(f"{path} is not a regular file; not loading it")
    if info.st_uid != os.getuid():
        raise RuntimeError(f"{path} belongs to another user (uid {info.st_uid}); not loading it")
    if info.st_mode & 0o022:
        raise RuntimeError(f"{path} is writable by other users; not loading it")
    return path

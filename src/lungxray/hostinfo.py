"""Facts about the host that several stages need: the cache folder and the number of usable CPU cores.

A leaf module with no torch import, so the CLI, the data loader and the web service can ask without paying torch's
start-up cost; written once here so every stage agrees (it was copied in seven places before).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LUNGXRAY_CACHE`, else ~/.cache/lungxray: the parent of the kernel, autotune and decoded-image caches."""
    return Path(os.environ.get("LUNGXRAY_CACHE") or Path.home() / ".cache" / "lungxray")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1

"""How OpenMP threads wait for work: spin on a free CPU, sleep on a shared one. Decided before torch loads.

Why it matters (docs/performance.md, "OpenMP wait policy"): between two parallel regions libgomp's threads
either spin for a while (its default) or sleep at once (`OMP_WAIT_POLICY=PASSIVE`). Measured on the 2-core
development VM, `lungxray bench train --arch seed_cnn`, alternating runs:
- idle machine: spinning, median 219 img/s over 10 runs (9 of them 201-231); sleeping, median 144 and bimodal
  (110-236: a sleeping vCPU is woken through the hypervisor, and a step has dozens of parallel regions);
- another training job running: sleeping 100-116 img/s; spinning 28-30 img/s (the spinning thread holds the
  core the working one needs); batch-1 inference under load was 300 ms against 18 ms.
Neither fixed setting is right, so each `lungxray` command that computes looks at the CPU for a fifth of a second
before torch is imported: if other processes use less than half a core, the threads spin; otherwise they
sleep. A long job keeps its choice (libgomp reads it once), which is why the server always sleeps and why the
choice is logged. `OMP_WAIT_POLICY` set in the environment is always obeyed.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["busy_cpus", "choose_wait_policy", "wait_policy"]

IDLE_BELOW = 0.5  # CPUs busy with other work below which spinning pays


def busy_cpus(interval: float = 0.2, stat: str = "/proc/stat") -> float | None:
    """CPUs' worth of work (user, system, interrupts, steal) done during `interval` seconds; None if unknown."""

    def sample() -> tuple[int, int] | None:
        try:
            with open(stat) as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already inside user time

    first = sample()
    time.sleep(interval)
    second = sample()
    if first is None or second is None or second[1] <= first[1]:
        return None
    ncpu = os.cpu_count() or 1
    return ncpu * (second[0] - first[0]) / (second[1] - first[1])


def choose_wait_policy(command: str, environ: dict[str, str] | None = None) -> str:
    """Set OMP_WAIT_POLICY for this process (unless the user did) and say what was chosen and why.

    "serve" always sleeps: a server lives for days next to other work, and its latency under load is what counts.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY'] or '(empty: libgomp default)'} from the environment"
    if "torch" in sys.modules:  # too late to matter: libgomp has read its settings
        return "OpenMP already loaded; wait policy unchanged"
    busy = None if command == "serve" else busy_cpus()
    if busy is not None and busy < IDLE_BELOW:
        return f"CPU idle ({busy:.2f} CPUs busy): OpenMP threads spin while waiting (OMP_WAIT_POLICY=PASSIVE to stop)"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    why = "server" if command == "serve" else "load unknown" if busy is None else f"{busy:.2f} CPUs busy"
    return f"OpenMP threads sleep while waiting ({why}); OMP_WAIT_POLICY=ACTIVE to spin"


def wait_policy() -> str:
    """This process's setting as the logs and benchmarks report it."""
    return os.environ.get("OMP_WAIT_POLICY") or "libgomp default (spin, then sleep)"

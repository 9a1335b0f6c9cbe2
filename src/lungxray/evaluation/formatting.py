"""How a proportion and its ci are written everywhere (terminal, reports, the API's HTML): one format.

Pure Python, so the light modules (the API, the CLI, the audit) can use it without matplotlib or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ci", "pct"]


def pct(x: float | None) -> str:
    """0.925 -> "92.5%"; None (not measured) -> "n/a"."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ci(iv: Mapping[str, Any] | None) -> str:
    """{"value", "low", "high"} -> "92.4% (83.5%–96.7%)"; "n/a" when absent."""
    if not iv or iv.get("value") is None:
        return "n/a"
    return f"{pct(iv['value'])} ({pct(iv['low'])}–{pct(iv['high'])})"

"""A trained model as a folder: model.safetensors + meta.json + config.yaml. Loading never unpickles code.

meta.json carries the input contract (size, normalisation, preprocessing), the class list, the architecture and
its arguments, the calibration (temperature, referral threshold) and the metrics, so predict, export and serve
need nothing but the folder.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lungxray.files import atomic_write, write_json, write_text
from lungxray.models import build_model

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
CONFIG = "config.yaml"


class BundleError(ValueError):
    """A folder that is not a loadable lungxray model (missing files, other format version)."""


@dataclass
class Bundle:
    model: nn.Module
    meta: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def members(self) -> int:
        return int(self.meta["members"])


def git_commit() -> str | None:
    """The commit of the source tree the package runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_bundle(run_dir: Path, model: nn.Module, meta: dict[str, Any], config_yaml: str | None = None) -> Path:
    """Write weights, meta and config atomically; meta last, so a folder with meta.json is complete."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    if config_yaml is not None:
        write_text(run_dir / CONFIG, config_yaml)
    write_json(run_dir / META, {"format_version": FORMAT_VERSION, **meta})
    return run_dir


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / META).is_file():
        raise BundleError(f"{run_dir} is not a lungxray model folder (no {META}; did training finish?)")
    try:
        meta = json.loads((run_dir / META).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{run_dir / META} is not valid JSON: {exc.msg}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{run_dir} has bundle format version {version}, this lungxray reads version {FORMAT_VERSION}"
        )
    return meta


def update_meta(run_dir: Path, **changes: Any) -> dict[str, Any]:
    meta = read_meta(run_dir)
    meta.update(changes)
    write_json(run_dir / META, meta)
    return meta


def load_bundle(run_dir: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the architecture from meta.json and load the weights (safetensors only)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if not (run_dir / WEIGHTS).is_file():
        raise BundleError(f"{run_dir} has no {WEIGHTS}")
    try:
        model = build_model(
            meta["arch"], num_classes=len(meta["classes"]), in_channels=1, members=meta["members"],
            **meta["arch_args"],
        )
        model.load_state_dict(load_file(str(run_dir / WEIGHTS), device=str(device)))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{run_dir}: weights do not match the architecture in {META} ({first})") from exc
    model.to(device).eval()
    return Bundle(model=model, meta=meta, path=run_dir)

"""A trained model as a folder: model.safetensors + meta.json + config.yaml. Loading never unpickles code.

meta.json carries the input contract (size, normalisation, preprocessing), the class list, the architecture and
its arguments, the calibration (temperature, referral threshold) and the metrics, so predict, export and serve
need nothing but the folder. Loading validates all of it first (lungxray.bundlemeta: schema, digests of meta.json
and of every weights file) and fails in one line naming the file and the field: a damaged, truncated, replaced or
hand-edited bundle is refused rather than giving wrong answers.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lungxray.inference.bundlemeta import BundleMeta, MetaError, file_digest, sealed, validate_meta, verify_digests
from lungxray.io.files import atomic_write, write_json, write_text
from lungxray.models.nets import build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
CONFIG = "config.yaml"


class BundleError(ValueError):
    """A folder that is not a loadable lungxray model (missing files, other format version)."""


@dataclass
class Bundle:
    model: nn.Module
    meta: dict[str, Any]  # the validated meta.json as read (plain dict, for the readers that index it)
    path: Path
    info: BundleMeta | None = None  # the same, typed (lungxray.bundlemeta); None for bundles built in memory

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


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its digest."""
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return file_digest(path)


def save_bundle(run_dir: Path, model: nn.Module, meta: dict[str, Any], config_yaml: str | None = None,
                extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write weights, meta and config atomically; meta last, so a folder with meta.json is complete.

    `extra_files` are further tensor files of the bundle ({"features.safetensors": tensors}); every tensor file's
    digest goes into meta["digests"] and is verified at load, like meta.json's own. Tensor files already in the
    folder (written just before, other than the training checkpoint) are covered too."""
    try:  # never write a bundle that load_bundle would refuse
        validate_meta(json.loads(json.dumps({"format_version": FORMAT_VERSION, **meta}, default=str)), FORMAT_VERSION)
    except MetaError as exc:
        raise BundleError(f"{run_dir}: not writing a bundle with an invalid meta.json ({exc})") from None
    state = model.state_dict()
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise BundleError(f"{run_dir}: not writing a bundle whose weight {bad} holds NaN or infinite values")
    run_dir.mkdir(parents=True, exist_ok=True)
    digests = {WEIGHTS: _write_tensors(run_dir / WEIGHTS, state)}
    for name, tensors in (extra_files or {}).items():
        digests[_bundle_file_name(name)] = _write_tensors(run_dir / name, tensors)
    for path in sorted(run_dir.glob("*.safetensors")):  # tensor files written just before (features.safetensors)
        if path.name not in digests and path.name != "checkpoint.safetensors" and path.is_file():
            digests[path.name] = file_digest(path)
    if config_yaml is not None:
        write_text(run_dir / CONFIG, config_yaml)
    write_json(run_dir / META, sealed({"format_version": FORMAT_VERSION, **meta, "digests": digests}))
    return run_dir


def _bundle_file_name(name: str) -> str:
    if Path(name).name != name or name.startswith(".") or name in (META, CONFIG):
        raise ValueError(f"{name!r} is not a plain file name for a bundle file")
    return name


def write_bundle_file(run_dir: str | Path, name: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, **meta_changes: Any) -> Path:
    """Add or replace one tensor file of a finished bundle (e.g. features.safetensors) and record its digest
    (and any `meta_changes`, e.g. ood={...}) in meta.json, which is re-sealed. Returns the file's path."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    digest = _write_tensors(run_dir / _bundle_file_name(name), tensors, metadata)
    meta.update(meta_changes)
    meta["digests"] = {**(meta.get("digests") or {}), name: digest}
    write_json(run_dir / META, sealed(meta))
    return run_dir / name


def seal_bundle(run_dir: str | Path) -> dict[str, Any]:
    """Record the digests of a bundle written before bundles carried them (its files as they are now)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    digests = dict(meta.get("digests") or {})
    for path in sorted(run_dir.glob("*.safetensors")):
        digests[path.name] = file_digest(path)
    meta["digests"] = digests
    write_json(run_dir / META, sealed(meta))
    return read_meta(run_dir)


MAX_META_BYTES = 16 * 1024 * 1024


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """meta.json, validated (schema and its own digest); BundleError in one line naming the file and field."""
    return _read_meta(Path(run_dir))[0]


def read_info(run_dir: str | Path) -> BundleMeta:
    """The typed meta.json of a bundle (lungxray.inference.bundlemeta.BundleMeta), validated like `read_meta`."""
    return _read_meta(Path(run_dir))[1]


def _read_meta(run_dir: Path) -> tuple[dict[str, Any], BundleMeta]:
    path = run_dir / META
    if not run_dir.exists():
        raise BundleError(f"{run_dir} does not exist, so it is not a lungxray model folder (a model is the run "
                          "folder that `lungxray train --out` wrote)")
    if not run_dir.is_dir():
        raise BundleError(f"{run_dir} is a file, not a lungxray model folder (a model is the run folder that "
                          "`lungxray train --out` wrote)")
    if not path.is_file():
        raise BundleError(f"{run_dir} is not a lungxray model folder (no {META}; did training finish?)")
    if path.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, more than a meta.json can be")
    try:
        meta = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc.msg}") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON: {type(exc).__name__}") from exc
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{run_dir} has bundle format version {meta.get('format_version')}, this lungxray reads version "
            f"{FORMAT_VERSION}"
        )
    try:
        info = validate_meta(meta, FORMAT_VERSION)
    except MetaError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if info.digests:
        own = verify_digests(run_dir, meta, {k: v for k, v in info.digests.items() if k == META})
        if own:
            raise BundleError(f"{run_dir}/{own[0]}")
    return meta, info


def update_meta(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Change meta.json fields and re-seal its digest (the one sanctioned way to edit a bundle's meta)."""
    meta = read_meta(run_dir)
    meta.update(changes)
    meta = sealed(meta) if meta.get("digests") else meta
    write_json(run_dir / META, meta)
    return meta


def load_bundle(run_dir: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the architecture from meta.json and load the weights (safetensors only)."""
    run_dir = Path(run_dir)
    meta, info = _read_meta(run_dir)
    if not (run_dir / WEIGHTS).is_file():
        raise BundleError(f"{run_dir} has no {WEIGHTS}")
    verify_files(run_dir, meta, info)
    try:
        model = build_model(info.arch, num_classes=len(info.classes), in_channels=1, members=info.members,
                            **info.arch_args)
    except (KeyError, TypeError, ValueError, RuntimeError, MemoryError) as exc:
        raise BundleError(f"{run_dir / META}: arch_args: cannot build {info.arch} ({_first_line(exc)})") from exc
    try:
        state = load_file(str(run_dir / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise BundleError(f"{run_dir / WEIGHTS}: not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{run_dir}: weights do not match the architecture in {META} ({_first_line(exc)})") from exc
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise BundleError(f"{run_dir / WEIGHTS}: tensor {bad} holds NaN or infinite values")
    model.to(device).eval()
    return Bundle(model=model, meta=meta, path=run_dir, info=info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_warned: set[str] = set()


def verify_files(run_dir: Path, meta: dict[str, Any], info: BundleMeta) -> None:
    """Every tensor file listed in meta.json matches its digest; bundles without digests only get a warning."""
    if not info.digests:
        if str(run_dir) not in _warned:
            _warned.add(str(run_dir))
            log.warning("%s: meta.json has no digests (written by an older lungxray): its files cannot be checked "
                        "for damage; lungxray.inference.bundle.seal_bundle(RUN) records them", run_dir)
        return
    problems = verify_digests(run_dir, meta, info.digests)
    if problems:
        raise BundleError(f"{run_dir}/{problems[0]}")
    unlisted = sorted(p.name for p in run_dir.glob("*.safetensors") if p.name not in info.digests)
    if unlisted and str(run_dir) not in _warned:
        _warned.add(str(run_dir))
        log.warning("%s: %s not covered by meta.json's digests (write it with bundle.write_bundle_file)",
                    run_dir, ", ".join(unlisted))

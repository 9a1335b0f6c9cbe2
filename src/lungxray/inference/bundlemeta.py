"""The schema of a bundle's meta.json in one place, and its integrity digests.

Why: meta.json drives everything a bundle does (input size, normalisation, class order, temperature, referral), so
a hand-edited or damaged file must be refused before use, in one line naming the file and the field, never with a
traceback or, worse, silently wrong answers (a temperature of NaN or 0, classes reordered, std 0). `validate_meta`
checks every field the package reads, its type and its range, and returns the typed `BundleMeta`; unknown extra
keys (other sections, e.g. `ood`) are kept and accepted.

Integrity: `meta["digests"]` maps each weights-like file of the bundle (model.safetensors, features.safetensors,
...) to `sha256:<hex>` of its bytes, plus `meta.json` itself: the digest of the canonical JSON of meta without
that one entry. A flipped byte in the weights or an edit of meta.json (reordered classes) is then refused at load.
Bundles written before digests existed load with a warning (nothing to verify against).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungxray.io.files import finite_json, jsonable

META_DIGEST_KEY = "meta.json"
MAX_IMAGE_SIZE = 2048  # model input side; beyond it one decoded image alone is gigabytes of activations
MAX_MEMBERS = 256
MAX_ARCH_NUMBER = 65536  # widths, depths, sizes: a bigger one would allocate gigabytes while building the model


class MetaError(ValueError):
    """One field of meta.json is missing, of the wrong type or out of range (the message names it)."""


@dataclass(frozen=True)
class InputContract:
    """How an image becomes the model's input (meta.json `input`)."""

    size: int
    channels: int
    mean: float
    std: float
    standardize: str = "none"
    crop_border: float = 0.0


@dataclass(frozen=True)
class BundleMeta:
    """The typed, validated meta.json; `extra` holds the keys this schema does not know (kept, never refused)."""

    format_version: int
    name: str
    classes: tuple[str, ...]
    arch: str
    arch_args: dict[str, Any]
    members: int
    input: InputContract
    temperature: float = 1.0
    refer_threshold: float | None = None
    bootstrap: bool = False
    seed: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _get(meta: dict[str, Any], key: str, kinds: type | tuple[type, ...], what: str, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise MetaError(f"{key}: missing")
        return default
    value = meta[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise MetaError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise MetaError(f"{key}: expected {what}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(meta: dict[str, Any], key: str, lo: float, hi: float, default: Any = ..., *, open_lo: bool = False
            ) -> Any:
    value = _get(meta, key, (int, float), "a number", default)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (open_lo and value == lo):
        span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise MetaError(f"{key}: {value!r} is not a finite number in {span}")
    return value


def _integer(meta: dict[str, Any], key: str, lo: int, hi: int, default: Any = ...) -> int:
    value = _get(meta, key, int, "an integer", default)
    if not lo <= value <= hi:
        raise MetaError(f"{key}: {value} is not in [{lo}, {hi}]")
    return int(value)


def _contract(raw: Any) -> InputContract:
    from lungxray.transforms.preprocess import STANDARDIZE_METHODS

    if not isinstance(raw, dict):
        raise MetaError(f"input: expected an object, got {type(raw).__name__}")
    try:
        standardize = _get(raw, "standardize", str, "a string", "none")
        if standardize not in STANDARDIZE_METHODS:
            raise MetaError(f"standardize: {standardize!r} is not one of {', '.join(STANDARDIZE_METHODS)}")
        return InputContract(
            size=_integer(raw, "size", 16, MAX_IMAGE_SIZE),
            channels=_integer(raw, "channels", 1, 1, 1),
            mean=_number(raw, "mean", -10.0, 10.0),
            std=_number(raw, "std", 0.0, 10.0, open_lo=True),
            standardize=standardize,
            crop_border=_number(raw, "crop_border", 0.0, 0.45, 0.0),
        )
    except MetaError as exc:
        raise MetaError(f"input.{exc}") from None


def _classes(meta: dict[str, Any]) -> tuple[str, ...]:
    classes = _get(meta, "classes", list, "a list of class names")
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise MetaError(f"classes: expected at least two non-empty names, got {_short(classes)}")
    if len(set(classes)) != len(classes):
        raise MetaError(f"classes: names repeat in {_short(classes)}")
    return tuple(classes)


def _digests(meta: dict[str, Any]) -> dict[str, str]:
    digests = _get(meta, "digests", dict, "an object of file digests", {})
    for name, value in digests.items():
        if not (isinstance(value, str) and value.startswith("sha256:") and len(value) == 71):
            raise MetaError(f"digests.{name}: expected 'sha256:<64 hex digits>', got {_short(value)}")
        if name != META_DIGEST_KEY and (Path(name).name != name or name.startswith(".")):
            raise MetaError(f"digests: {name!r} is not a file name inside the bundle")
    return dict(digests)


KNOWN = ("format_version", "name", "classes", "arch", "arch_args", "members", "input", "temperature",
         "refer_threshold", "bootstrap", "seed", "digests")


def validate_meta(meta: Any, format_version: int) -> BundleMeta:
    """Every field the package reads, with its type and range; raises MetaError naming the field."""
    from lungxray.models.nets import list_models

    if not isinstance(meta, dict):
        raise MetaError(f"the top level must be an object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != format_version:
        raise MetaError(f"format_version: bundle format version {version}, this lungxray reads version "
                        f"{format_version}")
    arch = _get(meta, "arch", str, "an architecture name")
    if arch not in list_models():
        raise MetaError(f"arch: {arch!r} is not a known architecture ({', '.join(list_models())})")
    arch_args = _get(meta, "arch_args", dict, "an object", {})
    for key, value in arch_args.items():
        if not isinstance(key, str):
            raise MetaError("arch_args: keys must be strings")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > MAX_ARCH_NUMBER:
            raise MetaError(f"arch_args.{key}: {_short(value)} is not a number in [-{MAX_ARCH_NUMBER}, "
                            f"{MAX_ARCH_NUMBER}] (or a string, true/false, null)")
    return BundleMeta(
        format_version=int(version), name=str(_get(meta, "name", str, "a string", "")), classes=_classes(meta),
        arch=arch, arch_args=dict(arch_args), members=_integer(meta, "members", 1, MAX_MEMBERS),
        input=_contract(_get(meta, "input", dict, "an object")),
        temperature=_number(meta, "temperature", 0.0, 1e6, 1.0, open_lo=True),
        refer_threshold=_number(meta, "refer_threshold", 0.0, 1.0, None),
        bootstrap=bool(_get(meta, "bootstrap", bool, "true or false", False)),
        seed=int(_get(meta, "seed", int, "an integer", 0)), digests=_digests(meta),
        extra={k: v for k, v in meta.items() if k not in KNOWN},
    )


# ------------------------------------------------------------------------------------------------- digests


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """The digest of meta's canonical JSON, leaving out its own entry in `digests`."""
    body = dict(meta)
    digests = {k: v for k, v in (body.get("digests") or {}).items() if k != META_DIGEST_KEY}
    body["digests"] = digests
    text = json.dumps(finite_json(body), sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with its own digest refreshed (call after every change, just before writing it)."""
    out = json.loads(json.dumps(meta, default=jsonable))  # the values exactly as they will read back
    digests = dict(out.get("digests") or {})
    digests.pop(META_DIGEST_KEY, None)
    out["digests"] = digests
    out["digests"][META_DIGEST_KEY] = meta_digest(out)
    return out


def verify_digests(run_dir: Path, meta: dict[str, Any], digests: dict[str, str]) -> list[str]:
    """Check meta's own digest and every listed file's; returns the problems as `file: what` lines."""
    problems = []
    own = digests.get(META_DIGEST_KEY)
    if own is None:
        problems.append(f"{META_DIGEST_KEY}: digests has no entry for meta.json itself")
    elif own != meta_digest(meta):
        problems.append(f"{META_DIGEST_KEY}: content does not match its digest (edited or damaged after it was "
                        "written; re-save it with lungxray.inference.bundle.update_meta)")
    for name, expected in digests.items():
        if name == META_DIGEST_KEY:
            continue
        path = run_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing (meta.json lists its digest)")
        elif file_digest(path) != expected:
            problems.append(f"{name}: content does not match the digest in meta.json (damaged or replaced)")
    return problems

"""Typed run configuration: YAML in, frozen dataclasses, resolved YAML out.

One config describes a whole run (data, model, augmentation, training, ensemble, calibration). Unknown keys and
wrong types are refused with a one-line error naming the key, so a typo never silently falls back to a default.
Numbers must be finite and within a range (`.inf` for a learning rate, an image size of 100000), the run name is
one plain folder name (it becomes runs/<name>, so it can never point elsewhere), and YAML aliases are bounded
(`safe_yaml`: a "billion laughs" document is refused instead of expanding without end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lungxray.transforms.params import AugmentParams, resolve_params, resolve_photometric


class ConfigError(ValueError):
    """A configuration problem, reported in one line that names the offending key."""


MAX_ALIASES = 64  # YAML alias uses per document; real configs use none or a few
MAX_YAML_BYTES = 1024 * 1024
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents using more than MAX_ALIASES aliases (exponential expansion)."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases (*name): refused as an alias bomb")
        return super().compose_node(parent, index)


def safe_yaml(text: str, where: str = "config") -> Any:
    """yaml.safe_load with bounded size and alias use; ConfigError (one line) for anything malformed."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, more than a configuration can be")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc.__class__.__name__})") from exc
    finally:
        loader.dispose()


def check_run_name(name: str, what: str = "name") -> str:
    """A run name is one plain folder name: letters, digits, '.', '_', '-'; never a path, never hidden."""
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{what}: {name!r} is not a plain folder name (letters, digits, '.', '_', '-', at most 100; "
                          "use --out for another folder)")
    return name


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 256
    val_fraction: float = 0.2  # carved from train/ (stratified, seeded) when no ensemble bootstrap gives OOB images
    # per-image standardisation against source shift: none, equalize, clahe, lungs (crop to the lung field),
    # lungs+equalize, lungs+clahe (preprocess.STANDARDIZE_METHODS)
    standardize: Literal["none", "equalize", "clahe", "lungs", "lungs+equalize", "lungs+clahe"] = "none"
    crop_border: float = 0.0  # fraction cut from each edge before resizing (hides borders/markers)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "seed_cnn"
    args: dict[str, Any] = field(default_factory=dict)  # passed to the registry factory (dropout, batch_norm, width)


@dataclass(frozen=True)
class AugmentConfig:
    """Keras ImageDataGenerator parameters: a named preset, optionally overridden field by field."""

    preset: str = "seed"
    rotation_range: float | None = None
    width_shift_range: float | None = None
    height_shift_range: float | None = None
    shear_range: float | None = None
    zoom_range: float | None = None
    horizontal_flip: bool | None = None
    erase_prob: float | None = None  # random erasing (augment.py), 0 in every preset
    photometric: str = "none"  # preset of photometric.PRESETS (none, light, curves, strong), after the geometry

    def params(self, preset: str | None = None) -> AugmentParams:
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(AugmentParams)
            if getattr(self, f.name, None) is not None
        }
        return resolve_params(preset or self.preset, **overrides)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW); ignored by adam/sgd
    l2: float = 0.0  # coupled L2: l2 * sum(w^2) added to the loss, as a Keras kernel_regularizer does
    class_weights: bool = False  # weight the loss by inverse class frequency of each member's sample
    label_smoothing: float = 0.0
    mixup: float = 0.0  # > 0: mix pairs of each member's images and targets, weight ~ Beta(mixup, mixup); 0 = off
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    plateau_patience: int = 4  # epochs without improvement before acting on a plateau
    plateau_action: Literal["lr", "batch", "batch_then_lr", "none"] = "lr"
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    batch_growth: int = 2  # batch size multiplier when the plateau action grows the batch
    max_batch_size: int = 128
    early_stopping_patience: int = 10  # 0 disables early stopping
    restore_best: bool = True  # end with each member's best-validation weights rather than the last epoch's
    ema_epochs: float = 0.0  # > 0: validate and keep an exponential moving average of the weights, time constant
    # in epochs (lungxray.averaging); 0 = the raw weights
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    threads: int = 0  # 0 = all cores
    prune_stopped: bool = True  # members that stopped early leave the packed network (train.py); false: computed on
    autotune: bool = True  # measure precision/layout/kernels/threads once per machine (autotune.py); false: as written


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = 1
    bootstrap: bool = False  # each member trains on its own bootstrap sample; out-of-bag images validate it
    stratified: bool = True  # bootstrap within each class so every sample keeps the class balance
    augment_preset: str | None = None  # preset for members (None = the augment section's preset)
    packed: bool = True  # train all members in one grouped network; False trains them one after another


@dataclass(frozen=True)
class CalibrationConfig:
    temperature: bool = True  # fit a softmax temperature on validation / out-of-bag predictions
    refer_coverage: float = 0.9  # refer the most uncertain (1 - coverage) fraction, threshold set on validation


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one value against a type annotation; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a programming error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1, cutoff=0.6)
        hint = f"did you mean {where}{close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} ({hint}known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in raw.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, _, value = text.partition("=")
    return key.strip().split("."), safe_yaml(value, f"override {key.strip()}")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `train.lr=0.01`-style overrides (or a {dotted_key: value} dict) to a raw config mapping."""
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [parse_override(o) for o in overrides]
    )
    for path, value in items:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return raw


def load_config(
    source: str | Path | dict[str, Any] | RunConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML file (or a mapping), apply overrides, validate every key and type."""
    if isinstance(source, RunConfig):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = dict(source)
    elif source is None:
        raw = {}
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = safe_yaml(path.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    config: RunConfig = _build(RunConfig, raw)
    _validate(config)
    return config


MAX_IMAGE_SIZE = 2048


def _validate(c: RunConfig) -> None:
    check_run_name(c.name)
    t = c.train
    checks = [
        (32 <= c.data.image_size <= MAX_IMAGE_SIZE, f"data.image_size must be in [32, {MAX_IMAGE_SIZE}]"),
        (0.0 <= c.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (0.0 <= c.data.crop_border < 0.4, "data.crop_border must be in [0, 0.4)"),
        (0 <= c.seed < 2**63, "seed must be in [0, 2**63)"),
        (1 <= t.epochs <= 100_000, "train.epochs must be in [1, 100000]"),
        (1 <= t.batch_size <= 65_536, "train.batch_size must be in [1, 65536]"),
        (0 < t.lr <= 10, "train.lr must be in (0, 10]"),
        (0 <= t.weight_decay <= 10, "train.weight_decay must be in [0, 10]"),
        (0 <= t.l2 <= 10, "train.l2 must be in [0, 10]"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (0 <= t.plateau_patience <= 100_000, "train.plateau_patience must be in [0, 100000]"),
        (0 < t.lr_factor <= 1, "train.lr_factor must be in (0, 1]"),
        (0 <= t.min_lr <= 10, "train.min_lr must be in [0, 10]"),
        (1 <= t.batch_growth <= 64, "train.batch_growth must be in [1, 64]"),
        (1 <= t.max_batch_size <= 65_536, "train.max_batch_size must be in [1, 65536]"),
        (0 <= t.early_stopping_patience <= 100_000, "train.early_stopping_patience must be in [0, 100000]"),
        (0 <= t.threads <= 4096, "train.threads must be in [0, 4096] (0 = all cores)"),
        (0 <= t.ema_epochs <= 10_000, "train.ema_epochs must be 0 (off) or positive, at most 10000"),
        (0 <= t.mixup <= 1000, "train.mixup must be 0 (off) or a positive Beta concentration (at most 1000)"),
        (1 <= c.ensemble.members <= 256, "ensemble.members must be in [1, 256]"),
        (0.0 < c.calibration.refer_coverage <= 1.0, "calibration.refer_coverage must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key, value in c.model.args.items():  # scalars only, and sizes that fit in memory (no alias-built trees)
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > 65536:
            raise ConfigError(f"model.args.{key}: {str(value)[:40]!r} is not a number in [-65536, 65536] (or a "
                              "string, true/false, null)")
    try:
        c.augment.params()
        if c.ensemble.augment_preset is not None:
            c.augment.params(c.ensemble.augment_preset)
        resolve_photometric(c.augment.photometric)
    except ValueError as exc:
        raise ConfigError(f"augment: {exc}") from exc

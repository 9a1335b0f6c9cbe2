"""Typed run configuration: YAML in, frozen dataclasses, resolved YAML out.

One config describes a whole run (data, model, augmentation, training, ensemble, calibration). Unknown keys and
wrong types are refused with a one-line error naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lungxray.augment import AugmentParams, resolve_params
from lungxray.photometric import resolve_photometric


class ConfigError(ValueError):
    """A configuration problem, reported in one line that names the offending key."""


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
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
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
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in raw.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, _, value = text.partition("=")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `train.lr=0.01`-style overrides (or a {dotted_key: value} dict) to a raw config mapping."""
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [_parse_override(o) for o in overrides]
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
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    config: RunConfig = _build(RunConfig, raw)
    _validate(config)
    return config


def _validate(c: RunConfig) -> None:
    checks = [
        (c.data.image_size >= 32, "data.image_size must be at least 32"),
        (0.0 <= c.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (0.0 <= c.data.crop_border < 0.4, "data.crop_border must be in [0, 0.4)"),
        (c.train.epochs >= 1, "train.epochs must be at least 1"),
        (c.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (c.train.lr > 0, "train.lr must be positive"),
        (c.train.ema_epochs >= 0, "train.ema_epochs must be 0 (off) or positive"),
        (c.train.mixup >= 0, "train.mixup must be 0 (off) or a positive Beta concentration"),
        (c.ensemble.members >= 1, "ensemble.members must be at least 1"),
        (0.0 < c.calibration.refer_coverage <= 1.0, "calibration.refer_coverage must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        c.augment.params()
        if c.ensemble.augment_preset is not None:
            c.augment.params(c.ensemble.augment_preset)
        resolve_photometric(c.augment.photometric)
    except ValueError as exc:
        raise ConfigError(f"augment: {exc}") from exc

from pathlib import Path

import pytest

from lungxray.config import ConfigError, RunConfig, load_config

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if p.name != "study.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(cfg.to_dict()) == cfg  # the resolved YAML round-trips


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config({}, ["train.epochs=7", "train.lr=1e-2", "model.args={dropout: 0.1}", "ensemble.packed=false"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01
    assert cfg.model.args == {"dropout": 0.1} and cfg.ensemble.packed is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, "unknown config key trian"),
        ({"train": {"epoch": 3}}, "unknown config key train.epoch"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer"),
        ({"train": {"channels_last": "yes"}}, "train.channels_last: expected true or false"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: 'rmsprop' is not one of"),
        ({"augment": {"preset": "wild"}}, "augment:"),
        ({"train": {"epochs": 0}}, r"train.epochs must be in \[1, 100000\]"),
    ],
)
def test_bad_configs_give_one_line_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(raw)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config({}, ["train.epochs"])


def test_augment_overrides_keep_preset_values() -> None:
    cfg = load_config({"augment": {"preset": "seed", "rotation_range": 33}})
    params = cfg.augment.params()
    assert params.rotation_range == 33
    assert params.zoom_range == load_config({}).augment.params().zoom_range

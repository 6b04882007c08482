"""Configuration: defaults, types, ranges, cross-checks — each error names the value and what is allowed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedsparse.config import SCHEMA, ConfigError, defaults, parse_overrides, resolve_config, round_lr

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_resolve() -> None:
    cfg = resolve_config({})
    assert cfg["dataset"] == "fashion-mnist" and cfg["strategy"] == "fedavg"


def test_pyproject_flwr_config_matches_schema() -> None:
    """`flwr run .` must accept exactly our keys with our defaults."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        flwr_cfg = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert flwr_cfg == defaults({"fedsparse"})  # the core's keys and the built-in methods' (not a plug-in's)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"dataset": "fmnist"}, "unknown dataset 'fmnist'"),
        ({"model": "resnet50"}, "choose one of: lenet5"),
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'"),
        ({"partition": "skewed"}, "choose one of: iid, dirichlet, pathological"),
        ({"learning-rate": 0.1}, "unknown configuration key 'learning-rate'"),
        ({"lr": -1.0}, "lr = -1.0 is out of range"),
        ({"alpha": 0.0}, "alpha = 0.0 is out of range"),
        ({"rounds": "ten"}, "rounds = 'ten' has the wrong type"),
        ({"client-gpus": 2.0}, "client-gpus = 2.0 is out of range"),
        ({"num-clients": 10, "clients-per-round": 11}, "exceeds num-clients = 10"),
        ({"partition": "pathological", "classes-per-client": 11}, "classes-per-client = 11 is out of range"),
        ({"local-epochs": 0, "local-steps": 0}, "leave clients no work"),
    ],
)
def test_bad_values_are_named(override: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        resolve_config({}, override)
    assert fragment in str(err.value)


def test_close_key_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'num-clients'"):
        resolve_config({"num-client": 5})


def test_set_overrides_parse_like_toml() -> None:
    assert parse_overrides(["lr=0.1", "strategy=fedprox", "rounds=3", "wire-bytes=false"]) == {
        "lr": 0.1,
        "strategy": "fedprox",
        "rounds": 3,
        "wire-bytes": False,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_int_given_for_float_is_accepted() -> None:
    assert resolve_config({"lr": 1})["lr"] == 1.0


def test_lr_decays_per_round() -> None:
    cfg = resolve_config({"lr": 0.1, "lr-decay": 0.5})
    assert round_lr(cfg, 1) == 0.1 and round_lr(cfg, 3) == pytest.approx(0.025)


def test_file_must_be_flat(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="flat table"):
        resolve_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.toml")


def _float_keys() -> list[str]:
    defaults()  # every installed method's keys too
    return [name for name, key in SCHEMA.items() if key.kind is float]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_refuses_non_finite_values(value: float) -> None:
    """NaN passes every `<` / `>` bound silently (lr = nan ran to the end with every reply rejected),
    so each float key refuses it by name, before anything starts."""
    keys = _float_keys()
    assert {"lr", "momentum", "alpha", "client-cpus", "round-timeout", "reply-max-abs"} <= set(keys)
    for name in keys:
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(name)} = .* is not a finite number; allowed: a finite float"
        ):
            resolve_config({}, {name: value})


def test_nan_from_the_command_line_and_toml_is_refused(tmp_path: Path) -> None:
    """`--set lr=nan` and `lr = nan` in a file parse to a float NaN (TOML's spelling) and are refused."""
    with pytest.raises(ConfigError, match="lr = nan is not a finite number"):
        resolve_config({}, parse_overrides(["lr=nan"]))
    path = tmp_path / "c.toml"
    path.write_text("alpha = nan\n")
    with pytest.raises(ConfigError, match="alpha = nan is not a finite number"):
        resolve_config(path)

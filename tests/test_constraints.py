"""constraints.txt pins every requirement of pyproject.toml, at a version the requirement admits."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins with ==, found {line!r}"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_every_requirement_is_pinned_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = _pins()
    assert "fedsparse" not in pins, "constraints.txt must not pin the project itself"
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a requirement but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {req}"


def test_the_runs_record_the_pinned_versions() -> None:
    """What fedsparse.environment records is what the constraints pin (in an environment made by make)."""
    from fedsparse.environment import describe

    env, pins = describe({}), _pins()
    for name in ("flwr", "torch", "numpy", "ray"):
        assert env[name] == pins[name], (name, env[name], pins[name])


def test_config_toml_records_the_environment_and_stays_a_plain_config() -> None:
    """config.toml starts with what the run ran on, as comments: a resume still reads the config."""
    from fedsparse.config import resolve_config
    from fedsparse.results import config_text

    cfg = resolve_config({})
    text = config_text(cfg)
    assert tomllib.loads(text) == cfg
    for key in ("flwr", "torch", "numpy", "ray", "python", "torch_threads", "device", "git_commit"):
        assert f"# {key}: " in text, key

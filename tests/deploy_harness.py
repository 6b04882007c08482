"""A real Flower deployment on 127.0.0.1 for tests and local trials: :class:`LocalDeployment`.

It starts a ``flower-superlink`` and N ``flower-supernode`` processes (free ports from the OS, a
private ``FLWR_HOME``, runtime dependency installation and telemetry off), submits runs with
``flwr run``, waits for them with ``flwr ls`` and stops every process it started — and their
children — when it is closed, even after a failure. tests/test_deployment.py uses it; it is also
the quickest way to try a strategy outside the simulation engine::

    import sys; sys.path.insert(0, "tests")          # from the repository root (pytest does this itself)
    from deploy_harness import PROJECT_DIR, LocalDeployment
    with LocalDeployment(workdir, 2) as dep:
        dep.run(PROJECT_DIR, {...})

It is test tooling, not part of the installed package: a real deployment starts its SuperLink and
SuperNodes itself (docs/deployment.md). The package keeps only what ``fedsparse traffic`` needs
(:mod:`fedsparse.traffic`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proctree import ManagedProcess, processes_with_env, spawn, stop_tree

from fedsparse.traffic import FLOWER_ENV, DeploymentError, flower_bin_dir, flwr_json, superlink_run

#: The repository root: a Flower app directory (pyproject.toml with [tool.flwr.app]).
PROJECT_DIR = Path(__file__).resolve().parents[1]
#: Log line a SuperNode prints once it is registered with the SuperLink.
_SUPERNODE_READY = "SuperNode ID:"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """A run-config value as TOML (``flwr run --run-config`` parses TOML values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``k1=v1 k2="v2"`` for ``flwr run --run-config``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


def data_env() -> dict[str, str]:
    """``{"FEDSPARSE_DATA": root}`` for processes started with an ``XDG_CACHE_HOME`` of their own.

    The user cache (``$XDG_CACHE_HOME/fedsparse/data``, where ``fedsparse data fetch`` writes) is
    found through ``XDG_CACHE_HOME``; a process whose cache is re-pointed (a test session, the
    SuperLink and SuperNodes of :class:`LocalDeployment`) no longer sees it. Call this *before*
    re-pointing: it returns ``FEDSPARSE_DATA`` as set, else the user-cache data root if a dataset
    is located there, else nothing (Debian's ``/usr/share/datasets`` does not depend on the cache).
    """
    from fedsparse.data.paths import DATASETS, ENV_VAR, DatasetNotFoundError, locate, user_data_dir

    if os.environ.get(ENV_VAR):
        return {ENV_VAR: os.environ[ENV_VAR]}
    root = user_data_dir()
    for name in DATASETS:
        try:
            folder = locate(name)
        except DatasetNotFoundError:
            continue
        if folder.is_relative_to(root):
            return {ENV_VAR: str(root)}
    return {}


# --- TLS ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS deployment: the CA that signed the SuperLink's certificate, the
    certificate (its SANs name every address clients use) and its private key."""

    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only from the first byte: the file is created
    with mode 0600 (never world-readable, not even between a write and a chmod), and an existing
    file — or a link planted at that name — is refused rather than overwritten or followed."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def self_signed_tls(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A throw-away CA and a SuperLink certificate for ``hosts`` (IP addresses or DNS names).

    For trying TLS locally and for tests; a real deployment uses certificates from its own CA.
    The SuperLink's own SuperExec connects to the SuperLink's address too, so that address must
    be among ``hosts``. ``directory`` must not hold a ``server.key`` already.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fedsparse test CA"))
        .issuer_name(name("fedsparse test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Python >= 3.13 verifies strictly (VERIFY_X509_STRICT): it wants both key identifiers
        # (and keyUsage on the CA)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    _write_private(  # first: a directory that already holds a key is refused before anything is written
        files.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


# --- the deployment -------------------------------------------------------------------------------
@dataclass
class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1, for as long as it is open.

    SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"``, which is what
    fedsparse's ClientApp reads. ``env`` is added to every process's environment (e.g.
    ``FEDSPARSE_DATA``); Flower's own settings (:data:`FLOWER_ENV`, ``FLWR_HOME``) come on top.
    With ``tls`` every connection is TLS (SuperLink ``--ssl-*``, SuperNodes and the ``flwr`` CLI
    verify it with the CA); without it, plain HTTP on loopback (``--insecure``).
    """

    workdir: Path
    num_supernodes: int = 2
    env: Mapping[str, str] = field(default_factory=dict)
    connection: str = "fedsparse-local"
    startup_timeout: float = 90.0
    tls: TLSFiles | None = None
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    superlink_port: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if self.num_supernodes < 1:
            raise ValueError(f"num_supernodes = {self.num_supernodes}; a deployment needs at least 1")

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def process_env(self) -> dict[str, str]:
        """The environment of every process of this deployment (and of its ``flwr`` calls)."""
        env = {**os.environ, **self.env, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home)}
        # The SuperLink and SuperNodes start `flower-superexec` by name.
        env["PATH"] = f"{flower_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self) -> LocalDeployment:
        """Start the SuperLink, write the connection into FLWR_HOME, start the SuperNodes."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.superlink_port = free_port()
        if self.tls is None:
            server_tls, client_tls, cli_tls = ["--insecure"], ["--insecure"], "insecure = true"
        else:
            server_tls = [
                "--ssl-ca-certfile",
                str(self.tls.ca),
                "--ssl-certfile",
                str(self.tls.cert),
                "--ssl-keyfile",
                str(self.tls.key),
            ]
            client_tls = ["--root-certificates", str(self.tls.ca)]
            cli_tls = f"root-certificates = {json.dumps(str(self.tls.ca))}"
        self._spawn(
            "superlink",
            [
                "flower-superlink",
                *server_tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self._wait_for_port(self.superlink_port, self.processes[0])
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f'[superlink.{self.connection}]\naddress = "{self.address}"\n{cli_tls}\n'
        )
        for i in range(self.num_supernodes):
            self._spawn(
                f"supernode-{i}",
                [
                    "flower-supernode",
                    *client_tls,
                    "--superlink",
                    self.address,
                    "--node-config",
                    f"partition-id={i} num-partitions={self.num_supernodes}",
                    "--port",
                    str(free_port()),
                ],
            )
        for proc in self.processes[1:]:
            self._wait_for_log(proc, _SUPERNODE_READY)
        return self

    def stop(self, grace: float = 15.0) -> None:
        """Stop every process started here and everything they started (SIGTERM, then SIGKILL).

        The process tree is listed again while waiting, and every process that carries this
        deployment's ``FLWR_HOME`` is included even once its parent is gone.
        """
        if not self.processes:
            return
        # All at once, then wait: a SuperNode may take a few seconds (it finishes its poll).
        ordered = [proc.popen for proc in self.processes[1:] + self.processes[:1]]
        stop_tree(ordered, grace, extra=self.running)
        self.processes.clear()

    def running(self) -> list[int]:
        """A fresh listing of the live processes of this deployment: every process whose
        environment carries its ``FLWR_HOME`` (SuperLink, SuperNodes, SuperExecs, apps, and a
        ``flwr`` call in progress), whoever its parent is now."""
        return processes_with_env("FLWR_HOME", str(self.flwr_home))

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        log = self.workdir / "logs" / f"{name}.log"
        popen = spawn([str(flower_bin_dir() / argv[0]), *argv[1:]], log, self.process_env(), self.workdir)
        proc = ManagedProcess(name, popen, log)
        self.processes.append(proc)
        return proc

    def _wait_for_port(self, port: int, proc: ManagedProcess) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive(proc)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(
            f"{proc.name} did not listen on port {port} in {self.startup_timeout:.0f} s:\n{proc.tail()}"
        )

    def _wait_for_log(self, proc: ManagedProcess, text: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive(proc)
            if text in proc.tail(1 << 20):
                return
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name} did not print {text!r} in {self.startup_timeout:.0f} s:\n{proc.tail()}")

    @staticmethod
    def _check_alive(proc: ManagedProcess) -> None:
        if proc.popen.poll() is not None:
            raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")

    # --- runs ----------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME."""
        return subprocess.run(
            [str(flower_bin_dir() / "flwr"), *args],
            env=self.process_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP_DIR CONNECTION --run-config ...``; returns the run id."""
        done = self.flwr(
            "run",
            str(app_dir),
            self.connection,
            "--format",
            "json",
            "--run-config",
            run_config_arg(run_config),
            timeout=300.0,
        )
        reply = flwr_json(done.stdout)
        if done.returncode != 0 or not reply.get("success"):
            raise DeploymentError(f"flwr run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's record from ``flwr ls --run-id`` (status, elapsed, network-traffic, ...)."""
        return superlink_run(self.connection, run_id, env=self.process_env())

    def wait(self, run_id: int, timeout: float = 600.0, poll: float = 2.0) -> dict[str, Any]:
        """Poll until the run has finished; raise (with the run's log) unless it completed."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.processes:
                self._check_alive(proc)
            record = self.status(run_id)
            if str(record.get("status", "")).startswith("finished"):
                break
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"run {run_id} still {record.get('status')} after {timeout:.0f} s:\n{self.logs(run_id)}"
                )
            time.sleep(poll)
        if record["status"] != "finished:completed":
            raise DeploymentError(
                f"run {run_id} ended {record['status']} ({record.get('status-details')}):\n{self.logs(run_id)}"
            )
        return record

    def run(self, app_dir: str | Path, run_config: Mapping[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Submit a run and wait for it; returns its final ``flwr ls`` record."""
        return self.wait(self.submit(app_dir, run_config), timeout=timeout)

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (for error messages)."""
        try:
            done = self.flwr("log", str(run_id), self.connection, "--show", timeout=60.0)
        except subprocess.TimeoutExpired:
            return "(flwr log timed out)"
        return (done.stdout + done.stderr)[-6000:]


__all__ = [
    "PROJECT_DIR",
    "DeploymentError",
    "LocalDeployment",
    "TLSFiles",
    "data_env",
    "free_port",
    "run_config_arg",
    "self_signed_tls",
]

"""Run fedsparse in a real Flower deployment, and read the SuperLink's traffic count for a run.

Two things live here:

* :class:`LocalDeployment` starts a ``flower-superlink`` and N ``flower-supernode`` processes on
  127.0.0.1 (free ports from the OS, a private ``FLWR_HOME``, runtime dependency installation and
  telemetry off), submits runs with ``flwr run``, waits for them with ``flwr ls`` and stops every
  process it started — and their children — when it is closed, even after a failure. The
  deployment test uses it; it is also the quickest way to try a strategy outside the simulation
  engine (``with LocalDeployment(workdir, 2) as dep: dep.run(".", {...})``).
* :func:`superlink_traffic` / :func:`traffic_report`: the SuperLink counts the bytes it sends to
  and receives from SuperNodes for each run (``flwr ls --format json`` → ``network-traffic``).
  ``fedsparse traffic RUN_ID --superlink NAME --out-dir DIR`` fetches that count after a run and
  sets it next to the per-message payload and wire bytes of the run's ``messages.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

#: Environment every Flower process we start gets: no `uv sync` of the app's dependencies per
#: run (the environment is already complete), no telemetry.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
#: The repository root: a Flower app directory (pyproject.toml with [tool.flwr.app]).
PROJECT_DIR = Path(__file__).resolve().parents[1]
#: Log line a SuperNode prints once it is registered with the SuperLink.
_SUPERNODE_READY = "SuperNode ID:"


class DeploymentError(RuntimeError):
    """A deployment process failed to start, a run failed, or a run did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_bin_dir() -> Path:
    """The directory holding ``flwr``, ``flower-superlink`` ... (this interpreter's scripts first)."""
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeploymentError("flower-superlink not found next to this Python nor on PATH; install flwr")
    return Path(found).parent


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


def self_signed_tls(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A throw-away CA and a SuperLink certificate for ``hosts`` (IP addresses or DNS names).

    For trying TLS locally and for tests; a real deployment uses certificates from its own CA.
    The SuperLink's own SuperExec connects to the SuperLink's address too, so that address must
    be among ``hosts``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("fedsparse test CA")).issuer_name(name("fedsparse test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
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
        x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Python >= 3.13 verifies strictly (VERIFY_X509_STRICT): it wants both key identifiers
        # (and keyUsage on the CA)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


# --- processes ------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    """ppid → pids of every process visible in /proc (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return children
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower detaches its SuperExec into a new session, so a
    process group does not reach it; the parent links do)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_pid(pid: int, sig: int) -> None:
    """``os.kill(pid, sig)``, ignoring a process that is already gone (or not ours)."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def processes_with_env(key: str, value: str) -> list[int]:
    """Every process visible in /proc whose environment holds ``KEY=VALUE`` (Linux; [] elsewhere).

    A fresh listing that does not depend on parent links: it still finds a process whose parent
    has exited (it is re-parented to init) as long as it inherited the environment.
    """
    wanted = f"{key}={value}".encode()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_tree(
    popens: Sequence[subprocess.Popen],
    grace: float = 15.0,
    extra: Callable[[], Iterable[int]] | None = None,
) -> list[int]:
    """Stop the processes ``popens`` and everything below them: SIGTERM, up to ``grace`` seconds
    to exit, then SIGKILL. Returns every pid that was signalled.

    The tree is listed again on every pass of the wait and before the SIGKILL, so a process
    started meanwhile (e.g. a SuperExec launching an app while it is being stopped) is caught too.
    ``extra`` adds pids from another listing (e.g. :func:`processes_with_env`) on every pass.
    """
    signalled: set[int] = set()

    def tree() -> set[int]:
        children = _children_map()
        todo = [p.pid for p in popens if p.poll() is None]  # a reaped pid may already be reused
        todo += [pid for pid in signalled if process_alive(pid)]
        if extra is not None:
            todo += list(extra())
        found: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def term_new() -> set[int]:
        current = tree()
        for pid in current - signalled:
            signal_pid(pid, signal.SIGTERM)
        signalled.update(current)
        return current

    current = term_new()
    deadline = time.monotonic() + grace
    while current and time.monotonic() < deadline:
        time.sleep(0.2)
        current = {pid for pid in term_new() if process_alive(pid)}
    for _ in range(3):  # a parent may fork between the listing and its SIGKILL: list again
        left = {pid for pid in tree() | signalled if process_alive(pid)}
        if not left:
            break
        signalled.update(left)
        for pid in left:
            signal_pid(pid, signal.SIGKILL)
        time.sleep(0.1)
    for popen in popens:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while time.monotonic() < deadline and any(process_alive(p) for p in signalled):
        time.sleep(0.05)
    return sorted(signalled)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent exits — even when the
    parent is killed and never runs its cleanup (e.g. a test run stopped by a timeout)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own, output to ``log``; on Linux it is also stopped
    when this process exits without stopping it."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


@dataclass
class ManagedProcess:
    """One process we started, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


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
    def __enter__(self) -> "LocalDeployment":
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
        env = {**os.environ, **self.env, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home)}
        # The SuperLink and SuperNodes start `flower-superexec` by name.
        env["PATH"] = f"{flower_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self) -> "LocalDeployment":
        """Start the SuperLink, write the connection into FLWR_HOME, start the SuperNodes."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.superlink_port = free_port()
        if self.tls is None:
            server_tls, client_tls, cli_tls = ["--insecure"], ["--insecure"], "insecure = true"
        else:
            server_tls = ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                          "--ssl-keyfile", str(self.tls.key)]
            client_tls = ["--root-certificates", str(self.tls.ca)]
            cli_tls = f"root-certificates = {json.dumps(str(self.tls.ca))}"
        self._spawn(
            "superlink",
            ["flower-superlink", *server_tls, "--host", "127.0.0.1", "--port", str(self.superlink_port),
             "--disable-runtime-dependency-installation"],
        )
        self._wait_for_port(self.superlink_port, self.processes[0])
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f'[superlink.{self.connection}]\naddress = "{self.address}"\n{cli_tls}\n'
        )
        for i in range(self.num_supernodes):
            self._spawn(
                f"supernode-{i}",
                ["flower-supernode", *client_tls, "--superlink", self.address,
                 "--node-config", f"partition-id={i} num-partitions={self.num_supernodes}",
                 "--port", str(free_port())],
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
        raise DeploymentError(f"{proc.name} did not listen on port {port} in {self.startup_timeout:.0f} s:\n{proc.tail()}")

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
            [str(flower_bin_dir() / "flwr"), *args], env=self.process_env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP_DIR CONNECTION --run-config ...``; returns the run id."""
        done = self.flwr("run", str(app_dir), self.connection, "--format", "json",
                         "--run-config", run_config_arg(run_config), timeout=300.0)
        reply = _json_in(done.stdout)
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
                raise DeploymentError(f"run {run_id} still {record.get('status')} after {timeout:.0f} s:\n{self.logs(run_id)}")
            time.sleep(poll)
        if record["status"] != "finished:completed":
            raise DeploymentError(f"run {run_id} ended {record['status']} ({record.get('status-details')}):\n{self.logs(run_id)}")
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


def _json_in(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output (ignoring any line before it)."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


# --- the SuperLink's traffic count ----------------------------------------------------------------
def superlink_run(connection: str, run_id: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``flwr ls CONNECTION --run-id RUN_ID --format json`` → that run's record."""
    env = {**os.environ, **FLOWER_ENV, **(env or {})}
    done = subprocess.run(
        [str(flower_bin_dir() / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    reply = _json_in(done.stdout)
    runs = reply.get("runs") or []
    if done.returncode != 0 or not reply.get("success") or not runs:
        raise DeploymentError(f"flwr ls {connection} --run-id {run_id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return dict(runs[0])


def traffic_report(out_dir: str | Path | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """The SuperLink's count for a run beside the ledger's payload and wire bytes.

    ``superlink_sent`` is what the SuperLink sent to SuperNodes (downlink), ``superlink_received``
    what it received from them (uplink); both cover every message of the run (the partition
    QUERY included) plus the Fleet API's request/response framing, and an object the SuperLink
    already holds is not received twice. Written to ``out_dir/superlink_traffic.json``.
    """
    traffic = record.get("network-traffic", {})
    report: dict[str, Any] = {
        "run_id": str(record.get("run-id", "")),
        "status": record.get("status"),
        "superlink_sent": int(traffic.get("outbound-bytes", 0)),
        "superlink_received": int(traffic.get("inbound-bytes", 0)),
        "superlink_total": int(traffic.get("total-bytes", 0)),
    }
    if out_dir is not None and (Path(out_dir) / "messages.csv").is_file():
        import pandas as pd

        msgs = pd.read_csv(Path(out_dir) / "messages.csv")
        for direction in ("down", "up"):
            rows = msgs[msgs["direction"] == direction]
            report[f"payload_{direction}"] = int(rows["payload_bytes"].sum())
            report[f"wire_{direction}"] = int(rows["wire_bytes"].fillna(0).sum())
        if report["wire_down"]:
            report["superlink_sent_over_wire_down"] = report["superlink_sent"] / report["wire_down"]
        if report["wire_up"]:
            report["superlink_received_over_wire_up"] = report["superlink_received"] / report["wire_up"]
        (Path(out_dir) / "superlink_traffic.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_traffic(report: Mapping[str, Any]) -> str:
    lines = [f"run {report['run_id']} ({report['status']})"]
    lines.append(f"  {'':10s} {'payload':>12s} {'wire':>12s} {'SuperLink':>12s}")
    for direction, sl in (("down", "superlink_sent"), ("up", "superlink_received")):
        payload = report.get(f"payload_{direction}")
        wire = report.get(f"wire_{direction}")
        cells = [f"{v:>12,}" if isinstance(v, int) else f"{'-':>12s}" for v in (payload, wire, report[sl])]
        lines.append(f"  {direction:10s} " + " ".join(cells))
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 (argparse's type)
    """Register ``fedsparse traffic`` on the main parser's subcommands."""
    traffic = subparsers.add_parser(
        "traffic", help="fetch the SuperLink's traffic count for a deployed run",
        description="Ask the SuperLink (flwr ls) how many bytes a run moved, and set it beside the "
        "payload and wire bytes of the run's messages.csv.",
    )
    traffic.add_argument("run_id", type=int, help="the run id printed by `flwr run`")
    traffic.add_argument("--superlink", default="", help="connection name in $FLWR_HOME/config.toml (default: the default one)")
    traffic.add_argument("--out-dir", type=Path, help="the run's out-dir (messages.csv; superlink_traffic.json is written there)")
    traffic.set_defaults(func=_cmd_traffic)


def _cmd_traffic(args: argparse.Namespace) -> int:
    connection = args.superlink or _default_connection()
    try:
        record = superlink_run(connection, args.run_id)
    except DeploymentError as err:
        print(f"fedsparse: error: {err}", file=sys.stderr)
        return 1
    print(format_traffic(traffic_report(args.out_dir, record)))
    return 0


def _default_connection() -> str:
    import tomllib

    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    try:
        return str(tomllib.loads((home / "config.toml").read_text())["superlink"]["default"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "local"


__all__ = [
    "LocalDeployment",
    "DeploymentError",
    "TLSFiles",
    "self_signed_tls",
    "FLOWER_ENV",
    "PROJECT_DIR",
    "free_port",
    "spawn",
    "stop_tree",
    "signal_pid",
    "processes_with_env",
    "data_env",
    "descendants",
    "process_alive",
    "superlink_run",
    "traffic_report",
    "format_traffic",
]

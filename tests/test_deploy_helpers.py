"""The deployment tooling without a Flower deployment: the test harness's run-config quoting,
process-tree cleanup, TLS files and data pinning (tests/deploy_harness.py, tests/proctree.py), and the
`fedsparse traffic` command with its report (fedsparse.traffic). (The real deployment is exercised
by tests/test_deployment.py, behind the `deployment` marker.)"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from deploy_harness import LocalDeployment, data_env, run_config_arg, self_signed_tls  # tests/ is on sys.path
from flwr.common.config import parse_config_args
from proctree import ManagedProcess, descendants, process_alive, processes_with_env, stop_tree

from fedsparse.cli import build_parser
from fedsparse.traffic import format_traffic, traffic_report

TESTS = Path(__file__).resolve().parent


def test_run_config_arg_round_trips_through_flower() -> None:
    run_config = {
        "strategy": "feddip",
        "rounds": 2,
        "lr": 0.05,
        "regrowth": False,
        "out-dir": "/tmp/a dir/with 'quotes'",
        "luar-lr-milestones": "100,150",
    }
    assert parse_config_args([run_config_arg(run_config)]) == run_config


def test_stop_ends_the_whole_process_tree(tmp_path: Path) -> None:
    """Flower's SuperExec runs in a session of its own; stop() must still reach it."""
    dep = LocalDeployment(tmp_path, 1)
    log = tmp_path / "tree.log"
    # a child that detaches a grandchild into a new session (like flower-superexec) and ignores SIGTERM
    script = "setsid sh -c 'trap \"\" TERM; sleep 300' & trap '' TERM; sleep 300"
    popen = subprocess.Popen(["sh", "-c", script], stdout=log.open("wb"), start_new_session=True)
    dep.processes.append(ManagedProcess("tree", popen, log))
    deadline = time.monotonic() + 10
    while len(descendants(popen.pid)) < 3 and time.monotonic() < deadline:  # sleep, setsid'd sh, its sleep
        time.sleep(0.05)
    tree = [popen.pid, *descendants(popen.pid)]
    assert len(tree) >= 3
    started = time.monotonic()
    dep.stop(grace=1.0)
    assert not [pid for pid in tree if process_alive(pid)]
    assert time.monotonic() - started < 10
    assert dep.processes == []


def test_traffic_report_sets_superlink_beside_ledger(tmp_path: Path) -> None:
    rows = [
        {"round": 1, "direction": "down", "partition_id": 0, "payload_bytes": 1000, "wire_bytes": 1100},
        {"round": 1, "direction": "down", "partition_id": 1, "payload_bytes": 1000, "wire_bytes": 1100},
        {"round": 1, "direction": "up", "partition_id": 0, "payload_bytes": 400, "wire_bytes": 500},
        {"round": 1, "direction": "up", "partition_id": 1, "payload_bytes": 300, "wire_bytes": 390},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "messages.csv", index=False)
    record = {
        "run-id": "42",
        "status": "finished:completed",
        "network-traffic": {"inbound-bytes": 880, "outbound-bytes": 2310, "total-bytes": 3190},
    }
    report = traffic_report(tmp_path, record)
    assert (report["payload_down"], report["wire_down"], report["payload_up"], report["wire_up"]) == (
        2000,
        2200,
        700,
        890,
    )
    assert report["superlink_sent_over_wire_down"] == pytest.approx(2310 / 2200)
    assert report["superlink_received_over_wire_up"] == pytest.approx(880 / 890)
    assert json.loads((tmp_path / "superlink_traffic.json").read_text()) == report
    text = format_traffic(report)
    assert "2,310" in text and "890" in text
    # without a run directory: the SuperLink's figures alone
    assert traffic_report(None, record)["superlink_total"] == 3190


def test_self_signed_tls_verifies(tmp_path: Path) -> None:
    from cryptography import x509

    files = self_signed_tls(tmp_path, ("127.0.0.1", "superlink.example.org"))
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert files.key.stat().st_mode & 0o777 == 0o600  # created so, never world-readable in between
    with pytest.raises(FileExistsError):  # an existing key (or a link at its name) is refused, not overwritten
        self_signed_tls(tmp_path)


def test_traffic_command_is_registered() -> None:
    args = build_parser().parse_args(["traffic", "123", "--superlink", "mylink", "--out-dir", "/tmp/x"])
    assert (args.run_id, args.superlink, args.out_dir) == (123, "mylink", Path("/tmp/x"))


def test_local_deployment_rejects_zero_supernodes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LocalDeployment(tmp_path, 0)


def test_spawned_process_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """A test run killed by a timeout never runs its finalizers: the SuperLink and SuperNodes it
    started must not outlive it."""
    import sys

    code = (
        f"import os, sys; sys.path.insert(0, {str(TESTS)!r}); from pathlib import Path; from proctree import spawn; "
        f"p = spawn(['sleep', '300'], Path({str(tmp_path / 'sleep.log')!r})); "
        "print(p.pid, flush=True); os._exit(0)"  # exits without stopping its child
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    orphan = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while process_alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(orphan)


def _wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout} s")


def test_stop_tree_catches_a_process_started_while_stopping(tmp_path: Path) -> None:
    """The tree is listed again on every pass: a parent that answers SIGTERM by starting a child
    that ignores SIGTERM in a session of its own (as a SuperExec launching an app) loses it too."""
    import sys

    late = tmp_path / "late.pid"
    code = (
        "import signal, subprocess, sys, time\n"
        "def on_term(*_):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'], start_new_session=True)\n"
        f"    open({str(late)!r}, 'w').write(str(child.pid))\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.1)\n"
    )
    popen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert popen.stdout is not None and popen.stdout.readline().strip() == "ready"
    signalled = stop_tree([popen], grace=2.0)
    child = int(_wait_for_file(late))
    assert child in signalled and popen.pid in signalled
    assert not process_alive(child) and not process_alive(popen.pid)


def test_stop_tree_reaches_orphans_through_the_extra_listing(tmp_path: Path) -> None:
    """A grandchild whose parent exited is re-parented away from the tree; processes_with_env still
    finds it by the environment it inherited, and stop_tree stops it."""
    import os
    import uuid

    mark = uuid.uuid4().hex
    pid_file = tmp_path / "orphan.pid"
    popen = subprocess.Popen(
        ["sh", "-c", f"sh -c 'trap \"\" TERM; sleep 300' & echo $! > {pid_file}; exit 0"],
        env={**os.environ, "FEDSPARSE_TEST_MARK": mark},
    )
    popen.wait(timeout=10)
    orphan = int(_wait_for_file(pid_file))
    assert process_alive(orphan) and orphan not in descendants(os.getpid())
    signalled = stop_tree([popen], grace=1.0, extra=lambda: processes_with_env("FEDSPARSE_TEST_MARK", mark))
    assert orphan in signalled and not process_alive(orphan)


def test_data_env_pins_the_data_root_a_recached_process_would_lose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsparse.data.paths import IDX_FILES, locate

    source = locate("mnist")  # the session's data (FEDSPARSE_DATA, pinned by conftest)
    monkeypatch.setenv("FEDSPARSE_DATA", "/some/data/root")
    assert data_env() == {"FEDSPARSE_DATA": "/some/data/root"}  # as set, untouched

    monkeypatch.delenv("FEDSPARSE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert data_env() == {}  # nothing in the user cache: nothing to pin

    cache = tmp_path / "cache"
    target = cache / "fedsparse" / "data" / "mnist"
    target.mkdir(parents=True)
    for name in IDX_FILES:
        found = [p for p in source.iterdir() if p.name.startswith(name)]
        assert found, f"{name} not in {source}"
        for p in found:
            (target / p.name).symlink_to(p.resolve())
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert data_env() == {"FEDSPARSE_DATA": str(cache / "fedsparse" / "data")}

"""Process trees for tests that start servers (Flower's SuperLink and SuperNodes, a Ray head):
start them so they cannot outlive the test, find everything below them, and stop all of it.

Why this is more than ``Popen.terminate()``: Flower's SuperExec and Ray's daemons detach into
sessions of their own, so a process group does not reach them; the parent links in ``/proc`` do,
and a process whose parent already exited is still found by the environment it inherited.
Linux only (elsewhere the listings are empty).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


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
    """Whether ``pid`` runs (a zombie does not: it only waits to be reaped)."""
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


def spawn(
    argv: list[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``argv`` in a session of its own, output to ``log``; on Linux it is also stopped
    when this process exits without stopping it."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


@dataclass
class ManagedProcess:
    """One process we started, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

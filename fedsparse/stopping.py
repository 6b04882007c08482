"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM: cleanly, within seconds, nothing half-written.

Flower's simulation runs the ServerApp (our round loop) in a thread and the engine in the main
thread. A signal used to kill the engine while the round loop went on: every later round waited
out ``round-timeout``, was recorded as all-failed and checkpointed, and a resume built on it.

Now the launcher (:func:`fedsparse.simulation.simulate`) installs :func:`handling_signals`: a signal
sets :data:`STOP` — which the round loop checks before each round and while it waits for replies —
records which signal it was, and interrupts the engine (ray.init replaces a SIGTERM handler with its own ``sys.exit(SIGTERM)``:
the launcher treats that exit as the same request). The loop abandons the round in flight
(never recorded, never checkpointed), checkpoints the last complete round when checkpoints are on,
and returns; the launcher shuts Ray down and raises :class:`RunInterrupted`, which the CLI turns
into exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

#: Set when a stop was requested; the round loop polls it.
STOP = threading.Event()
#: Set while a launcher handles signals (:func:`handling_signals`): only then does the metered grid
#: poll for replies itself, so that it can give up waiting on a stop.
WATCHING = threading.Event()
#: Set once the engine has answered a message in this run (Ray is up); see :class:`EngineTeardownFilter`.
ENGINE_ANSWERED = threading.Event()
_SIGNAL: list[int] = []


class EngineTeardownFilter(logging.Filter):
    """Drops Flower's ERROR records about messages in flight when Ray is shut down under them.

    On SIGTERM, Ray's own handler (``ray.init`` installs it in the main thread, over ours) exits the
    main thread; Flower's engine then shuts Ray down in its ``finally`` before our launcher hears of
    the stop, and every message still in flight is logged as an ERROR with a traceback ("the actor is
    dead because its owner has died"). Those are the stop's doing. ``ray.shutdown`` disconnects the
    driver before its actors die, so a record logged after the engine answered once and while Ray is
    no longer initialised is one of them. Errors before Ray is up (a failed start) pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not ENGINE_ANSWERED.is_set():
            return True
        import ray

        return bool(ray.is_initialized())


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after ``last_round`` complete rounds (resumable from ``out_dir``
    when it checkpoints)."""

    def __init__(self, signum: int, last_round: int, out_dir: str, checkpointed: bool) -> None:
        name = signal.Signals(signum).name
        how = (
            f"continue with: fedsparse run --resume {out_dir}"
            if checkpointed
            else "it kept no checkpoint (checkpoint-every = 0)"
        )
        super().__init__(f"stopped by {name} after round {last_round}; {how}")
        self.signum, self.last_round, self.out_dir, self.checkpointed = signum, last_round, out_dir, checkpointed

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class EngineFailed(RuntimeError):
    """Flower's simulation engine stopped under a running round loop (Ray could not place an actor,
    Ray died, ...). The round in flight was abandoned: never recorded, never checkpointed."""

    def __init__(self, cause: BaseException, last_round: int, out_dir: str, checkpointed: bool) -> None:
        root = cause
        while root.__cause__ is not None:  # Flower wraps the engine's error twice: name the first one
            root = root.__cause__
        how = (
            f"rounds up to {last_round} are checkpointed: fedsparse run --resume {out_dir}"
            if checkpointed
            else (
                f"{last_round} rounds were complete; the run kept no checkpoint"
                if last_round
                else "no round had completed"
            )
        )
        super().__init__(
            f"Flower's simulation engine stopped ({type(root).__name__}: {root}); "
            f"the round in flight was abandoned, not recorded; {how}"
        )
        self.last_round, self.out_dir, self.checkpointed = last_round, out_dir, checkpointed


def watching() -> bool:
    """Whether a launcher handles stop signals (the round loop's waits must be interruptible)."""
    return WATCHING.is_set()


def requested() -> bool:
    """Whether a stop was requested."""
    return STOP.is_set()


def signal_received() -> int | None:
    """The signal that requested the stop (None: none did)."""
    return _SIGNAL[-1] if _SIGNAL else None


def request(signum: int = signal.SIGINT) -> None:
    """Ask the round loop to stop (what the signal handler does, minus interrupting the engine)."""
    _SIGNAL.append(int(signum))
    STOP.set()
    # The engine going down logs a traceback for every message in flight; after a stop they are
    # expected, not news: only the stop's own one-line report is shown.
    logging.getLogger("flwr").setLevel(logging.CRITICAL)


def abandon() -> None:
    """Ask the round loop to stop without a signal: the engine under it died. The round in flight is
    abandoned (never recorded, never checkpointed), as on a signal."""
    STOP.set()


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM request a stop and interrupt the main thread once
    (Flower's engine loop runs there); outside it, the previous handlers are back. A no-op when not
    called from the main thread (signal handlers can only be set there)."""
    STOP.clear()
    _SIGNAL.clear()
    ENGINE_ANSWERED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    WATCHING.set()
    flower_log, teardown = logging.getLogger("flwr"), EngineTeardownFilter()
    flower_log.addFilter(teardown)

    def handle(signum: int, frame: FrameType | None) -> None:
        first = not STOP.is_set()
        request(signum)
        if first:
            raise KeyboardInterrupt  # unwinds Flower's engine loop in the main thread

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        flower_log.removeFilter(teardown)
        WATCHING.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = [
    "STOP",
    "WATCHING",
    "RunInterrupted",
    "handling_signals",
    "request",
    "requested",
    "signal_received",
    "watching",
]

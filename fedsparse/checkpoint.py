"""Checkpoints: everything a run needs to continue, bit for bit, after an interruption.

A run with ``checkpoint-every = N`` (N > 0) writes, in its output directory,

``checkpoint.npz``
    after every N-th round and after the last: the global arrays, the strategy's complete state
    (``strategy.state_dict()``; for Flower's own strategies their per-array optimiser state), the
    server process's RNG states (Python, NumPy, torch), the elapsed time, the resolved
    configuration, and how far into the message log it reaches (round and byte length).
    One file, written to a temporary name, fsync'ed and moved over the old one with ``os.replace``:
    a kill at any moment leaves either the previous checkpoint or the new one, never a torn file.

``checkpoint-log.jsonl``
    the history a resume needs, appended to: one JSON line per round with its rounds-table row, its
    metered messages (messages.csv) and its per-array bytes (layer_bytes.csv). A save appends the
    rounds since the last one — it costs O(new rounds), not O(rounds so far) as when the whole
    history went into every ``checkpoint.npz`` (about 33 MB per save at 1,000 rounds × 100
    clients) — after cutting off any tail that no checkpoint refers to (the save that wrote it died
    before its ``checkpoint.npz`` landed). A checkpoint reads only the bytes it refers to.

``checkpoint.prev.npz``
    the checkpoint before the newest (a hard link, no copy), kept as the fallback: when
    ``checkpoint.npz`` cannot be read (or refers to more log than there is), a resume uses the
    previous one and says so in a warning. The log is append-only, so the bytes it refers to are
    still there; the client-state files it needs are kept too (:func:`prune_client_states` is
    called with its round).

``client-state/p<partition>-r<round>.rd``
    each client's Flower ``context.state`` (LUAR's momentum buffers, partial-update's copy of the
    deployed model, top-k residuals, ...) as it was after the last round the client trained in.
    In the simulation engine that state lives in the launching process and dies with it, so the
    ClientApp mirrors it here after every successful train step (:func:`save_client_state`) and
    a fresh Context picks it up again on its first message (:func:`restore_client_state`). Files
    are versioned by round so that the state matching a checkpoint at round R is the newest file
    with a round <= R: on resume the server deletes the files of rounds after R (work of the
    interrupted rounds), and at every checkpoint it deletes files no resume can need any more.
    Clients mirror while ``checkpoint-every > 0`` and restore whenever the folder exists, so a run
    resumed with ``checkpoint-every = 0`` still gets its clients' state back.

Every file is written by :func:`atomic_write` (temporary file, fsync, ``os.replace``, directory
fsync), which the rest of fedsparse uses for its outputs too.

Sampling needs no saved state: every round's client draw is seeded from (seed, round)
(:func:`fedsparse.grid.seeded_sampling`), and clients seed their batches from (seed, round,
partition). The format is a NumPy ``.npz`` (no pickle) whose ``meta`` member is JSON; nested state
is encoded by :func:`pack_state` (numpy arrays, torch tensors, dicts with any keys, lists, tuples,
ints of any size, floats including NaN/inf, bools, strings, None, ArrayRecords).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedsparse.accounting import Ledger
from fedsparse.config import ConfigError
from fedsparse.hooks import MethodHooks

log = logging.getLogger("fedsparse")

FORMAT_VERSION = 2
#: format 1 kept the rounds table and the message log inline; it is still read
READABLE_FORMATS = (1, 2)
CHECKPOINT_FILE = "checkpoint.npz"
#: the checkpoint before the newest, the fallback when the newest cannot be read
PREVIOUS_FILE = "checkpoint.prev.npz"
#: the append-only log of rounds (table rows, messages, per-array bytes) the checkpoints refer to
LOG_FILE = "checkpoint-log.jsonl"
CLIENT_STATE_DIR = "client-state"
#: Marks a Context whose mirrored state has been looked up (so it is restored only once).
RESTORED_MARK = "fedsparse.client-state"
#: Flower strategies' per-array state (FedOpt family, FedAvgM), saved for strategies without state_dict().
FLOWER_STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
#: Keys a resumed run may change: where things run and how often to checkpoint, not what is computed.
OPERATIONAL_KEYS = (
    "out-dir",
    "data-dir",
    "client-cpus",
    "client-gpus",
    "round-timeout",
    "checkpoint-every",
    "max-in-flight",
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "pack_state",
    "unpack_state",
    "save_checkpoint",
    "load_checkpoint",
    "remove_checkpoints",
    "previous_round",
    "checkpoint_path",
    "previous_checkpoint_path",
    "log_path",
    "read_checkpoint_config",
    "config_conflicts",
    "resume_config",
    "strategy_state",
    "load_strategy_state",
    "snapshot_strategy",
    "restore_strategy",
    "atomic_write",
    "capture_rng",
    "restore_rng",
    "save_client_state",
    "restore_client_state",
    "client_state_dir",
    "prune_client_states",
    "drop_client_states_after",
    "clear_client_states",
]


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, or does not belong to this configuration."""


# ------------------------------------------------------------------------------------------------
# nested state <-> JSON + arrays
# ------------------------------------------------------------------------------------------------

_TAGS = ("__nd__", "__torch__", "__tuple__", "__map__", "__arrayrecord__", "__float__")


def pack_state(obj: Any) -> tuple[Any, list[np.ndarray]]:
    """Encode nested state as (JSON-able structure, arrays); :func:`unpack_state` inverts it exactly."""
    arrays: list[np.ndarray] = []

    def put(a: np.ndarray) -> int:
        arrays.append(np.ascontiguousarray(a))
        return len(arrays) - 1

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return x
        if isinstance(x, float):
            # JSON has no NaN/inf; keep them explicit (and exact) rather than relying on extensions
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if isinstance(x, np.ndarray):
            if x.dtype.kind == "O":
                raise TypeError(
                    f"state at {path or '<root>'} is an object array; allowed: numeric, bool or string arrays"
                )
            return {"__nd__": put(x)}
        if isinstance(x, torch.Tensor):
            return {"__torch__": put(x.detach().cpu().numpy())}
        if isinstance(x, ArrayRecord):
            return {"__arrayrecord__": [[k, put(a.numpy())] for k, a in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            keys = list(x.keys())
            if all(isinstance(k, str) for k in keys) and not any(k in _TAGS for k in keys):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"__map__": [[enc(k, f"{path}<key>"), enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if hasattr(x, "__iter__") and type(x).__name__ == "deque":
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        raise TypeError(
            f"state at {path or '<root>'} has type {type(x).__name__}; allowed: numpy arrays, torch tensors, "
            "ArrayRecords, dicts, lists, tuples, str, int, float, bool, None"
        )

    return enc(obj, ""), arrays


def unpack_state(obj: Any, arrays: list[np.ndarray]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, list):
        return [unpack_state(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__nd__":
            return np.array(arrays[value], copy=True)
        if tag == "__torch__":
            return torch.from_numpy(np.array(arrays[value], copy=True))
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(unpack_state(v, arrays) for v in value)
        if tag == "__map__":
            return {_hashable(unpack_state(k, arrays)): unpack_state(v, arrays) for k, v in value}
        if tag == "__arrayrecord__":
            return ArrayRecord({k: Array(np.array(arrays[i], copy=True)) for k, i in value})
    return {k: unpack_state(v, arrays) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# ------------------------------------------------------------------------------------------------
# strategy state and RNGs
# ------------------------------------------------------------------------------------------------


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's state: its ``state_dict()`` (a strategy with fedsparse's hooks), or Flower
    strategies' per-array attributes."""
    if isinstance(strategy, MethodHooks):
        return {"kind": "state_dict", "state": strategy.state_dict()}
    attrs = {n: getattr(strategy, n) for n in FLOWER_STATE_ATTRS if getattr(strategy, n, None) is not None}
    return {"kind": "attributes", "state": attrs}


def load_strategy_state(strategy: Any, saved: Mapping[str, Any]) -> None:
    """Put state saved by :func:`strategy_state` back into a freshly built strategy."""
    if saved["kind"] == "state_dict":
        if not isinstance(strategy, MethodHooks):
            raise CheckpointError(
                f"the checkpoint holds a state_dict() but strategy {type(strategy).__name__} has no load_state_dict()"
            )
        strategy.load_state_dict(saved["state"])
        return
    for name, value in dict(saved["state"]).items():
        setattr(strategy, name, value)


def snapshot_strategy(strategy: Any) -> dict[str, Any]:
    """An in-memory copy of the strategy as it is now, for :func:`restore_strategy` within a round.

    The round loop takes one before ``aggregate_train`` and rolls back to it when the aggregate
    comes out non-finite, then ends the round as one without valid replies
    (``aggregate_train(t, [])``). That needs the state of the round in flight too, which
    ``state_dict()`` leaves out on purpose (FedDIP's masked model sent this round, LUAR's x_t and
    R_t, partial-update's patches sent this round), so the snapshot is a deep copy of the
    strategy's attributes (nested strategies included). A strategy whose attributes cannot be
    copied gets its :func:`strategy_state` (what a checkpoint saves) instead: the rollback then
    restores the state between rounds only (``complete`` is False).
    """
    try:
        return {"complete": True, "attributes": copy.deepcopy(vars(strategy))}
    except Exception as err:  # noqa: BLE001 - e.g. a third-party strategy holding a lock or a socket
        log.warning(
            "%s cannot be deep-copied (%s); a rollback restores its state_dict() only", type(strategy).__name__, err
        )
        return {"complete": False, "state": pack_state(strategy_state(strategy))}


def restore_strategy(strategy: Any, snapshot: Mapping[str, Any]) -> bool:
    """Put ``strategy`` back as it was when :func:`snapshot_strategy` took ``snapshot``.

    The attributes come back from a copy of the snapshot (so it can be restored again); nested
    strategies (a wrapper's ``base``) are restored in place, so references to them stay valid.
    Returns whether the round in flight was restored too (see :func:`snapshot_strategy`).
    """
    if snapshot["complete"]:
        _restore_attributes(strategy, copy.deepcopy(dict(snapshot["attributes"])))
        return True
    load_strategy_state(strategy, unpack_state(*snapshot["state"]))
    return False


def _restore_attributes(obj: Any, saved: dict[str, Any]) -> None:
    current = vars(obj)
    for name in [n for n in current if n not in saved]:
        delattr(obj, name)
    for name, value in saved.items():
        now = current.get(name)
        nested = (
            now is not None
            and now is not obj
            and type(now) is type(value)
            and callable(getattr(now, "aggregate_train", None))
        )
        if nested and hasattr(now, "__dict__"):
            _restore_attributes(now, dict(vars(value)))
        else:
            setattr(obj, name, value)


def capture_rng() -> dict[str, Any]:
    """The server process's global RNG states (Python, NumPy, torch CPU)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().numpy().copy()}


def restore_rng(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))


# ------------------------------------------------------------------------------------------------
# the checkpoint file
# ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What the round loop needs to continue after ``server_round``."""

    server_round: int
    config: dict[str, Any]
    arrays: ArrayRecord
    strategy: dict[str, Any]
    rows: list[dict[str, Any]]
    ledger: Ledger
    rng: dict[str, Any] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    #: the file it was read from (``checkpoint.prev.npz`` when the newest was unreadable)
    source: str = CHECKPOINT_FILE


def _ledger_from(state: Mapping[str, Any]) -> Ledger:
    """The ledger a format-1 checkpoint kept inline."""
    keys = list(state["layer_keys"])
    layer: defaultdict[tuple[int, str, str], int] = defaultdict(int)
    for r, d, k, b in zip(state["layer_round"], state["layer_direction"], state["layer_key"], state["layer_bytes"]):
        layer[(int(r), str(d), keys[int(k)])] = int(b)
    return Ledger(rows=[dict(r) for r in state["rows"]], layer_bytes=layer)


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_FILE


def previous_checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / PREVIOUS_FILE


def log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOG_FILE


def _log_entries(ckpt: Checkpoint, after: int) -> list[bytes]:
    """One JSON line per round in (``after``, server_round]: its rounds-table row, its messages
    and its per-array bytes. Only the new rounds are looked at (rows are in round order)."""
    rounds = range(after + 1, ckpt.server_round + 1)
    if not rounds:
        return []
    messages: dict[int, list[dict]] = defaultdict(list)
    for row in reversed(ckpt.ledger.rows):
        if row["round"] <= after:
            break
        if row["round"] <= ckpt.server_round:
            messages[int(row["round"])].append(row)
    layers: dict[int, list[list[Any]]] = defaultdict(list)
    for (r, d, k), b in sorted(ckpt.ledger.layer_bytes.items()):
        if after < r <= ckpt.server_round:
            layers[int(r)].append([d, k, int(b)])
    table = {int(row["round"]): row for row in ckpt.rows[-len(rounds) :] if after < int(row["round"])}
    lines = []
    for r in rounds:
        entry = {"round": r, "row": table.get(r), "messages": messages[r][::-1], "layers": layers[r]}
        packed, arrays = pack_state(entry)
        if arrays:
            raise TypeError(f"round {r}'s rows hold arrays; the message log takes scalars only")
        lines.append(json.dumps(packed, allow_nan=False, separators=(",", ":")).encode() + b"\n")
    return lines


def _append_log(out_dir: Path, keep: int, lines: list[bytes]) -> int:
    """Cut the log back to its first ``keep`` bytes (what the checkpoint in use refers to: a tail
    written for a checkpoint that never landed is dropped), append ``lines``, fsync; the new size."""
    fd = os.open(log_path(out_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size < keep:  # _usable() checked the size: only a log cut while the run is going gets here
            raise OSError(f"{str(log_path(out_dir))!r} holds {size} bytes, the checkpoint in use refers to {keep}")
        if size > keep:
            os.ftruncate(fd, keep)
        os.lseek(fd, keep, os.SEEK_SET)
        for line in lines:
            os.write(fd, line)
        os.fsync(fd)
        return keep + sum(len(line) for line in lines)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Append the new rounds to the message log, keep the checkpoint in use as the previous one,
    and write the new ``checkpoint.npz`` atomically (temporary file, fsync, ``os.replace``).

    What a save writes is O(new rounds) for the log plus the state (model, strategy, RNG, config):
    never the whole history again."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    current = _usable(checkpoint_path(out_dir))
    if current is None and checkpoint_path(out_dir).exists():
        checkpoint_path(out_dir).unlink()  # unreadable: never promote it to the fallback
    in_use = current or _usable(previous_checkpoint_path(out_dir))
    after, keep = (int(in_use["log"]["round"]), int(in_use["log"]["bytes"])) if in_use else (0, 0)
    if after > ckpt.server_round:  # an older round than the log holds (a test rewriting history)
        after, keep = 0, 0
    size = _append_log(out_dir, keep, _log_entries(ckpt, after))
    meta_obj = {
        "format": FORMAT_VERSION,
        "server_round": int(ckpt.server_round),
        "config": dict(ckpt.config),
        "elapsed_seconds": float(ckpt.elapsed_seconds),
        "arrays": ckpt.arrays,
        "strategy": ckpt.strategy,
        "rng": ckpt.rng,
        "log": {"round": int(ckpt.server_round), "bytes": size},
    }
    packed, arrays = pack_state(meta_obj)
    meta = json.dumps(packed, allow_nan=False).encode()
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members["meta"] = np.frombuffer(meta, dtype=np.uint8)
    if current is not None:
        _keep_as_previous(out_dir)
    return atomic_write(checkpoint_path(out_dir), lambda fh: np.savez(fh, **members))  # type: ignore[arg-type]  # keys a0, a1, ..., meta never hit savez's allow_pickle


def _keep_as_previous(out_dir: Path) -> None:
    """checkpoint.prev.npz := checkpoint.npz, atomically, as a hard link (no copy) where the file
    system has them; the newest is then replaced, so a failed save still leaves both."""
    src, dst = checkpoint_path(out_dir), previous_checkpoint_path(out_dir)
    tmp = out_dir / f".{dst.stem}-link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(out_dir)


def previous_round(out_dir: str | Path) -> int | None:
    """The round of the fallback checkpoint (``checkpoint.prev.npz``), None without a usable one."""
    meta = _usable(previous_checkpoint_path(out_dir))
    return None if meta is None else int(meta["server_round"])


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` so that a crash at any moment leaves the old file or the new one, never a torn one.

    ``data``: the bytes, a str (UTF-8), or a function writing to the open binary file. It goes to a
    temporary file in the same directory, which is flushed, fsync'ed and moved over ``path`` with
    ``os.replace``; then the directory is fsync'ed so that the rename itself survives a power cut.
    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_file(path: Path) -> tuple[dict[str, Any], Any]:
    """(meta, open npz) of one checkpoint file; CheckpointError when it cannot be read."""
    try:
        npz = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(npz["meta"]).decode())
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {meta.get('format')!r}; this fedsparse reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    if "log" in meta:
        size = log_path(path.parent).stat().st_size if log_path(path.parent).is_file() else 0
        if size < int(meta["log"]["bytes"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r} refers to {meta['log']['bytes']} bytes of {LOG_FILE}, which holds {size}"
            )
    return meta, npz


def _usable(path: Path) -> dict[str, Any] | None:
    """The meta of a readable checkpoint file, else None."""
    if not path.is_file():
        return None
    try:
        meta, npz = _read_file(path)
    except CheckpointError:
        return None
    npz.close()
    return meta


def _candidates(out_dir: str | Path) -> list[Path]:
    """The checkpoint files a resume may use, newest first; CheckpointError when there is none."""
    found = [p for p in (checkpoint_path(out_dir), previous_checkpoint_path(out_dir)) if p.is_file()]
    if not found:
        raise CheckpointError(
            f"no checkpoint in {str(out_dir)!r} ({CHECKPOINT_FILE} is missing); resume needs a run started "
            "with checkpoint-every > 0 that completed at least one checkpoint"
        )
    return found


def _first_usable(out_dir: str | Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)`` of the newest checkpoint it succeeds on; a warning when that is not the newest."""
    failures: list[CheckpointError] = []
    for path in _candidates(out_dir):
        try:
            out = load(path)
        except CheckpointError as err:
            failures.append(err)
            continue
        if failures:
            at = out.server_round if isinstance(out, Checkpoint) else out["server_round"]
            log.warning("%s; using the previous checkpoint %s (after round %d) instead", failures[0], path.name, at)
        return out
    if len(failures) == 1:
        raise failures[0]
    raise CheckpointError(f"{failures[0]}; and the previous one: {failures[1]}") from failures[1]


def read_checkpoint_config(out_dir: str | Path) -> tuple[int, dict[str, Any]]:
    """(round, configuration) of the checkpoint a resume would use, without loading its arrays."""

    def meta_of(path: Path) -> dict[str, Any]:
        meta, npz = _read_file(path)
        npz.close()
        return meta

    meta = _first_usable(out_dir, meta_of)
    return int(meta["server_round"]), dict(meta["config"])


def _read_log(out_dir: Path, upto: int, nbytes: int) -> tuple[list[dict[str, Any]], Ledger]:
    """Rounds 1..``upto`` of the message log (its first ``nbytes`` bytes): rows and ledger."""
    with log_path(out_dir).open("rb") as fh:
        data = fh.read(nbytes)
    rows: list[dict[str, Any]] = []
    ledger = Ledger()
    expected = 1
    try:
        for line in data.splitlines():
            entry = unpack_state(json.loads(line), [])
            if int(entry["round"]) != expected:
                raise ValueError(f"round {entry['round']} where round {expected} was expected")
            expected += 1
            if entry["row"] is not None:
                rows.append(entry["row"])
            ledger.rows.extend(dict(m) for m in entry["messages"])
            for d, k, b in entry["layers"]:
                ledger.layer_bytes[(int(entry["round"]), str(d), str(k))] = int(b)
        if expected != upto + 1:
            raise ValueError(f"it ends at round {expected - 1}, the checkpoint is after round {upto}")
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{str(log_path(out_dir))!r} does not match the checkpoint: {err}") from err
    return rows, ledger


def load_checkpoint(out_dir: str | Path) -> Checkpoint:
    """Read the newest usable checkpoint back — ``checkpoint.npz``, or ``checkpoint.prev.npz`` when
    that or the part of the log it refers to cannot be read (a warning says so) — with the rounds
    and messages of its log. Raises :class:`CheckpointError` if there is none."""
    return _first_usable(out_dir, _load_file)


def _load_file(path: Path) -> Checkpoint:
    meta, npz = _read_file(path)
    with npz:
        arrays = [npz[f"a{i}"] for i in range(len(npz.files) - 1)]
    obj = unpack_state(meta, arrays)
    if "log" in obj:
        rows, ledger = _read_log(path.parent, int(obj["log"]["round"]), int(obj["log"]["bytes"]))
    else:  # format 1: everything inline
        rows, ledger = list(obj["rows"]), _ledger_from(obj["ledger"])
    return Checkpoint(
        server_round=int(obj["server_round"]),
        config=dict(obj["config"]),
        arrays=obj["arrays"],
        strategy=obj["strategy"],
        rows=rows,
        ledger=ledger,
        rng=obj["rng"],
        elapsed_seconds=float(obj["elapsed_seconds"]),
        source=path.name,
    )


def remove_checkpoints(out_dir: str | Path) -> None:
    """A fresh run in an old directory: no checkpoint, fallback or message log of a previous run."""
    for path in (checkpoint_path(out_dir), previous_checkpoint_path(out_dir), log_path(out_dir)):
        path.unlink(missing_ok=True)


def config_conflicts(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose value in ``given`` differs from ``saved``: key → (saved, given).

    Operational keys (:data:`OPERATIONAL_KEYS`) may differ; a key ``saved`` does not know (added to
    the schema since) conflicts only if ``given`` sets it away from its default.
    """
    from fedsparse.config import SCHEMA

    out = {}
    for key, value in given.items():
        if key in OPERATIONAL_KEYS:
            continue
        if key not in saved:
            if key in SCHEMA and SCHEMA[key].default == value:
                continue
            out[key] = ("<unset>", value)
        elif saved[key] != value:
            out[key] = (saved[key], value)
    return out


def _describe(conflicts: Mapping[str, tuple[Any, Any]], left: str, right: str) -> str:
    return "; ".join(f"{k} = {a!r} in {left}, {b!r} in {right}" for k, (a, b) in conflicts.items())


def resume_config(
    run_dir: str | Path,
    config: Mapping[str, Any] | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration to resume ``run_dir`` with: its ``config.toml``, checked against its checkpoint.

    ``config`` / ``overrides`` may repeat the run's settings, and may change the operational keys
    (:data:`OPERATIONAL_KEYS`); any other difference raises :class:`CheckpointError` naming the keys.
    """
    from fedsparse.config import load_toml, resolve_config

    run_dir = Path(run_dir)
    where = f"--resume {str(run_dir)!r}"
    if not run_dir.is_dir():
        raise CheckpointError(f"{where}: no such directory")
    toml = run_dir / "config.toml"
    if not toml.is_file():
        raise CheckpointError(f"{where}: config.toml is missing; is this the output directory of a fedsparse run?")
    try:
        _, saved_cfg = read_checkpoint_config(run_dir)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from err
    given: dict[str, Any] = {}
    if isinstance(config, (str, Path)):
        given.update(load_toml(config))
    elif config is not None:
        given.update(config)
    given.update(overrides or {})
    base = load_toml(toml)
    wanted = resolve_config(base, given)  # checks the given values like any run's
    conflicts = config_conflicts(resolve_config(base), {k: wanted[k] for k in given})
    if conflicts:
        raise CheckpointError(
            f"{where}: the given configuration conflicts with the run's config.toml ({_describe(conflicts, 'config.toml', 'the given configuration')}); "
            f"a resumed run keeps its configuration except {', '.join(OPERATIONAL_KEYS)}: drop these settings or start a new run"
        )
    cfg = resolve_config(base, {k: v for k, v in given.items() if k in OPERATIONAL_KEYS})
    cfg["out-dir"] = str(run_dir.resolve())
    mismatch = config_conflicts(saved_cfg, cfg)
    if mismatch:
        raise CheckpointError(
            f"{where}: config.toml does not match the checkpoint ({_describe(mismatch, 'the checkpoint', 'config.toml')}); "
            "was config.toml edited? restore it or start a new run"
        )
    return cfg


# ------------------------------------------------------------------------------------------------
# client state (Flower context.state) mirrored to disk
# ------------------------------------------------------------------------------------------------

_CLIENT_FILE = re.compile(r"^p(\d+)-r(\d+)\.rd$")


def client_state_dir(cfg: Mapping[str, Any]) -> Path | None:
    """Where clients mirror their state: ``<out-dir>/client-state`` when checkpoints are on."""
    if int(cfg.get("checkpoint-every", 0) or 0) <= 0:
        return None
    return _client_state_folder(cfg)


def _client_state_folder(cfg: Mapping[str, Any]) -> Path | None:
    """``<out-dir>/client-state`` (None without an out-dir), whether or not checkpoints are on."""
    if not str(cfg.get("out-dir", "")):
        return None
    return Path(str(cfg["out-dir"])) / CLIENT_STATE_DIR


def _client_files(directory: Path) -> list[tuple[int, int, Path]]:
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        m = _CLIENT_FILE.match(path.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return out


def _serialize(rd: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(rd).SerializeToString()


def _deserialize(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def save_client_state(cfg: Mapping[str, Any], context: Context, server_round: int) -> Path | None:
    """Mirror ``context.state`` after a successful train step of ``server_round`` (atomic write)."""
    directory = client_state_dir(cfg)
    if directory is None:
        return None
    items = {k: v for k, v in context.state.items() if k != RESTORED_MARK}
    if not items:
        return None
    pid = int(context.node_config.get("partition-id", -1))
    if pid < 0:
        return None
    return atomic_write(directory / f"p{pid}-r{int(server_round)}.rd", _serialize(RecordDict(items)))


def restore_client_state(cfg: Mapping[str, Any], context: Context, server_round: int) -> int | None:
    """On a Context's first train message, load its newest mirrored state from before ``server_round``.

    Returns the round the state was saved at (None: nothing restored). A Context that already went
    through this (marked in its state) is left alone, so a running simulation never re-reads disk.

    What decides is whether the run directory holds a ``client-state`` folder, not the current
    ``checkpoint-every``: a run resumed with ``checkpoint-every = 0`` (an operational key, which a
    resume may change) still gets back the state its clients mirrored before the interruption. A
    new run never sees a previous run's folder (the server deletes it before round 1).
    """
    directory = _client_state_folder(cfg)
    if directory is None or RESTORED_MARK in context.state or not directory.is_dir():
        return None
    pid = int(context.node_config.get("partition-id", -1))
    found = max(((r, p) for q, r, p in _client_files(directory) if q == pid and r < int(server_round)), default=None)
    restored = None
    if found is not None:
        for name, record in _deserialize(found[1].read_bytes()).items():
            context.state[name] = record
        restored = found[0]
    context.state[RESTORED_MARK] = ConfigRecord({"restored-from-round": -1 if restored is None else restored})
    return restored


def prune_client_states(out_dir: str | Path, server_round: int) -> int:
    """After a checkpoint at ``server_round``: per client, drop files older than its newest one <= round."""
    files = _client_files(Path(out_dir) / CLIENT_STATE_DIR)
    newest: dict[int, int] = {}
    for pid, r, _ in files:
        if r <= server_round:
            newest[pid] = max(newest.get(pid, -1), r)
    removed = 0
    for pid, r, path in files:
        if r < newest.get(pid, -1):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def drop_client_states_after(out_dir: str | Path, server_round: int) -> int:
    """On resume from ``server_round``: forget client state saved by the interrupted later rounds."""
    removed = 0
    for _, r, path in _client_files(Path(out_dir) / CLIENT_STATE_DIR):
        if r > server_round:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def clear_client_states(out_dir: str | Path) -> None:
    """A fresh run in an old directory: no client may pick up a previous run's state."""
    for _, _, path in _client_files(Path(out_dir) / CLIENT_STATE_DIR):
        path.unlink(missing_ok=True)

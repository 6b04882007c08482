"""Checkpoints append their history to a log (a save writes O(new rounds) bytes) and keep the
previous checkpoint as a fallback when the newest cannot be read (fedsparse/checkpoint.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from loopback import EngineLikeGrid, set_task_identity

from clients.app import make_client_app
from fedsparse import checkpoint as ckpt
from fedsparse.accounting import Ledger
from fedsparse.config import resolve_config
from fedsparse.server import run_server

CLIENTS = 100  # messages per round and direction, as in the 1,000 rounds x 100 clients


def _history(upto: int) -> tuple[list[dict[str, Any]], Ledger]:
    rows, ledger = [], Ledger()
    for r in range(1, upto + 1):
        rows.append({"round": r, "test_accuracy": 0.5, "train_loss": float("nan"), "aggregated": True})
        for d in ("down", "up"):
            for c in range(CLIENTS):
                ledger.rows.append(
                    {
                        "round": r,
                        "direction": d,
                        "partition_id": c,
                        "node_id": 10**12 + c,
                        "message_type": "train",
                        "payload_bytes": 246_000 + c,
                        "wire_bytes": None,
                    }
                )
            for k in ("conv1.weight", "fc1.weight"):
                ledger.layer_bytes[(r, d, k)] += 1000 * r
    return rows, ledger


def _save(out: Path, server_round: int, rows: list, ledger: Ledger) -> None:
    ckpt.save_checkpoint(
        out,
        ckpt.Checkpoint(
            server_round=server_round,
            config={"rounds": 1000},
            arrays=ArrayRecord({"w": Array(np.full(1000, server_round, np.float32))}),
            strategy={"kind": "state_dict", "state": {}},
            rows=rows[:server_round],
            ledger=Ledger(rows=[m for m in ledger.rows if m["round"] <= server_round], layer_bytes=ledger.layer_bytes),
            rng=ckpt.capture_rng(),
        ),
    )


def test_a_save_writes_the_new_rounds_only(tmp_path: Path) -> None:
    """Saving after round 200 writes as many bytes as saving after round 20: the log grows by the
    10 new rounds, the checkpoint file stays the size of the state."""
    rows, ledger = _history(200)
    layer_until = {k: v for k, v in ledger.layer_bytes.items()}
    written: list[tuple[int, int]] = []
    for r in range(10, 201, 10):
        ledger.layer_bytes = {k: v for k, v in layer_until.items() if k[0] <= r}  # type: ignore[assignment]
        before = ckpt.log_path(tmp_path).stat().st_size if ckpt.log_path(tmp_path).exists() else 0
        _save(tmp_path, r, rows, ledger)
        written.append((ckpt.log_path(tmp_path).stat().st_size - before, ckpt.checkpoint_path(tmp_path).stat().st_size))
    (log_first, npz_first), (log_last, npz_last) = written[0], written[-1]
    assert log_first > 10 * 2 * CLIENTS * 50  # the 2,000 messages of 10 rounds are in it
    assert abs(log_last - log_first) <= 0.02 * log_first, written
    assert abs(npz_last - npz_first) <= 0.02 * npz_first, written
    # and everything is read back
    back = ckpt.load_checkpoint(tmp_path)
    assert back.server_round == 200 and len(back.rows) == 200 and len(back.ledger.rows) == 200 * 2 * CLIENTS
    assert back.ledger.rows == ledger.rows and dict(back.ledger.layer_bytes) == layer_until
    assert np.isnan(back.rows[-1]["train_loss"]) and back.rows[-1]["aggregated"] is True


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows, ledger = _history(6)
    _save(tmp_path, 2, rows, ledger)
    _save(tmp_path, 4, rows, ledger)
    ckpt.checkpoint_path(tmp_path).write_bytes(b"PK\x03\x04 torn")
    with caplog.at_level(logging.WARNING, logger="fedsparse"):
        back = ckpt.load_checkpoint(tmp_path)
    assert back.server_round == 2 and back.source == ckpt.PREVIOUS_FILE
    assert len(back.rows) == 2 and {m["round"] for m in back.ledger.rows} == {1, 2}
    assert back.arrays["w"].numpy()[0] == 2
    assert "using the previous checkpoint checkpoint.prev.npz (after round 2)" in caplog.text
    assert ckpt.read_checkpoint_config(tmp_path)[0] == 2
    # the resumed run saves round 3: the corrupt file is dropped, not kept as the fallback, and the
    # log's rounds 3-4 of the lost checkpoint are cut off before round 3 is appended
    _save(tmp_path, 3, rows, ledger)
    again = ckpt.load_checkpoint(tmp_path)
    assert again.server_round == 3 and again.source == ckpt.CHECKPOINT_FILE and len(again.rows) == 3
    assert ckpt.previous_round(tmp_path) == 2


def test_a_save_that_dies_after_the_log_leaves_a_usable_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, ledger = _history(4)
    _save(tmp_path, 2, rows, ledger)

    def dying_savez(fh: Any, **members: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 4, rows, ledger)  # rounds 3-4 reached the log, the checkpoint did not land
    monkeypatch.undo()
    back = ckpt.load_checkpoint(tmp_path)
    assert back.server_round == 2 and len(back.rows) == 2
    _save(tmp_path, 3, rows, ledger)
    assert [r["round"] for r in ckpt.load_checkpoint(tmp_path).rows] == [1, 2, 3]


def test_a_run_resumes_from_the_previous_checkpoint_bit_exactly(tmp_path: Path) -> None:
    """A real run (loopback grid): checkpoints after rounds 2 and 4 of 4; the newest is corrupted;
    the resume continues from round 2 and ends with the straight run's weights, bit for bit."""
    set_task_identity()
    base = {
        "num-clients": 3,
        "clients-per-round": 2,
        "rounds": 4,
        "local-steps": 2,
        "batch-size": 16,
        "lr": 0.05,
        "wire-bytes": False,
        "seed": 3,
        "checkpoint-every": 2,
        "strategy": "topk",  # clients keep residuals: their mirrored state matters to the resume
    }

    def run(out: Path, resume: bool = False) -> Any:
        cfg = resolve_config({**base, "out-dir": str(out)})
        return run_server(EngineLikeGrid(make_client_app(cfg), 3), cfg, out, show_progress=False, resume=resume)

    straight = run(tmp_path / "straight")
    out = tmp_path / "run"
    run(out)
    assert ckpt.previous_round(out) == 2
    ckpt.checkpoint_path(out).write_bytes(b"not a zip")
    resumed = run(out, resume=True)
    assert resumed.rounds["round"].tolist() == [1, 2, 3, 4]
    for k in straight.arrays.keys():
        assert resumed.arrays[k].numpy().tobytes() == straight.arrays[k].numpy().tobytes(), k
    cols = ["round", "bytes_up", "bytes_down", "test_accuracy"]
    assert resumed.rounds[cols].equals(straight.rounds[cols])

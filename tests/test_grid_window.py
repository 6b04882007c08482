"""``max-in-flight``: a round's messages go out in a window, and the run is the same run.

Flower's simulation engine pays for every *stored* message on each dispatch pass, so fedsparse can
keep only a few unanswered at a time. The window must never be exceeded, every client must still
be asked and answered, a message that never found room must not be metered as sent, and the
results must not change (replies are aggregated in partition order, whatever their arrival).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from loopback import LoopbackGrid, set_task_identity  # tests/ is on sys.path under pytest

from fedsparse.accounting import DOWN, UP, Ledger
from fedsparse.config import ConfigError, resolve_config
from fedsparse.grid import AUTO_WINDOW, MeteredGrid, auto_window, parse_max_in_flight, ray_actor_slots
from fedsparse.server import run_server


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


class _SlowEngine(LoopbackGrid):
    """Answers at most ``per_pull`` of the pushed messages per pull (oldest first), or none at all;
    records the most messages ever unanswered at once."""

    def __init__(self, per_pull: int) -> None:
        super().__init__(None, 10)
        self.per_pull = per_pull
        self.unanswered: dict[str, Message] = {}
        self.most_unanswered = 0
        self.pushed = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = super().push_messages(messages)  # the engine's ids, which the replies point back to
        self.unanswered.update((k, self._pending.pop(k)) for k in ids)
        self.pushed += len(ids)
        self.most_unanswered = max(self.most_unanswered, len(self.unanswered))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ready = [k for k in message_ids if k in self.unanswered][: self.per_pull]
        replies = []
        for k in ready:
            replies.append(Message(content=RecordDict(), reply_to=self.unanswered.pop(k)))
        return replies


def _messages(n: int) -> list[Message]:
    return [Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=100 + i) for i in range(n)]


def test_the_window_is_never_exceeded_and_every_message_is_answered() -> None:
    engine = _SlowEngine(per_pull=2)
    grid = MeteredGrid(engine, Ledger(), measure_wire=False, max_in_flight=3)
    replies = grid.send_and_receive(_messages(10), timeout=30)
    assert engine.most_unanswered == 3 and engine.pushed == 10
    assert len(replies) == 10 and len({r.metadata.reply_to_message_id for r in replies}) == 10
    directions = [row["direction"] for row in grid.ledger.rows]
    assert directions.count(DOWN) == 10 and directions.count(UP) == 10


def test_without_a_window_everything_goes_out_at_once() -> None:
    engine = _SlowEngine(per_pull=2)
    grid = MeteredGrid(engine, Ledger(), measure_wire=False, max_in_flight=0)
    grid._exchange(_messages(10), engine.push_messages, engine.pull_messages, 30, 0)
    assert engine.most_unanswered == 10


def test_a_message_that_never_found_room_is_not_sent_nor_metered() -> None:
    engine = _SlowEngine(per_pull=0)  # an engine that never answers
    grid = MeteredGrid(engine, Ledger(), measure_wire=False, max_in_flight=4)
    assert list(grid.send_and_receive(_messages(10), timeout=0.3)) == []
    assert engine.pushed == 4
    assert [row["direction"] for row in grid.ledger.rows].count(DOWN) == 4


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_in_flight = -1: allowed: 0 \(all at once\), a positive count or None"):
        MeteredGrid(_SlowEngine(1), max_in_flight=-1)
    with pytest.raises(ConfigError, match="max-in-flight"):
        resolve_config({"max-in-flight": -2})


def _rounds(tmp: Path, window: int, strategy: str) -> pd.DataFrame:
    cfg: dict[str, Any] = resolve_config(
        {
            "strategy": strategy,
            "num-clients": 6,
            "clients-per-round": 5,
            "rounds": 2,
            "local-steps": 2,
            "batch-size": 16,
            "wire-bytes": False,
            "seed": 4,
            "max-in-flight": window,
            "out-dir": str(tmp),
        }
    )
    run_server(LoopbackGrid.for_config(cfg), cfg, tmp, show_progress=False)
    return pd.read_csv(tmp / "rounds.csv").drop(columns=["round_seconds", "elapsed_seconds"])


@pytest.mark.parametrize("strategy", ["fedavg", "topk"])
def test_a_windowed_run_is_the_same_run(tmp_path: Path, strategy: str) -> None:
    at_once = _rounds(tmp_path / "all", 0, strategy)
    windowed = _rounds(tmp_path / "window", 2, strategy)
    pd.testing.assert_frame_equal(at_once, windowed)
    assert (windowed["replies"] == 5).all()


class _SteadyEngine(_SlowEngine):
    """Answers one message per pull, each pull taking ``seconds``: steady progress, slow in total."""

    def __init__(self, seconds: float) -> None:
        super().__init__(per_pull=1)
        self.seconds = seconds

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        time.sleep(self.seconds)
        return super().pull_messages(message_ids)


def test_with_a_window_the_timeout_bounds_the_wait_for_the_next_reply_not_the_whole_exchange() -> None:
    engine = _SteadyEngine(seconds=0.05)  # 12 replies take >= 0.6 s, each within 0.25 s of the last
    windowed = MeteredGrid(engine, Ledger(), measure_wire=False, max_in_flight=2)
    assert len(windowed.send_and_receive(_messages(12), timeout=0.25)) == 12
    engine = _SteadyEngine(seconds=0.05)
    at_once = MeteredGrid(engine, Ledger(), measure_wire=False, max_in_flight=0)
    got = at_once._exchange(_messages(12), engine.push_messages, engine.pull_messages, 0.25, 0)
    assert 0 < len(got) < 12  # without a window the timeout bounds the whole exchange, as Flower's does


def test_max_in_flight_values_and_their_errors() -> None:
    assert parse_max_in_flight("auto") is None
    assert [parse_max_in_flight(v) for v in (0, "0", 8, "8.0", " 16 ")] == [0, 0, 8, 8, 16]
    for bad in ("-1", "2.5", "many", "inf", "nan", ""):
        with pytest.raises(ValueError, match=r"allowed: 'auto', 0 \(all at once\) or a positive integer"):
            parse_max_in_flight(bad)
    assert resolve_config({})["max-in-flight"] == "auto"
    assert parse_max_in_flight(resolve_config({"max-in-flight": 8})["max-in-flight"]) == 8
    with pytest.raises(ConfigError, match=r"max-in-flight = 'lots' is not valid"):
        resolve_config({"max-in-flight": "lots"})


def _simulation_grid() -> Grid:
    """Flower's simulation grid, built as ``flwr.simulation.run_simulation`` builds it."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return InMemoryGrid(LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()))


def test_auto_is_all_at_once_in_a_deployment_and_a_window_on_the_simulation_engine() -> None:
    assert auto_window(LoopbackGrid(None, 4)) == 0  # any grid but Flower's simulation one: all at once
    assert MeteredGrid(LoopbackGrid(None, 4), max_in_flight=None).window() == 0
    simulation = _simulation_grid()
    assert auto_window(simulation) == AUTO_WINDOW  # no Ray in this process: the default window
    assert MeteredGrid(simulation, max_in_flight=None).window() == AUTO_WINDOW
    assert MeteredGrid(simulation, max_in_flight=0).window() == 0  # an explicit setting wins


def test_auto_gives_a_big_ray_cluster_four_messages_per_client_actor() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    ray.init(num_cpus=40, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        assert ray_actor_slots(1.0, 0.0) == 40 and ray_actor_slots(2.0, 0.0) == 20
        assert ray_actor_slots(1.0, 0.25) == 8  # the GPUs bind first
        assert auto_window(_simulation_grid(), 1.0, 0.0) == 160
        assert auto_window(_simulation_grid(), 4.0, 0.0) == AUTO_WINDOW  # 10 actors: the default is larger
    finally:
        ray.shutdown()

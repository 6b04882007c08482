"""The partition query is asked again of nodes whose answer did not come back.

Without a node's partition id the node order — and so which clients Flower's strategies sample —
would depend on how loaded the machine was when the actors started, not on the seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from loopback import LoopbackGrid, set_task_identity  # tests/ is on sys.path under pytest

from fedsparse.accounting import Ledger
from fedsparse.config import resolve_config
from fedsparse.grid import MeteredGrid


class _SlowFirstAnswers(LoopbackGrid):
    """Drops the first ``lost`` query answers, as a timeout on a loaded machine would."""

    def __init__(self, *args: Any, lost: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = lost
        self.queries: list[int] = []

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        self.queries.append(len(messages))
        replies = super().send_and_receive(messages, timeout=timeout)
        dropped, self.lost = replies[: self.lost], max(self.lost - len(replies), 0)
        return replies[len(dropped) :]


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def test_unanswered_nodes_are_asked_again() -> None:
    from clients.app import make_client_app

    cfg = resolve_config({"num-clients": 5})
    inner = _SlowFirstAnswers(make_client_app(cfg), 5, lost=2, first_node_id=900, node_id_step=-7)
    grid = MeteredGrid(inner, Ledger(), measure_wire=False)
    found = grid.discover_partitions(5, timeout=5)
    assert inner.queries == [5, 2]
    assert sorted(found.values()) == [0, 1, 2, 3, 4]
    assert [found[n] for n in grid.get_node_ids()] == [0, 1, 2, 3, 4]


def test_a_node_that_never_answers_is_given_up_after_the_tries(caplog: pytest.LogCaptureFixture) -> None:
    from clients.app import make_client_app

    cfg = resolve_config({"num-clients": 3, "clients-per-round": 2})
    inner = _SlowFirstAnswers(make_client_app(cfg), 3, lost=100, first_node_id=50)
    grid = MeteredGrid(inner, Ledger(), measure_wire=False)
    assert grid.discover_partitions(3, timeout=5, rounds=3) == {}
    assert inner.queries == [3, 3, 3]
    assert "3 of 3 nodes did not answer the partition query in 3 tries" in caplog.text

"""``wire_bytes``: the exact deflated size of a message, each object id computed once.

The reference is Flower's own traversal with every id recomputed (its default): the sizes must be
equal, byte for byte, for messages whose arrays repeat (Flower stores an object once per id, so a
repeated array is counted once) and for messages that changed after a first count.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from loopback import set_task_identity  # tests/ is on sys.path under pytest

from fedsparse.accounting import wire_bytes


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def _recomputed(message: Message) -> int:
    """Flower's default: every object id recomputed wherever it is asked for."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _message(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 128, "train-loss": 0.25}),
            "config": ConfigRecord({"round": 3}),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=12345678901234)


def test_wire_bytes_equals_flowers_recomputed_size() -> None:
    rng = np.random.default_rng(0)
    arrays = {"conv.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32), "fc.bias": np.zeros(84, np.float32)}
    arrays["fc2.bias"] = arrays["fc.bias"].copy()  # the same object id twice: stored (and counted) once
    arrays["big"] = rng.normal(size=300_000).astype(np.float32)  # several chunks
    message = _message(arrays)
    assert wire_bytes(message) == _recomputed(message)
    assert wire_bytes(message) > sum(a.nbytes for a in arrays.values()) - arrays["fc2.bias"].nbytes


def test_a_message_changed_after_a_first_count_is_counted_anew() -> None:
    message = _message({"w": np.ones(1000, np.float32)})
    first = wire_bytes(message)
    message.content["arrays"]["extra"] = Array(np.arange(5000, dtype=np.float64))
    assert wire_bytes(message) == _recomputed(message) > first

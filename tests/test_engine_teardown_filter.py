"""The stop path's log filter: Flower's ERROR records about messages in flight are dropped only
once the engine has answered and Ray is no longer initialised (a SIGTERM's teardown); errors before
Ray is up, and anything below ERROR, pass."""

from __future__ import annotations

import logging

import pytest
import ray

from fedsparse import stopping


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("flwr", level, __file__, 1, "actor died", None, None)


@pytest.fixture(autouse=True)
def _fresh_flag():
    stopping.ENGINE_ANSWERED.clear()
    yield
    stopping.ENGINE_ANSWERED.clear()


def test_errors_before_the_engine_answered_pass() -> None:
    assert not ray.is_initialized()
    assert stopping.EngineTeardownFilter().filter(_record(logging.ERROR))


def test_errors_after_ray_went_down_under_a_running_engine_are_dropped() -> None:
    stopping.ENGINE_ANSWERED.set()
    assert not ray.is_initialized()
    keep = stopping.EngineTeardownFilter().filter
    assert not keep(_record(logging.ERROR)) and not keep(_record(logging.CRITICAL))
    assert keep(_record(logging.WARNING))


def test_filter_is_on_flower_logger_only_while_signals_are_handled() -> None:
    flower = logging.getLogger("flwr")
    with stopping.handling_signals():
        assert any(isinstance(f, stopping.EngineTeardownFilter) for f in flower.filters)
    assert not any(isinstance(f, stopping.EngineTeardownFilter) for f in flower.filters)

"""Celery's receiver cache, which instrument() turns on for the per-task signals, keeps dispatch exact:
receivers connected or disconnected later, per-sender receivers, str senders, and a bounded cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals

from celery_signal_exporter.recording import receivers as r
from celery_signal_exporter.recording.queues import CACHE_LIMIT


@pytest.fixture
def cached() -> Iterator[None]:
    """The cache on for the test, Celery's default again after it (the signals are process-wide)."""
    before = [(s.use_caching, s.sender_receivers_cache) for s in r.PER_TASK_SIGNALS]
    r.cache_receivers()
    try:
        yield
    finally:
        for s, (use, cache) in zip(r.PER_TASK_SIGNALS, before, strict=True):
            s.use_caching, s.sender_receivers_cache = use, cache


def test_the_cache_is_on_and_dispatch_stays_exact(cached: None) -> None:
    signal = signals.after_task_publish
    assert signal.use_caching and isinstance(signal.sender_receivers_cache, r._ReceiverCache)
    got: list[tuple[str, Any]] = []

    def everyone(sender: Any = None, **_: Any) -> None:
        got.append(("everyone", sender))

    def only_b(sender: Any = None, **_: Any) -> None:
        got.append(("only b", sender))

    signal.connect(everyone, weak=False, dispatch_uid="test.everyone")
    try:
        signal.send(sender="a")  # a str sender, which Celery's own cache (a WeakKeyDictionary) refuses
        assert "a" in signal.sender_receivers_cache
        signal.connect(only_b, sender="b", weak=False, dispatch_uid="test.only_b")  # clears the cache
        signal.send(sender="a")
        signal.send(sender="b")
        signal.disconnect(dispatch_uid="test.everyone")
        signal.send(sender="b")
        signal.send(sender="a")
    finally:
        signal.disconnect(dispatch_uid="test.everyone")
        signal.disconnect(dispatch_uid="test.only_b")
    assert got == [("everyone", "a"), ("everyone", "a"), ("everyone", "b"), ("only b", "b"), ("only b", "b")]


def test_the_cache_is_bounded(cached: None) -> None:
    signal = signals.before_task_publish
    calls: list[Any] = []

    def count(sender: Any = None, **_: Any) -> None:
        calls.append(sender)

    signal.connect(count, weak=False, dispatch_uid="test.count")
    try:
        for i in range(CACHE_LIMIT + 50):
            signal.send(sender=f"t{i}")
        assert len(signal.sender_receivers_cache) == CACHE_LIMIT
        signal.send(sender=f"t{CACHE_LIMIT + 10}")  # past the cap: looked up the uncached way, still answered
        assert len(signal.sender_receivers_cache) == CACHE_LIMIT
    finally:
        signal.disconnect(dispatch_uid="test.count")
    assert len(calls) == CACHE_LIMIT + 51


def test_a_cache_already_on_is_left_alone() -> None:
    signal = signals.task_prerun
    before = signal.use_caching, signal.sender_receivers_cache
    mine: dict[Any, Any] = {}
    signal.use_caching, signal.sender_receivers_cache = True, mine
    try:
        r.cache_receivers()
        assert signal.sender_receivers_cache is mine
    finally:
        signal.use_caching, signal.sender_receivers_cache = before

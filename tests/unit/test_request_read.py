"""Our receivers read the run's request straight from Celery's Local, and fall back to
`task.request_stack.top` when that is not there: both give what `task.request` gives."""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_signal_exporter.recording.receivers import _request_of


def _task() -> Any:
    app = Celery("read", broker="memory://", set_as_current=False)

    @app.task(name="r.read", shared=False)
    def noop() -> None:
        return None

    return app.tasks[noop.name]


def test_the_direct_read_is_the_request_in_progress() -> None:
    task = _task()
    assert _request_of(task) is None  # no run in progress
    task.push_request(id="outer")
    task.push_request(id="inner")
    try:
        assert _request_of(task) is task.request
        assert _request_of(task).id == "inner"
    finally:
        task.pop_request()
    assert _request_of(task).id == "outer"
    task.pop_request()


def test_without_celerys_local_it_falls_back() -> None:
    class Stack:
        top = "the request"  # no `_local`: another Celery's request stack

    class Task:
        request_stack = Stack()

    assert _request_of(Task()) == "the request"

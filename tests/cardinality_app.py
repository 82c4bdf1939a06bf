"""The Celery app of tests/cardinality.py: N trivial task names over two queues, nothing else.

Configured from the environment like tests/workload_app.py (CSX_TEST_BROKER,
CELERY_EXPORTER_METRICS_DIR; CSX_CARD_NAMES: how many names to register,
default 200). Each run sleeps 0.3 s. Task ``card.tNNN`` is routed to queue ``q1`` when NNN is even and
``q2`` when odd, so every name has one (task, queue) pair and the pairs split
evenly over the two queues. Run as a script it is a producer:
``python -m tests.cardinality_app publish START STOP`` sends one run of each
name START..STOP-1 and prints how many it sent; ``... events`` sends the runs
that fail and retry (`events()`).
"""

from __future__ import annotations

import json
import sys
import time
from os import environ

from celery import Celery, Task
from kombu import Queue

import celery_signal_exporter

QUEUES = ("q1", "q2")
NAMES = int(environ.get("CSX_CARD_NAMES", "200"))


def task_name(i: int) -> str:
    return f"card.t{i:03d}"


def queue_of(i: int) -> str:
    return QUEUES[i % 2]


app = Celery("cardinality", broker=environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    task_queues=[Queue(q) for q in QUEUES],
    task_default_queue=QUEUES[0],
    task_routes={task_name(i): {"queue": queue_of(i)} for i in range(NAMES)},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
# A heartbeat every 0.1 s and runs of 0.3 s: every run is seen in progress by a heartbeat, so every pair
# gets its celery_task_oldest_running_age_seconds series, as a task that runs for seconds does in production.
celery_signal_exporter.instrument(app, heartbeat_interval=0.1)
RUN_SECONDS = 0.3


#: What a run may be asked to do instead of succeeding, for the events that add series.
FAILURES: dict[str, type[Exception]] = {"ValueError": ValueError, "KeyError": KeyError}


def _run(self: Task, outcome: str = "") -> None:
    """Sleep, then succeed; or raise the exception class named, or retry once (and fail for good)."""
    time.sleep(RUN_SECONDS)
    if outcome == "retry":
        raise self.retry(max_retries=1, countdown=0)
    if outcome:
        raise FAILURES[outcome]("cardinality")


for _i in range(NAMES):
    app.task(name=task_name(_i), bind=True)(_run)


def publish(start: int, stop: int) -> int:
    """One run of each name in [start, stop), each to its own queue."""
    with app.producer_or_acquire() as producer:
        for i in range(start, stop):
            app.send_task(task_name(i), producer=producer)
    return stop - start


def events() -> int:
    """The runs that add series only when they happen: two failures of name 0 with two exception classes,
    and a run of name 1 that retries once and then fails for good."""
    for outcome in FAILURES:
        app.send_task(task_name(0), args=[outcome])
    app.send_task(task_name(1), args=["retry"])
    return len(FAILURES) + 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["events"]:
        print(json.dumps({"sent": events()}))
    elif len(sys.argv) == 4 and sys.argv[1] == "publish":
        print(json.dumps({"sent": publish(int(sys.argv[2]), int(sys.argv[3]))}))
    else:
        sys.exit("usage: python -m tests.cardinality_app publish START STOP | events")

"""The Celery app of tests/cardinality.py: N trivial task names over two queues, nothing else.

Configured from the environment like tests/workload_app.py (CSX_TEST_BROKER,
CELERY_EXPORTER_METRICS_DIR; CSX_CARD_NAMES: how many names to register,
default 200). Each run sleeps 0.3 s. Task ``card.tNNN`` is routed to queue ``q1`` when NNN is even and
``q2`` when odd, so every name has one (task, queue) pair and the pairs split
evenly over the two queues. Run as a script it is a producer:
``python -m tests.cardinality_app publish START STOP`` sends one run of each
name START..STOP-1 and prints how many it sent.
"""

from __future__ import annotations

import json
import sys
import time
from os import environ

from celery import Celery
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


def _trivial() -> None:
    time.sleep(RUN_SECONDS)


for _i in range(NAMES):
    app.task(name=task_name(_i))(_trivial)


def publish(start: int, stop: int) -> int:
    """One run of each name in [start, stop), each to its own queue."""
    with app.producer_or_acquire() as producer:
        for i in range(start, stop):
            app.send_task(task_name(i), producer=producer)
    return stop - start


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "publish":
        sys.exit("usage: python -m tests.cardinality_app publish START STOP")
    print(json.dumps({"sent": publish(int(sys.argv[2]), int(sys.argv[3]))}))

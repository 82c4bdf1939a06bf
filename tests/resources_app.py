"""The Celery app of tests/integration/test_task_resources.py: tasks that take memory, CPU or time, in real processes.

Configured from the environment like tests/workload_app.py (CSX_TEST_BROKER,
CELERY_EXPORTER_METRICS_DIR). Run as a script it is a producer:
``python -m tests.resources_app publish NAME COUNT [ARG]`` publishes COUNT
runs of task NAME (with the one float argument ARG, if given) to the queue
``res``, one after the other, and prints how long each ``send_task`` took.
"""

from __future__ import annotations

import json
import sys
import time
from os import environ

from celery import Celery
from kombu import Queue

import celery_signal_exporter

app = Celery("resources", broker=environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    task_queues=[Queue("res")],
    task_default_queue="res",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
celery_signal_exporter.instrument(app, heartbeat_interval=0.5)

#: What the allocating task holds at once: its run must show at least 150 MB of growth.
ALLOC_BYTES = 200 * 2**20


@app.task(name="r.trivial")
def trivial() -> None:
    return None


@app.task(name="r.alloc")
def alloc() -> int:
    # Multiplying bytes writes every page, so all of it is resident (a bare bytearray(n) may not be).
    block = b"\x01" * ALLOC_BYTES
    return len(block)


@app.task(name="r.spin")
def spin(seconds: float) -> None:
    """`seconds` of this thread's CPU: the same amount however loaded the machine is."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@app.task(name="r.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


def publish(name: str, count: int, *args: float) -> list[float]:
    took = []
    for _ in range(count):
        start = time.perf_counter()
        app.send_task(name, args=args, queue="res")
        took.append(time.perf_counter() - start)
    return took


if __name__ == "__main__":
    scenario, task_name, n, *task_args = sys.argv[1:]
    assert scenario == "publish", scenario
    print(json.dumps(publish(task_name, int(n), *map(float, task_args))))

"""The Celery app of the incident suite (tests/test_incidents*.py), run by real workers and producers.

Configured from the environment: CSX_TEST_BROKER (URL), CELERY_EXPORTER_METRICS_DIR,
CSX_PREFETCH (worker_prefetch_multiplier, Celery's default 4). Instrumented with the heartbeat
divided by the suite's K, like every other cadence (tests/incident_stack.py). Each suite module
keeps its own tasks in its own module, listed in `include`.
"""

from __future__ import annotations

import os
import time

from celery import Celery

import celery_signal_exporter
from tests.incident_stack import HEARTBEAT

# Per-run CPU and memory reads are opt-in; the RAM-hungry and CPU incidents need them.
os.environ.setdefault("CELERY_EXPORTER_TASK_RESOURCES", "1")

app = Celery("incident", broker=os.environ.get("CSX_TEST_BROKER", "memory://"),
             include=["tests.incident_tasks_queues", "tests.incident_tasks_inside"])
app.conf.update(
    task_default_queue="work",
    worker_prefetch_multiplier=int(os.environ.get("CSX_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_signal_exporter.instrument(app, heartbeat_interval=HEARTBEAT)


@app.task(name="i.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="i.ok")
def ok() -> None:
    return None


@app.task(name="i.fail")
def fail() -> None:
    raise ValueError("planned failure")

"""The compose stack's demo Celery app: a few tasks that succeed, sleep, fail
and retry over two queues, so every dashboard panel has something to show.

It is instrumented the way a real app is, with one call where the app is
defined; the worker and the producer both import it, so both record metrics.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from celery import Celery
from kombu import Queue

import celery_signal_exporter

app = Celery("demo_tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://redis:6379/0"))
app.conf.update(
    task_queues=[Queue("default"), Queue("slow")],
    task_default_queue="default",
    task_routes={"demo_tasks.slow": {"queue": "slow"}},
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
)
# The metrics directory comes from CELERY_EXPORTER_METRICS_DIR.
celery_signal_exporter.instrument(app)


@app.task(name="demo_tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo_tasks.slow")
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="demo_tasks.flaky")
def flaky(rate: float) -> str:
    if random.random() < rate:
        raise ValueError("demo failure")
    return "ok"


@app.task(name="demo_tasks.retrying", bind=True, max_retries=3)
def retrying(self: Any) -> int:
    if self.request.retries < 2:
        raise self.retry(countdown=1)
    return int(self.request.retries)

# mypy: disable-error-code="untyped-decorator,no-untyped-call"
"""The Celery app the demo runs: two queues and tasks that succeed, sleep,
fail, retry and expire. Configured from the environment by `demo.py`, so the
same module serves the worker process and the producer.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from celery import Celery
from kombu.entity import Queue

import celery_signal_exporter

BROKER_ENV = "CELERY_EXPORTER_DEMO_BROKER"
DIR_ENV = "CELERY_EXPORTER_DEMO_DIR"


def filesystem_transport(workdir: str) -> dict[str, Any]:
    """The filesystem transport's options for a demo in `workdir`: one folder both ways, so the
    worker's `data_folder_in` (what the exporter's filesystem probe counts) is where the producer writes."""
    folder = os.path.join(workdir, "broker")
    return {
        "data_folder_in": folder,
        "data_folder_out": folder,
        "store_processed": False,
        "polling_interval": 0.1,
        "control_folder": os.path.join(folder, "control"),
    }


def _broker() -> tuple[str, dict[str, Any]]:
    url = os.environ.get(BROKER_ENV, "")
    if url:
        return url, {}
    options = filesystem_transport(os.environ.get(DIR_ENV, "/tmp/celery-exporter-demo"))
    os.makedirs(options["data_folder_in"], exist_ok=True)
    return "filesystem://", options


url, transport_options = _broker()
app = Celery("demo", broker=url)
app.conf.update(
    broker_transport_options=transport_options,
    broker_connection_retry_on_startup=True,
    task_queues=[Queue("fast"), Queue("slow")],
    task_default_queue="fast",
    task_routes={"demo.slow": {"queue": "slow"}, "demo.report": {"queue": "slow"}},
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    worker_hijack_root_logger=False,
)
celery_signal_exporter.instrument(app)


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo.slow")
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="demo.flaky")
def flaky(kind: str) -> None:
    if kind == "value":
        raise ValueError("the demo's flaky task failed on purpose")
    raise KeyError(kind)


@app.task(name="demo.retrying", bind=True, max_retries=3)
def retrying(self: Any) -> int:
    if self.request.retries < 2:
        raise self.retry(countdown=0.5)
    return int(self.request.retries)


@app.task(name="demo.report")
def report() -> str:
    return "expired tasks never get here"


def send_mixed_batch(rng: random.Random) -> int:
    """One round of the demo workload; returns how many tasks it sent."""
    for _ in range(5):
        add.delay(rng.randint(0, 9), rng.randint(0, 9))
    slow.delay(round(rng.uniform(0.2, 1.5), 2))
    flaky.delay(rng.choice(["value", "key"]))
    retrying.delay()
    # Expires before any worker can reach it: shows up as revoked{reason="expired"}.
    report.apply_async(expires=0.05)
    return 9

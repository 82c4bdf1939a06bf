"""The Celery app of tests/integration/test_worker_state.py: what a worker main holds, runs and consumes.

Configured from the environment like tests.workload_app (CSX_TEST_BROKER,
CELERY_EXPORTER_METRICS_DIR). Queues are declared by the workers' -Q. Run as
a script it is a producer: `python -m tests.state_app SCENARIO QUEUE ARGS...`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from celery import Celery

import celery_signal_exporter

app = Celery("state", broker=os.environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_signal_exporter.instrument(app, heartbeat_interval=0.5)

#: s.sleep's own hard time limit, which the time-limit gauge must read.
SLEEP_LIMIT = 120


@app.task(name="s.sleep", time_limit=SLEEP_LIMIT)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="s.ok")
def ok() -> None:
    return None


def busy(queue: str, long: int, seconds: int, short: int, countdown: int) -> dict[str, Any]:
    """`long` tasks sleeping `seconds`, `short` quick ones behind them, one quick task due in `countdown` s."""
    for _ in range(long):
        sleep.apply_async((float(seconds),), queue=queue)
    for _ in range(short):
        ok.apply_async(queue=queue)
    if countdown:
        ok.apply_async(queue=queue, countdown=countdown)
    return {}


def cancel(queue: str, hostname: str) -> dict[str, Any]:
    """Tell the worker `hostname` to stop consuming from `queue`, and wait for its answer."""
    replies = app.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=10)
    if not replies:
        raise SystemExit(f"{hostname} never answered cancel_consumer({queue})")
    return {"replies": replies}


if __name__ == "__main__":
    scenario, queue, *args = sys.argv[1:]
    print(json.dumps(globals()[scenario](queue, *[int(a) if a.isdigit() else a for a in args])))

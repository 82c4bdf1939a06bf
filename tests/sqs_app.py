"""The workload app on kombu's SQS transport, plus what only the SQS tests need: a task whose message
SQS must move to the dead-letter queue, and producers for exact queue states.

Configured like tests.workload_app (CSX_TEST_BROKER, CSX_TEST_TRANSPORT); run as a script it is a
producer: `python -m tests.sqs_app SCENARIO [ARGS]`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from celery.exceptions import Reject

from tests.workload_app import app, fail, ok, retry_twice, sleep_late

__all__ = ["app"]


@app.task(name="t.dead_letter", acks_late=True)
def dead_letter() -> None:
    """Rejected without requeue: kombu leaves the message to the queue's redrive policy, so SQS
    redelivers it after its visibility timeout and moves it to the DLQ after maxReceiveCount receives."""
    raise Reject("planned rejection", requeue=False)


def ready(queue: str, n: int) -> dict[str, Any]:
    for i in range(n):
        ok.apply_async((i,), queue=queue)
    return {}


def long_runs(queue: str, n: int, seconds: int) -> dict[str, Any]:
    """n acks_late runs of `seconds`: the running one stays in flight (not visible) until it ends."""
    for _ in range(n):
        sleep_late.apply_async((float(seconds),), queue=queue)
    return {}


def delayed(queue: str, n: int, seconds: int) -> dict[str, Any]:
    """Countdown tasks SQS itself holds: kombu sends `delay_seconds` as the message's DelaySeconds."""
    for i in range(n):
        ok.apply_async((i,), queue=queue, countdown=seconds, delay_seconds=seconds)
    return {}


def rejects(queue: str, n: int) -> dict[str, Any]:
    for _ in range(n):
        dead_letter.apply_async(queue=queue)
    return {}


def counts() -> dict[str, Any]:
    """tests.workload_app's known workload without remote control (SQS has no broadcast without SNS)."""
    for i in range(20):
        ok.delay(i)
    for i in range(10):
        ok.apply_async((i,), queue="beta")
    for _ in range(6):
        fail.delay("value")
    for _ in range(4):
        fail.delay("key")
    for _ in range(5):
        retry_twice.apply_async(queue="beta")
    app.send_task("t.no_such_task", queue="alpha")
    return {"at": time.time()}


SCENARIOS = {"ready": ready, "long_runs": long_runs, "delayed": delayed, "rejects": rejects, "counts": counts}

if __name__ == "__main__":
    name, *args = sys.argv[1:]
    print(json.dumps(SCENARIOS[name](*[a if not a.isdigit() else int(a) for a in args])))

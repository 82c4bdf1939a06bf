"""The Celery app the integration tests run in real worker and producer processes.

Configured from the environment so one module serves every broker:
CSX_TEST_BROKER (URL), CSX_TEST_TRANSPORT (transport options, JSON), CELERY_EXPORTER_METRICS_DIR, CSX_TEST_MAX_NAMES,
CSX_TEST_GC_FREEZE (freeze the worker's heap once ready: cheaper forks).
Run as a script it is a producer: `python -m tests.workload_app SCENARIO`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery
from kombu import Queue

import celery_signal_exporter
from tests.hostile_names import HOSTILE

app = Celery("workload", broker=os.environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    task_queues=[Queue("alpha"), Queue("beta")],
    task_default_queue="alpha",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # kombu transport options as JSON (the SQS tests: region, queue_name_prefix, polling).
    broker_transport_options=json.loads(os.environ.get("CSX_TEST_TRANSPORT") or "{}"),
)
celery_signal_exporter.instrument(
    app,
    max_task_names=int(os.environ.get("CSX_TEST_MAX_NAMES", "500")),
    # 300: the default objective's bucket (5m), which the objective rules and panels read.
    queue_wait_buckets=(0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 300),
    runtime_buckets=(0.1, 0.5, 1, 1.5, 2, 3, 5, 10),
    heartbeat_interval=0.5,
)
if os.environ.get("CSX_TEST_GC_FREEZE"):
    # Celery runs gc.collect() before every fork; with the worker's heap frozen that is cheap, and
    # the recycling test (thousands of forks) runs faster. Nothing else changes.
    import gc

    from celery import signals

    signals.worker_ready.connect(lambda **_: gc.freeze(), weak=False)
# A second call must be a no-op: every exact count in the suite would double if it were not.
assert celery_signal_exporter.instrument(app) is celery_signal_exporter.instrument(app)


@app.task(name="t.ok")
def ok(x: int = 0) -> int:
    return x


@app.task(name="t.fail")
def fail(kind: str) -> None:
    if kind == "value":
        raise ValueError("planned failure")
    raise KeyError(kind)


@app.task(name="t.retry_twice", bind=True, max_retries=5)
def retry_twice(self: Any) -> int:
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return int(self.request.retries)


@app.task(name="t.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


#: A registered task whose name alone outgrows a fresh metrics file (64 KB): the full-disk test.
HUGE_NAME = "t.huge_" + "x" * 70_000


@app.task(name=HUGE_NAME)
def huge() -> None:
    return None



def _noop() -> None:
    return None


for _hostile in HOSTILE:
    app.task(name=_hostile)(_noop)


@app.task(name="t.raise_hostile")
def raise_hostile(i: int) -> None:
    raise type(HOSTILE[i], (Exception,), {})("a hostile exception class name")


@app.task(name="t.waiter")
def waiter() -> None:
    return None


@app.task(name="t.later")
def later() -> None:
    return None


def _wait_revoked(ids: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.inspect(timeout=1.0).revoked() or {}
        known = {i for ids_ in replies.values() for i in ids_}
        if set(ids) <= known:
            return
    raise SystemExit(f"worker never acknowledged revokes for {ids}")


def counts() -> dict[str, Any]:
    """The known workload of the counting test."""
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
    revoked = [f"revoked-{i}-{time.time_ns()}" for i in range(3)]
    app.control.revoke(revoked)
    _wait_revoked(revoked)
    for task_id in revoked:
        ok.apply_async((0,), task_id=task_id)
    app.send_task("t.no_such_task", queue="alpha")
    return {"revoked": revoked}


def expired() -> dict[str, Any]:
    """Four t.ok on alpha that expired 30 s before they were sent. Published before any worker
    consumes: RabbitMQ then drops them on arrival (Celery sends a TTL of 0, and a TTL-0 message reaches
    a consumer only if one is ready at that instant), Redis keeps them for the worker to discard."""
    past = datetime.now(timezone.utc) - timedelta(seconds=30)
    for _ in range(4):
        ok.apply_async((0,), expires=past)
    return {}


def hold_back() -> dict[str, Any]:
    """One blocker, then waiters queued behind it, then a countdown task."""
    sleep.delay(2.0)
    for _ in range(3):
        waiter.delay()
    return {}


def countdown() -> dict[str, Any]:
    later.apply_async(countdown=3)
    return {}


def many(n: int) -> dict[str, Any]:
    for i in range(n):
        ok.delay(i)
    return {}


def sleepers(n: int, seconds: int) -> dict[str, Any]:
    """n tasks that each sleep `seconds`: work in progress to kill."""
    for _ in range(n):
        sleep.delay(float(seconds))
    return {}


def huge_name() -> dict[str, Any]:
    app.send_task(HUGE_NAME, queue="alpha")
    return {}


def hostile() -> dict[str, Any]:
    for i, name in enumerate(HOSTILE):
        app.send_task(name, queue="alpha")
        raise_hostile.delay(i)
    return {}


def names_from(start: int, n: int) -> dict[str, Any]:
    """n distinct task names, t.dynamic_<start>..., published and never run."""
    for i in range(start, start + n):
        app.send_task(f"t.dynamic_{i}", queue="beta")
    return {}


def names(n: int) -> dict[str, Any]:
    for i in range(n):
        app.send_task(f"t.dynamic_{i}", queue="beta")
    return {}


#: Two registered 100 KB names that differ only at their end: the label-length test.
LONG_NAMES = ["t.long_" + "x" * 100_000 + end for end in ("a", "b")]
#: A 100 KB routing key no queue is bound to: the producer labels `sent` with the key itself.
LONG_QUEUE = "q" * 100_000

for _long in LONG_NAMES:
    app.task(name=_long)(_noop)


@app.task(name="t.raise_long")
def raise_long() -> None:
    raise type("E" * 100_000, (Exception,), {})("a 100 KB exception class name")


def long_labels() -> dict[str, Any]:
    for name in LONG_NAMES:
        app.send_task(name, queue="alpha")
    raise_long.delay()
    app.send_task("t.ok", exchange="alpha", routing_key=LONG_QUEUE)
    return {}


def routing_keys(n: int) -> dict[str, Any]:
    """One task published to n routing keys no queue is bound to: n queue names on the producer side."""
    for i in range(n):
        app.send_task("t.ok", exchange="alpha", routing_key=f"rk.{i}")
    return {}


def to_queues(n: int) -> dict[str, Any]:
    """One t.ok to each of the queues cap.0 ... cap.<n-1>."""
    for i in range(n):
        ok.apply_async((i,), queue=f"cap.{i}")
    return {}


#: Tasks with names at the label-length cap: a dozen of them outgrow a fresh worker file (64 KB),
#: which is how the full-disk test makes a write need room the disk no longer has.
WIDE_NAMES = [f"t.wide_{i:02d}_" + "x" * 185 for i in range(12)]
for _wide in WIDE_NAMES:
    app.task(name=_wide)(_noop)


def wide() -> dict[str, Any]:
    for name in WIDE_NAMES:
        app.send_task(name, queue="alpha")
    return {}


@app.task(name="t.ignore")
def ignore() -> None:
    from celery.exceptions import Ignore

    raise Ignore()


@app.task(name="t.replace", bind=True)
def replace(self: Any) -> Any:
    return self.replace(ok.s(1))


@app.task(name="t.reject", acks_late=True)
def reject() -> None:
    from celery.exceptions import Reject

    raise Reject("dropped", requeue=False)


@app.task(name="t.late")
def late() -> None:
    return None


if os.environ.get("CSX_TEST_LATE"):
    # Pool processes forget t.late (as when a module fails to import there): its run fails before it starts.
    from celery import signals as _signals

    _signals.worker_process_init.connect(lambda **_: app.tasks.pop("t.late", None), weak=False)


def outcomes() -> dict[str, Any]:
    """One run of each outcome counted apart from success and failure (issue 28), and a pre-start failure."""
    for task in (ignore, replace, reject, late):
        task.delay()
    return {}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    result = globals()[scenario](*map(int, args))
    print(json.dumps(result))


# -- Added for the worker tick and lost-run tests (defined after the producer entry point:
#    workers import them; tests publish them by name). --


@app.task(name="t.sleep_late", acks_late=True, reject_on_worker_lost=True)
def sleep_late(seconds: float) -> float:
    """acks_late + reject_on_worker_lost: a run whose child is killed is requeued, not failed."""
    time.sleep(seconds)
    return seconds


# How long Celery waits for a killed child's result before it declares the run lost (default 10 s).
app.conf.worker_lost_wait = float(os.environ.get("CSX_TEST_LOST_WAIT", "10"))

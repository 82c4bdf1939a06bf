"""The Celery app of the pool and soak tests, in real worker and producer processes.

Configured from the environment like tests/workload_app.py: CSX_TEST_BROKER
(URL), CELERY_EXPORTER_METRICS_DIR, and CSX_SOAK_LOG_DIR: when set, every
task run appends its own record there, one file per process, so totals can
be computed without the exporter:

- ``start <name>`` first thing in the body, then one of
- ``ok <name>``, ``fail <name>`` (it raised) or ``retry <name>`` (it
  published its retry and raised Celery's Retry).

A run killed in between leaves ``start`` alone. Lines are written with one
``write`` on an ``O_APPEND`` descriptor, so they never interleave.

Messages are acknowledged late and requeued when their pool process dies
(``acks_late``, ``reject_on_worker_lost``): a killed run runs again.

Run as a script it is a producer: ``python -m tests.soak_app SCENARIO ARGS``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu import Queue

import celery_signal_exporter

app = Celery("soak", broker=os.environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    task_queues=[Queue("soak"), Queue("chaos")],
    task_default_queue="soak",
    worker_prefetch_multiplier=int(os.environ.get("CSX_SOAK_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    # On a loaded machine a fresh pool process can take more than billiard's 4 s to report up; it would be
    # SIGKILLed for that, which is chaos nobody asked for.
    worker_proc_alive_timeout=30,
)
celery_signal_exporter.instrument(
    app,
    queue_wait_buckets=(0.25, 0.5, 1, 1.5, 2, 3, 5, 10),
    runtime_buckets=(0.1, 0.5, 1, 1.5, 2, 3, 5, 10),
    heartbeat_interval=0.5,
)

#: The soak's task names: soak.t00 ... soak.t29.
NAMES = [f"soak.t{i:02d}" for i in range(30)]
#: What a run does, by its `kind` argument.
KINDS = ("ok", "fail", "retry")
LOG_DIR = os.environ.get("CSX_SOAK_LOG_DIR")
_fd: tuple[int, int] | None = None  # (pid, descriptor)


def record(word: str, name: str) -> None:
    """One line of this process's own count, if the run asked for one."""
    global _fd
    if LOG_DIR is None:
        return
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        _fd = (pid, os.open(os.path.join(LOG_DIR, f"runs-{pid}.log"),
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_fd[1], f"{word} {name}\n".encode())


class PlannedFailure(Exception):
    """What a task of kind "fail" raises."""


class RetryNotPublished(Exception):
    """A retry whose message could not be published (the broker was down): a plain failure."""


def run(task: Task, kind: str, sleep: float, linger: float = 0.0) -> str:
    name = str(task.name)
    record("start", name)
    if sleep:
        time.sleep(sleep)
    if kind == "fail":
        record("fail", name)
        raise PlannedFailure(name)
    if kind == "retry" and task.request.retries == 0:
        try:
            retry = task.retry(countdown=0, throw=False)
        except Reject as exc:
            # Celery turns a failed retry publish into Reject, which no signal reports;
            # a plain failure keeps the two counts comparable.
            record("fail", name)
            raise RetryNotPublished(name) from exc
        record("retry", name)
        if linger:
            # The retry is on the queue already: on a pool of threads or greenlets it starts, under the same
            # task id, while this run is still finishing.
            time.sleep(linger)
        raise retry
    record("ok", name)
    return kind


def _define(name: str) -> None:
    @app.task(name=name, bind=True, max_retries=3)
    def task(self: Task, kind: str = "ok", sleep: float = 0.0, linger: float = 0.0) -> str:
        return run(self, kind, sleep, linger)


for _name in NAMES:
    _define(_name)


@app.task(name="soak.sleeper", bind=True)
def sleeper(self: Task, seconds: float) -> float:
    """A run to kill: it marks its process busy (busy-<pid>-<task id> in the log dir) while it sleeps."""
    record("start", str(self.name))
    marker = os.path.join(LOG_DIR, f"busy-{os.getpid()}-{self.request.id}") if LOG_DIR else None
    if marker:
        with open(marker, "w") as f:
            f.write(str(time.time()))
    time.sleep(seconds)
    if marker and os.path.exists(marker):
        os.unlink(marker)
    record("ok", str(self.name))
    return seconds


def feed(rate: int, seconds: int, seed: int, sleeper_every: int = 0, sleeper_tenths: int = 0) -> dict[str, Any]:
    """Publish `rate` tasks a second for `seconds`, names and kinds at random (80% ok, 10% fail,
    10% retry). Publishes that fail (the broker is down) are counted apart and not retried.
    With `sleeper_every`, also one soak.sleeper of `sleeper_tenths`/10 s on the chaos queue every
    `sleeper_every` seconds, the first at half that: runs for the soak's chaos to kill."""
    rng = random.Random(seed)
    published: dict[str, int] = {}
    errors = 0
    sigs = {name: app.signature(name) for name in NAMES}
    start = time.monotonic()
    end = start + seconds
    next_sleeper = start + sleeper_every / 2 if sleeper_every else end
    n = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_sleeper:
            next_sleeper += sleeper_every
            try:
                sleeper.apply_async((sleeper_tenths / 10,), queue="chaos")
            except Exception:  # noqa: BLE001 - the broker is down
                errors += 1
            else:
                published["soak.sleeper ok"] = published.get("soak.sleeper ok", 0) + 1
        due = int((now - start) * rate) + 1
        if n >= due:
            time.sleep(min(0.002, end - now))
            continue
        name = rng.choice(NAMES)
        r = rng.random()
        kind = "ok" if r < 0.8 else "fail" if r < 0.9 else "retry"
        n += 1
        try:
            sigs[name].apply_async((kind,))
        except Exception:  # noqa: BLE001 - the broker is down: counted, not published
            errors += 1
            time.sleep(0.05)
            continue
        published[f"{name} {kind}"] = published.get(f"{name} {kind}", 0) + 1
    return {"published": published, "errors": errors, "seconds": time.monotonic() - start}


def mix() -> dict[str, Any]:
    """The pool test's fixed mix: 10 ok, 4 failing, 3 retrying once (on soak.t00, t01, t02); each
    retrying run lingers 0.5 s after its retry is published, so the retry overlaps it where it can."""
    for _ in range(10):
        app.send_task("soak.t00", ("ok",))
    for _ in range(4):
        app.send_task("soak.t01", ("fail",))
    for _ in range(3):
        app.send_task("soak.t02", ("retry", 0.0, 0.5))
    return {}


def sleepers(n: int, tenths: int) -> dict[str, Any]:
    """n runs of soak.sleeper, each `tenths`/10 s long, on the chaos queue (ahead of any backlog on soak)."""
    for _ in range(n):
        sleeper.apply_async((tenths / 10,), queue="chaos")
    return {}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    result = globals()[scenario](*map(int, args))
    print(json.dumps(result))

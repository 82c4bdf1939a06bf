"""The Celery app the beat tests run as real `celery beat` and `celery worker` processes.

Configured from the environment: CSX_TEST_BROKER (URL), CELERY_EXPORTER_METRICS_DIR,
CSX_TEST_BEAT_CHANGE (a path: once it exists, the changing scheduler adds the
entry `added` and removes `removed`), CSX_TEST_BEAT_LATE (adds `late`, whose
runs expire after 1 s), CSX_TEST_BEAT_EXTRA (adds `gone-later`).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler
from celery.schedules import BaseSchedule, schedstate
from kombu import Queue

import celery_signal_exporter

app = Celery("beatapp", broker=os.environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    task_queues=[Queue("periodic"), Queue("late")],
    task_default_queue="periodic",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_max_loop_interval=1,
)
celery_signal_exporter.instrument(app, heartbeat_interval=0.5, schedule_refresh=1.0)


class aligned(BaseSchedule):  # named like Celery's own schedules (crontab, solar)
    """Crontab-style: due at every wall-clock multiple of `every` seconds, no `run_every`.

    crontab itself counts in minutes, too slow for a test.
    """

    def __init__(self, every: float, app: Any = None) -> None:
        super().__init__(app=app)
        self.every = every

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.every,)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        last = self.maybe_make_aware(last_run_at).timestamp()
        due = (last // self.every + 1) * self.every
        return timedelta(seconds=due - time.time())

    def is_due(self, last_run_at: datetime) -> Any:
        rem = self.remaining_estimate(last_run_at).total_seconds()
        if rem <= 0:
            return schedstate(True, self.every - time.time() % self.every)
        return schedstate(False, rem)


ENTRIES: dict[str, dict[str, Any]] = {
    "every-1s": {"task": "b.ok", "schedule": 1.0},
    "echo-a": {"task": "b.echo", "schedule": 2.0, "args": ("a",)},
    "echo-b": {"task": "b.echo", "schedule": 2.0, "args": ("b",)},
    "aligned-3s": {"task": "b.ok", "schedule": aligned(3.0)},
    "always-fails": {"task": "b.fail", "schedule": 1.0},
    "slow": {"task": "b.sleep", "schedule": 2.0, "args": (2.3,)},
    "removed": {"task": "b.ok", "schedule": 1.0},
}
if os.environ.get("CSX_TEST_BEAT_LATE"):
    # Runs of `late` expire after 1 s; a worker held up by a long run lets them.
    ENTRIES["late"] = {"task": "b.ok", "schedule": 1.0, "options": {"queue": "late", "expires": 1.0}}
if os.environ.get("CSX_TEST_BEAT_EXTRA"):
    ENTRIES["gone-later"] = {"task": "b.ok", "schedule": 1.0}
app.conf.beat_schedule = ENTRIES


class ChangingScheduler(PersistentScheduler):  # type: ignore[misc]
    """A scheduler whose entries change at run time, as database-backed ones' do."""

    changed = False

    def tick(self, *args: Any, **kwargs: Any) -> Any:
        flag = os.environ.get("CSX_TEST_BEAT_CHANGE")
        if not self.changed and flag and os.path.exists(flag):
            self.changed = True
            self.schedule.pop("removed", None)
            self.update_from_dict({"added": {"task": "b.ok", "schedule": 1.0}})
        return super().tick(*args, **kwargs)


@app.task(name="b.ok")
def ok() -> None:
    return None


@app.task(name="b.echo")
def echo(word: str) -> str:
    return word


@app.task(name="b.fail")
def fail() -> None:
    raise RuntimeError("this periodic task always fails")


@app.task(name="b.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)

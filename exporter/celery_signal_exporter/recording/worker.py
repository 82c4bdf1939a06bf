"""The worker side of the catalogue, recorded by the worker main process.

A consumer bootstep ticks every `heartbeat_interval` seconds. Each tick writes
the heartbeat, pool size and active task count, then runs `compact()`, which
first removes the live-gauge files of processes that died without saying so
(SIGKILLed or OOM-killed children, a killed worker), counting the runs they
still had in progress as lost, so their in-progress gauges disappear while
their counters stay.

Where the tick runs depends on the pool:

- prefork, threads, gevent, eventlet: on the consumer's own timer. No thread
  for prefork, so nothing can hold a lock across the pool's fork. Under
  gevent and eventlet the timer is a greenlet: it ticks only while tasks
  cooperate (yield to the hub); a task that blocks the hub for longer than
  the exporter's ``--worker-timeout`` makes the worker read down.
- solo: on a small daemon thread. The solo pool runs each task inside the
  consumer's event loop, so its timer does not tick while a task runs, and a
  task longer than ``--worker-timeout`` would read as a dead worker with no
  pool. The store has its own lock, and solo never forks.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, bootsteps, signals

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.compact import compact, reap
from celery_signal_exporter.directory import directory_lock
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.host import Host
from celery_signal_exporter.recording.tick import TickThread
from celery_signal_exporter.recording.worker_state import WorkerState

log = logging.getLogger("celery_signal_exporter")

#: Dead files folded per heartbeat tick at most, so one tick never stalls the worker for long.
COMPACT_MAX_FILES = 2000


def reap_dead_processes(directory: str) -> int:
    """Remove live-gauge files whose writer is gone, counting their lost runs; how many were removed.

    The tick does this inside `compact()`; the worker's start calls it alone,
    so that a restarted worker clears what its predecessor left before it
    writes anything of its own.
    """
    return reap(directory, by_pid=True).reaped


def runs_tasks_on_its_loop(pool: Any) -> bool:
    """True for the solo pool, whose tasks block the consumer's timer while they run."""
    from celery.concurrency.solo import TaskPool as SoloPool

    return isinstance(pool, SoloPool)


class WorkerMetrics:
    def __init__(self, inst: Host) -> None:
        self.inst = inst
        self.heartbeat = m.Recorder(inst.store, c.HEARTBEAT)
        self.pool_processes = m.Recorder(inst.store, c.POOL_PROCESSES)
        self.tasks_active = m.Recorder(inst.store, c.TASKS_ACTIVE)
        self.compacted = m.Recorder(inst.store, c.COMPACTED)
        self.state = WorkerState(inst)  # requests held, runs' ages, queues consumed, memory: worker_state.py

    def initialise(self) -> None:
        """Write the error counters at 0, so rate() works from the first error on."""
        try:
            self.inst.dropped.labels("name").inc(0)
            self.inst.truncated.labels("name").inc(0)
            self.compacted.labels().inc(0)  # compaction adds to it in the archive
            for signal in self.inst.signal_names():
                self.inst.handler_errors.labels(signal).inc(0)
                self.inst.writes_lost.labels(signal).inc(0)
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("worker_init", exc)

    def tick(self, consumer: Any) -> None:
        try:
            from celery.worker import state

            hostname = str(consumer.hostname)
            pool = consumer.pool
            size = getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1
            self.pool_processes.labels(hostname).set(float(size))
            self.tasks_active.labels(hostname).set(float(len(state.active_requests)))
            now = time.time()
            self.heartbeat.labels(hostname).set(now, now)
        except Exception as exc:  # noqa: BLE001 - never raise into the worker
            self.inst.handler_failed("worker_tick", exc)
        self.state.tick(consumer)
        self.compact()

    def compact(self) -> None:
        """Reap dead processes' live gauges and fold their files into the archives; counted, never raised."""
        try:
            result = compact(self.inst.options.metrics_dir, max_files=COMPACT_MAX_FILES, by_pid=True)
            errors = result.errors + result.reap_errors
            if errors:
                raise OSError(f"{len(errors)} file(s) not compacted or reaped, first: {errors[0]}")
        except Exception as exc:  # noqa: BLE001 - never raise into the worker
            self.inst.handler_failed("worker_compact", exc)

    def stopped(self, consumer: Any) -> None:
        """Graceful shutdown: say so at once instead of waiting for the timeout."""
        try:
            hostname = str(consumer.hostname)
            now = time.time()
            self.heartbeat.labels(hostname).set(0.0, now)
            self.tasks_active.labels(hostname).set(0.0)
            self.pool_processes.labels(hostname).set(0.0)
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("worker_shutdown", exc)
        try:
            self.state.stopped(consumer)
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("worker_shutdown", exc)


def install_worker_metrics(app: Celery, inst: Host) -> None:
    worker_metrics = WorkerMetrics(inst)
    interval = inst.options.heartbeat_interval

    class ExporterHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        """Writes worker metrics every `interval` seconds: on the consumer's timer, or a thread under solo."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None
            self.thread: TickThread | None = None

        def start(self, parent: Any) -> None:
            worker_metrics.initialise()
            worker_metrics.tick(parent)
            try:
                solo = runs_tasks_on_its_loop(parent.pool)
            except Exception as exc:  # noqa: BLE001 - never raise into the worker; the timer it is
                inst.handler_failed("worker_init", exc)
                solo = False
            if solo:
                self.thread = TickThread(interval, lambda: worker_metrics.tick(parent))
            else:
                self.tref = parent.timer.call_repeatedly(interval, worker_metrics.tick, (parent,), priority=10)

        def stop(self, parent: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            if self.thread is not None:
                self.thread.stop()
                self.thread = None

        def shutdown(self, parent: Any) -> None:
            self.stop(parent)
            worker_metrics.stopped(parent)

    app.steps["consumer"].add(ExporterHeartbeat)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        # The worker's own hard time limit (`--time-limit`, else `task_time_limit`), known to pool
        # processes forked after this: their postrun tells a hard time limit from a termination by it.
        inst.worker_time_limit = getattr(sender, "time_limit", None)
        # Prepare the directory: create it, and clear only what dead processes left live.
        try:
            os.makedirs(inst.options.metrics_dir, exist_ok=True)
            with directory_lock(inst.options.metrics_dir, exclusive=True):
                pass  # create the lock file now, so readers take it from the first compaction on
            reap_dead_processes(inst.options.metrics_dir)
        except Exception as exc:  # noqa: BLE001
            inst.handler_failed("worker_init", exc)
        try:
            inst.reserve()  # before the pool forks: every child inherits where to count what it cannot write
        except Exception as exc:  # noqa: BLE001
            inst.handler_failed("worker_init", exc)

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid="celery_signal_exporter.worker_init")

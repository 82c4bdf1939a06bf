"""The worker side of the catalogue, recorded by the worker main process.

A consumer bootstep ticks on the worker's own timer (no extra thread, so
nothing can hold a lock across the prefork pool's fork). Each tick writes the
heartbeat, pool size and active task count, and removes the live-gauge files
of processes that died without saying so (SIGKILLed or OOM-killed children),
so their in-progress gauges disappear while their counters stay.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps, signals

from . import metrics as m
from .compact import compact, directory_lock
from .store import MAGIC, held_by_a_live_writer

if TYPE_CHECKING:
    from .instrument import Instrumentation

log = logging.getLogger("celery_signal_exporter")

#: Dead files folded per heartbeat tick at most, so one tick never stalls the worker for long.
COMPACT_MAX_FILES = 2000
_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)(?:-\d+)?\.db$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is dead
    except (OSError, IndexError):
        return True


def _writer_gone(path: str, pid: int) -> bool:
    """Whether a live-gauge file's writer is dead, so that the file may go.

    Our files are judged by their writer's lock, which works across pid
    namespaces; well-formed files without our tag (an older version, or
    prometheus-client's own) by the pid, in our own namespace only. Anything
    damaged or not a regular file is left alone: nothing is deleted blindly.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.pread(fd, 4096, 0)
        if head[4:8] == MAGIC:
            return not held_by_a_live_writer(fd)
        used = int.from_bytes(head[:4], "little", signed=True)
        if used < 8 or used > os.fstat(fd).st_size:
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return pid != os.getpid() and not pid_alive(pid)


def reap_dead_processes(directory: str) -> list[int]:
    """Remove live-gauge files whose writer is gone. Counter files are kept (compaction folds them).

    A live file of a dead writer holds values nobody is responsible for any
    more: the in-progress count of a SIGKILLed child, the pool size of a
    worker that was OOM-killed.
    """
    reaped: list[int] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return reaped
    for name in names:
        match = _LIVE_FILE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        path = os.path.join(directory, name)
        if not _writer_gone(path, pid):
            continue
        try:
            os.unlink(path)
            reaped.append(pid)
        except FileNotFoundError:
            pass
    return reaped


class WorkerMetrics:
    def __init__(self, inst: Instrumentation) -> None:
        self.inst = inst
        self.heartbeat = m.Metric(inst.store, m.HEARTBEAT)
        self.pool_processes = m.Metric(inst.store, m.POOL_PROCESSES)
        self.tasks_active = m.Metric(inst.store, m.TASKS_ACTIVE)
        self.compacted = m.Metric(inst.store, m.COMPACTED)

    def initialise(self) -> None:
        """Write the error counters at 0, so rate() works from the first error on."""
        try:
            self.inst.dropped.labels("name").inc(0)
            self.compacted.labels().inc(0)  # compaction adds to it in the archive
            for signal in self.inst.signal_names():
                self.inst.handler_errors.labels(signal).inc(0)
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
            reap_dead_processes(self.inst.options.metrics_dir)
        except Exception as exc:  # noqa: BLE001 - never raise into the worker
            self.inst.handler_failed("worker_tick", exc)
        self.compact()

    def compact(self) -> None:
        """Fold dead processes' files into the archives; counted, never raised, if it fails."""
        try:
            result = compact(self.inst.options.metrics_dir, max_files=COMPACT_MAX_FILES)
            if result.errors:
                raise OSError(f"{len(result.errors)} file(s) not compacted, first: {result.errors[0]}")
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


def install_worker_metrics(app: Celery, inst: Instrumentation) -> None:
    worker_metrics = WorkerMetrics(inst)
    interval = inst.options.heartbeat_interval

    class ExporterHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        """Writes worker metrics every `interval` seconds on the consumer's timer."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None

        def start(self, parent: Any) -> None:
            worker_metrics.initialise()
            worker_metrics.tick(parent)
            self.tref = parent.timer.call_repeatedly(interval, worker_metrics.tick, (parent,), priority=10)

        def stop(self, parent: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        def shutdown(self, parent: Any) -> None:
            self.stop(parent)
            worker_metrics.stopped(parent)

    app.steps["consumer"].add(ExporterHeartbeat)

    def on_worker_init(**_: Any) -> None:
        # Prepare the directory: create it, and clear only what dead processes left live.
        try:
            os.makedirs(inst.options.metrics_dir, exist_ok=True)
            with directory_lock(inst.options.metrics_dir, exclusive=True):
                pass  # create the lock file now, so readers take it from the first compaction on
            reap_dead_processes(inst.options.metrics_dir)
        except Exception as exc:  # noqa: BLE001
            inst.handler_failed("worker_init", exc)

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid="celery_signal_exporter.worker_init")

"""What the worker main already knows, read on its heartbeat tick: no per-task cost.

Celery's worker main holds the requests it received (`celery.worker.state`),
the ETA requests waiting in its timer, the queues its consumer consumes and
its pool's processes. None of that reaches a signal, so it is read here, once
per tick (`WorkerMetrics.tick`, every `heartbeat_interval`), and written as
gauges:

- the oldest run in progress per (task, queue), so a stuck run shows while
  it runs, and each task's hard time limit to compare it with;
- the requests it holds per queue: reserved (prefetched, not started, no
  ETA) and scheduled (ETA/countdown, waiting in the timer), which the
  broker no longer counts as waiting;
- the queues it consumes from;
- its resident memory (Linux: `/proc/<pid>/statm`), main and pool together,
  and its largest pool process (prefork only: every other pool runs its tasks
  in the main process, whose memory the first gauge already is).

Every series once written is written each tick, at 0 when there is nothing,
so a drained queue reads 0 rather than a stale count. Each part is read in its
own try block: one that fails is counted (`worker_tick`) and the rest go on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.headers import QUEUE_HEADER
from celery_signal_exporter.labels import OVERFLOW
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.host import Host

#: How often the time limits are read again from the task registry (tasks registered late, config changes).
TIME_LIMIT_REFRESH = 300.0
#: Where Linux tells a process's memory; absent elsewhere, and so are the memory gauges.
STATM = "/proc/{}/statm"


def _live(requests: Any) -> list[Any]:
    """The requests of a `weakref.WeakSet`, copied without iterating it in Python.

    The consumer adds to these sets while a tick reads them (the timer thread
    of the threads pool, the tick thread of solo); iterating a WeakSet while it
    grows raises. Copying its set of references is one C call under the GIL.
    """
    refs = list(requests.data)
    return [r for r in (ref() for ref in refs) if r is not None]


def resident_bytes(pid: int, page_size: int) -> int | None:
    """Resident memory of `pid` from `/proc/<pid>/statm` (pages times page size); None if it cannot be read."""
    try:
        with open(STATM.format(pid), "rb") as f:
            return int(f.read().split()[1]) * page_size
    except (OSError, ValueError, IndexError):
        return None


def pool_pids(pool: Any) -> list[int] | None:
    """Pids of a prefork pool's processes; None for the other pools, which run tasks in the main process."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if not isinstance(pool, PreforkPool):
        return None
    processes = getattr(getattr(pool, "_pool", None), "_pool", None) or []
    return [p.pid for p in list(processes) if getattr(p, "pid", None)]


def time_limit(task: Any, default: Any) -> float | None:
    """A task's hard time limit: its own `time_limit`, else the worker's (`default`); None if neither."""
    limit = getattr(task, "time_limit", None)
    if limit is None:
        limit = default
    try:
        value = float(limit) if limit is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value > 0 else None


class WorkerState:
    """The worker main's own state, written as gauges on each tick."""

    def __init__(self, inst: Host) -> None:
        self.inst = inst
        store = inst.store
        self.oldest = m.Recorder(store, c.OLDEST_RUNNING_AGE)
        self.time_limit = m.Recorder(store, c.TIME_LIMIT)
        self.reserved = m.Recorder(store, c.TASKS_RESERVED)
        self.scheduled = m.Recorder(store, c.TASKS_SCHEDULED)
        self.consuming = m.Recorder(store, c.CONSUMING)
        self.memory = m.Recorder(store, c.RESIDENT_MEMORY)
        self.max_memory = m.Recorder(store, c.POOL_PROCESS_MAX_MEMORY)
        # Every series written so far, written again (at 0 when empty) on every tick.
        self._running: set[tuple[str, str]] = set()
        self._held: set[str] = set()
        self._consumed: set[str] = set()
        self._limits_at = -TIME_LIMIT_REFRESH
        self._page_size = os.sysconf("SC_PAGE_SIZE") if os.path.exists(STATM.format("self")) else 0
        self._pool_memory = False

    # -- labels --------------------------------------------------------------

    def name_label(self, raw: Any) -> str | None:
        """Host's label for a task name (None: ignored), without counting a fold again:
        `task_received` counted it once per message; a tick must not count it once more per tick."""
        return self.inst.task_name(raw, count=False)

    def queue_label(self, raw: Any) -> str:
        """Host's label for a queue name, past the cap folded uncounted (as `name_label`)."""
        return self.inst.queue_label(raw if isinstance(raw, str) else str(raw), count=False)

    def queue_of(self, consumer: Any, request: Any) -> str:
        """The queue label task_received put on the request; worked out again only if it did not."""
        queue = request.request_dict.get(QUEUE_HEADER)
        if isinstance(queue, str):
            return queue
        return self.inst.queues.for_message(consumer, request.message)

    # -- the tick ------------------------------------------------------------

    def tick(self, consumer: Any) -> None:
        """Read and write every part; each failure is counted and the other parts still run."""
        try:
            hostname = str(consumer.hostname)
        except Exception as exc:  # noqa: BLE001 - never raise into the worker
            self.inst.handler_failed("worker_tick", exc)
            return
        now = time.time()
        # Consuming first: held requests are written at 0 for every queue consumed, from the first tick.
        for part in (self.write_consuming, self.write_running, self.write_held, self.write_memory,
                     self.write_time_limits):
            try:
                part(consumer, hostname, now)
            except Exception as exc:  # noqa: BLE001 - never raise into the worker
                self.inst.handler_failed("worker_tick", exc)

    def write_running(self, consumer: Any, hostname: str, now: float) -> None:
        """Age of the oldest run in progress per (task, queue); 0 for those with none."""
        from celery.worker import state

        oldest: dict[tuple[str, str], float] = {}
        for request in _live(state.active_requests):
            started = request.time_start  # set once the pool accepted it
            if not started:
                continue
            name = self.name_label(request.name)
            if name is None:
                continue
            key = (name, self.queue_of(consumer, request))
            age = max(0.0, now - started)
            if age > oldest.get(key, -1.0):
                oldest[key] = age
        self._running.update(oldest)
        for key in self._running:
            self.oldest.labels(*key).set(oldest.get(key, 0.0))

    def write_held(self, consumer: Any, hostname: str, now: float) -> None:
        """Requests the worker holds per queue: reserved (not started, no ETA) and scheduled (ETA, in the timer)."""
        from celery.worker import state
        from celery.worker.request import Request

        active = set(_live(state.active_requests))
        reserved: dict[str, int] = {}
        for request in _live(state.reserved_requests):
            if request not in active:
                queue = self.queue_of(consumer, request)
                reserved[queue] = reserved.get(queue, 0) + 1
        # As `celery inspect scheduled` finds them: timer entries whose first argument is a request.
        scheduled: dict[str, int] = {}
        timer = getattr(consumer, "timer", None)
        for waiting in list(timer.schedule.queue) if timer is not None else ():
            args = getattr(getattr(waiting, "entry", None), "args", None)
            if args and isinstance(args[0], Request):
                queue = self.queue_of(consumer, args[0])
                scheduled[queue] = scheduled.get(queue, 0) + 1
        self._held.update(reserved, scheduled, self._consumed)
        for queue in self._held:
            self.reserved.labels(hostname, queue).set(float(reserved.get(queue, 0)))
            self.scheduled.labels(hostname, queue).set(float(scheduled.get(queue, 0)))

    def write_consuming(self, consumer: Any, hostname: str, now: float) -> None:
        """1 for each queue the consumer consumes from, 0 for those it stopped consuming."""
        task_consumer = getattr(consumer, "task_consumer", None)
        queues: Iterable[Any] = (getattr(task_consumer, "queues", None) or []) if task_consumer is not None else []
        current = {self.queue_label(q.name) for q in queues}
        self._consumed.update(current)
        for queue in self._consumed:
            self.consuming.labels(hostname, queue).set(1.0 if queue in current else 0.0)

    def write_memory(self, consumer: Any, hostname: str, now: float) -> None:
        """Resident memory of the main and pool processes, and of the largest pool process (prefork)."""
        if not self._page_size:
            return  # not Linux: the gauges stay absent
        total = resident_bytes(os.getpid(), self._page_size)
        if total is None:
            return
        pids = pool_pids(consumer.pool)
        if pids is not None:
            sizes = [size for size in (resident_bytes(pid, self._page_size) for pid in pids) if size is not None]
            total += sum(sizes)
            self.max_memory.labels(hostname).set(float(max(sizes, default=0)))
            self._pool_memory = True
        self.memory.labels(hostname).set(float(total))

    def write_time_limits(self, consumer: Any, hostname: str, now: float) -> None:
        """Each registered task's hard time limit, where one is set; at start and every few minutes.

        The limit configured, not a per-call `time_limit=`; the threads and solo pools do not enforce it.
        """
        if now - self._limits_at < TIME_LIMIT_REFRESH:
            return
        self._limits_at = now
        app = self.inst.app
        # The worker's own limit: `--time-limit`, else `task_time_limit` (WorkController reads both).
        default = getattr(getattr(consumer, "controller", None), "time_limit", None) or app.conf.task_time_limit
        for raw, task in list(app.tasks.items()):
            limit = time_limit(task, default)
            if limit is None:
                continue
            name = self.name_label(raw)
            if name is not None and name != OVERFLOW:  # the limit of a fold of tasks means nothing
                self.time_limit.labels(name).set(limit)

    def stopped(self, consumer: Any) -> None:
        """Graceful shutdown: the worker holds, runs and consumes nothing any more."""
        hostname = str(consumer.hostname)
        for key in self._running:
            self.oldest.labels(*key).set(0.0)
        for queue in self._held:
            self.reserved.labels(hostname, queue).set(0.0)
            self.scheduled.labels(hostname, queue).set(0.0)
        for queue in self._consumed:
            self.consuming.labels(hostname, queue).set(0.0)
        if self._page_size:
            self.memory.labels(hostname).set(0.0)
            if self._pool_memory:
                self.max_memory.labels(hostname).set(0.0)

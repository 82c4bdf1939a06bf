"""Celery signal receivers: the task side of the metric catalogue.

Every receiver runs inside our users' producers and workers, so each one is
wrapped to never raise into Celery, does no network I/O, and only writes to
this process's mmap file. Which process runs which receiver:

- producer (any process that publishes): before/after_task_publish
- worker main: task_received, task_rejected, task_unknown, task_revoked
- pool process (prefork child, thread or solo): prerun, postrun (which also
  counts the run's outcome), failure, retry

Every run that prerun counted ends in exactly one outcome, written by postrun
in the same write as its runtime (see `Instrumentation.outcome`): success,
failure by exception (a hard time limit too), retry, ignored, replaced,
rejected (requeued or not). The worker main adds the one outcome only it
knows, a termination (revoked, `terminated`); the reaper adds lost runs
(`WorkerLostError`). A failure with no run in progress failed before its run
started and is counted apart (`celery_task_failed_before_start_total`).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import wraps
from typing import Any

from celery import Celery, signals
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.states import FAILURE, IGNORED, REJECTED, RETRY, SUCCESS

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.headers import DUE_HEADER, ENTRY_HEADER, QUEUE_HEADER
from celery_signal_exporter.labels import MAX_LABEL_LENGTH, OVERFLOW, cut
from celery_signal_exporter.options import (
    EXCLUDE_ENV,
    check_buckets,
    or_env,
    parse_exclude,
    resolve_metrics_dir,
    switch,
)
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.beat import BeatRuns, install_beat_metrics
from celery_signal_exporter.recording.host import Options
from celery_signal_exporter.recording.queues import CACHE_LIMIT, QueueResolver
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.recording.worker import install_worker_metrics

log = logging.getLogger("celery_signal_exporter")

#: The Ignore that `Task.replace` raises (Celery 5.3+): the run ended by replacing itself.
REPLACED_MESSAGE = "Replaced by new task"
#: How much shorter than its hard time limit a run killed by SIGTERM may have lasted and still be counted as
#: timed out (at most half the limit): the limit runs from the pool's accept, a little before prerun.
TIME_LIMIT_SLACK = 1.0
#: ru_maxrss is in kilobytes on Linux (and the BSDs), in bytes on macOS.
_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024
_getrusage = resource.getrusage
_RUSAGE_SELF = resource.RUSAGE_SELF
_thread_time = time.thread_time
_time = time.time
_perf_counter = time.perf_counter


class _Peak:
    """The process's peak RSS (ru_maxrss units) as last read, shared by every task series:
    a run is charged what the peak rose since the previous run's end. -1: not read yet.

    Linux keeps ru_maxrss across execve, so a worker started by a larger process (a test
    runner, a supervisor) reports that process's peak until its own exceeds it, and no run
    would show growth. Where that is so (found once, at the first run), the process's own
    peak (VmHWM in /proc/self/status) is read instead, until it passes the inherited one.
    """

    __slots__ = ("inherited", "maxrss")

    def __init__(self) -> None:
        self.maxrss = -1
        self.inherited = 0

    def forget(self) -> None:
        """After a fork: the child's peak is its own, read again before its first run."""
        self.maxrss = -1
        self.inherited = 0

    def begin(self) -> None:
        """A process's first run: what it grew to before is not the run's."""
        reported = _getrusage(_RUSAGE_SELF).ru_maxrss
        own = _own_peak()
        if own is not None and own < reported:
            self.inherited = reported
            reported = own
        self.maxrss = reported

    def read(self) -> int:
        """The peak now: one getrusage (0.8 µs), or the /proc read while an inherited peak hides ours."""
        if self.inherited:
            own = _own_peak()
            if own is not None and own < self.inherited:
                return own
            self.inherited = 0
        return _getrusage(_RUSAGE_SELF).ru_maxrss


def _own_peak() -> int | None:
    """This process's own peak RSS in kB (Linux VmHWM), which execve does not carry over; None elsewhere."""
    try:
        with open("/proc/self/status", "rb") as f:
            status = f.read()
        start = status.index(b"VmHWM:") + 6
        return int(status[start:status.index(b"kB", start)])
    except (OSError, ValueError):
        return None


class _PublishStart(threading.local):
    """When this thread's (or, patched, greenlet's) publish began, from before to after_task_publish.

    A thread-local attribute costs 0.13 µs for the set and the read, a dict keyed by
    id(headers) 0.19 µs (python -m timeit); the headers go on the wire, so they cannot carry it.
    """

    start = -1.0


class _ReceiverCache(dict[Any, Any]):
    """Celery's per-sender receiver cache as a plain dict, bounded: senders past the cap are
    looked up the uncached way. Celery's own (a WeakKeyDictionary) makes a weak reference on
    every send, which costs what the cache saves, and refuses a `str` sender (the publish
    signals send the task name)."""

    def __setitem__(self, sender: Any, receivers: Any) -> None:
        if len(self) < CACHE_LIMIT:
            super().__setitem__(sender, receivers)


#: The signals Celery sends on every task: their receiver lists are cached per sender.
PER_TASK_SIGNALS = (signals.before_task_publish, signals.after_task_publish, signals.task_received,
                    signals.task_prerun, signals.task_postrun)


def cache_receivers() -> None:
    """Turn on Celery's receiver cache for the per-task signals (docs/design.md, *Overhead in instructions*).

    Why: without it, every send takes the signal's lock, computes the sender's id and walks every
    receiver; with it, one dict lookup. Celery keeps the cache right itself: connect and disconnect
    clear it, and a dead weak receiver bypasses it. `Signal.send` already hashes every sender (its
    NO_RECEIVERS check), so a plain dict adds no failure. A signal whose cache is already on is left alone.
    """
    for signal in PER_TASK_SIGNALS:
        if not signal.use_caching:
            with signal.lock:
                signal.sender_receivers_cache = _ReceiverCache()
                signal.use_caching = True


class _Runs(threading.local):
    """The runs this thread (greenlet, when patched) has in progress, innermost last: what prerun
    started, for postrun. A task that calls another with `apply()` nests a run inside its own.

    Not on the request: reading the request again in postrun goes through Celery's
    `Local.__getattr__`, which raises and catches an AttributeError first (~2 000 instructions a
    read, callgrind); a thread-local attribute raises nothing. Per thread, not per task id, so a
    retry of the same id starting in another thread cannot take another run's record.
    """

    def __init__(self) -> None:
        #: (task id, start, thread CPU clock then, series, the request if beat sent it else None)
        self.stack: list[tuple[Any, float, float, _TaskSeries, Any]] = []


class Instrumentation:
    """The metrics of one process and the receivers that record them."""

    def __init__(self, app: Celery, options: Options) -> None:
        self.app = app
        self.options = options
        self.store = Store(options.metrics_dir, options.exclude)
        s = self.store
        self.sent = m.Recorder(s, c.SENT)
        self.received = m.Recorder(s, c.RECEIVED)
        self.redelivered = m.Recorder(s, c.REDELIVERED)
        self.started = m.Recorder(s, c.STARTED)
        self.succeeded = m.Recorder(s, c.SUCCEEDED)
        self.failed = m.Recorder(s, c.FAILED)
        self.retried = m.Recorder(s, c.RETRIED)
        self.retries_exhausted = m.Recorder(s, c.RETRIES_EXHAUSTED)
        self.revoked = m.Recorder(s, c.REVOKED)
        self.rejected = m.Recorder(s, c.REJECTED)
        self.ignored = m.Recorder(s, c.IGNORED)
        self.replaced = m.Recorder(s, c.REPLACED)
        self.run_rejected = m.Recorder(s, c.RUN_REJECTED)
        self.failed_before_start = m.Recorder(s, c.FAILED_BEFORE_START)
        self.runtime = m.Recorder(s, c.RUNTIME, options.runtime_buckets)
        self.queue_wait = m.Recorder(s, c.QUEUE_WAIT, options.queue_wait_buckets)
        self.cpu = m.Recorder(s, c.CPU)
        self.memory_growth = m.Recorder(s, c.MEMORY_GROWTH, options.memory_growth_buckets)
        self.publish = m.Recorder(s, c.PUBLISH, options.publish_buckets)
        self.in_progress = m.Recorder(s, c.IN_PROGRESS)
        self.last_success = m.Recorder(s, c.LAST_SUCCESS)
        self.dropped = m.Recorder(s, c.DROPPED_LABELS)
        self.truncated = m.Recorder(s, c.LABELS_TRUNCATED)
        self.handler_errors = m.Recorder(s, c.HANDLER_ERRORS)
        self.writes_lost = m.Recorder(s, c.WRITES_LOST)
        self.queues = QueueResolver(app, self.queue_label)
        self.beat_runs = BeatRuns(self)
        # Raw value -> label value, for the names and queues below their caps.
        self._names: dict[str, str] = {}
        self._queue_labels: dict[str, str] = {}
        # (task name, queue) -> the pool-side series of that pair.
        self._series: dict[tuple[Any, Any], _TaskSeries] = {}
        self._sent: dict[tuple[Any, Any, Any], _PublishSeries] = {}
        self._publishing = _PublishStart()
        self._runs = _Runs()
        self._timing = options.publish_timing
        # Whether publishes carry the AMQP timestamp property: found at the first publish (the app's
        # broker may be configured after instrument()).
        self._stamp: bool | None = None
        self._resources = options.task_resources
        self.peak = _Peak()
        if self._resources:
            os.register_at_fork(after_in_child=self.peak.forget)
        # (task, delivery) -> (queue label, received series, redelivered series); no series if ignored.
        self._received: dict[tuple[Any, Any, Any, Any], tuple[str, m.Series | None, m.Series | None]] = {}
        self._logged_errors: set[str] = set()
        # Ids of runs whose postrun counted a failure Celery reports again afterwards (the last 1 000).
        self._ended: dict[str, None] = {}
        #: The worker's hard time limit (`--time-limit`, `task_time_limit`), set at worker_init (worker.py).
        self.worker_time_limit: Any = None

    # -- helpers -------------------------------------------------------------

    def task_name(self, raw: Any, count: bool = True) -> str | None:
        """The label value for a task name: None if ignored, folded past the cap, cut if too long.

        `count=False` folds without counting the fold: for a reader that asks again about names
        already counted when their message arrived (the worker main's tick, every 2 s)."""
        name: str = raw if isinstance(raw, str) else str(raw)
        label = self._names.get(name)
        if label is not None:
            return label
        if name in self.options.ignore_tasks:
            return None
        if len(self._names) < self.options.max_task_names:
            label = self._names[name] = self.cut(name, "name")
            return label
        if count:
            self.dropped.labels("name").inc()
        return OVERFLOW

    def queue_label(self, queue: str, count: bool = True) -> str:
        """The label value for a queue name, folded past `max_queue_names`, cut if too long.

        Routing keys can be made up per call, so queue names need a cap like task names.
        QueueResolver calls it only when an answer is not cached, so not per task.
        """
        label = self._queue_labels.get(queue)
        if label is not None:
            return label
        if len(self._queue_labels) < self.options.max_queue_names:
            label = self._queue_labels[queue] = self.cut(queue, "queue_name")
            return label
        if count:
            self.dropped.labels("queue_name").inc()
        return OVERFLOW

    def cut(self, value: str, label: str) -> str:
        """`value` cut to the label length cap, counting the cut. Called once per new value."""
        short = cut(value)
        if short is not value:
            self.truncated.labels(label).inc()
        return short

    def handler_failed(self, signal: str, exc: BaseException) -> None:
        """Count a receiver's error, and as a lost write too when the metrics volume refused it (OSError).

        Where this process's own file cannot take the count either (a child
        forked after the volume filled has no file at all), it goes to the
        worker main's ledger, whose room was reserved at start: never silent.
        """
        counts = (self.handler_errors, self.writes_lost) if isinstance(exc, OSError) else (self.handler_errors,)
        for recorder in counts:
            series = recorder.labels(signal)
            try:
                series.inc()
            except Exception:  # noqa: BLE001 - the store itself may be what failed
                try:
                    self.store.spill(series.key)
                except Exception:  # noqa: BLE001 - no ledger room either: nothing more can be done
                    pass
        if signal not in self._logged_errors:
            self._logged_errors.add(signal)
            log.error("celery-signal-exporter: %s receiver failed, counting and going on: %s: %s",
                      signal, type(exc).__name__, exc)

    def guard(self, signal: str, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a receiver so nothing it does can raise into Celery."""

        @wraps(fn)
        def receiver(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - never raise into Celery
                self.handler_failed(signal, exc)

        return receiver

    # -- producer side -------------------------------------------------------
    # The five receivers that run on every task (publish, received, prerun, postrun) catch
    # their own errors rather than going through guard(): one call layer and one
    # keyword repack fewer, per task, in our users' processes.

    def before_publish(
        self, signal: Any = None, sender: Any = None, body: Any = None, exchange: Any = None, routing_key: Any = None,
        headers: dict[str, Any] | None = None, properties: dict[str, Any] | None = None, declare: Any = None,
        retry_policy: Any = None, **_: Any,
    ) -> None:
        # Celery's arguments are spelled out (here and below) so that only the
        # rare extras land in **_: building that dict is per-task work too.
        try:
            if self._timing:
                self._publishing.start = _perf_counter()
            now = _time()
            if headers is not None:
                eta = headers.get("eta")
                # Whole milliseconds: a 13-digit float, which Python writes and parses without the
                # big-number arithmetic the 17 digits of time.time() take. The producer writes it, a Redis
                # worker parses it and writes it again (kombu's unacked copy): measured in docs/design.md.
                headers[DUE_HEADER] = int((max(now, _timestamp(eta)) if eta else now) * 1000) / 1000
            # The AMQP timestamp property, which RabbitMQ's management API shows for a queue's head
            # message. Only on AMQP: a virtual transport (Redis) would carry it along for nothing, at a
            # cost in kombu on both sides (measured in docs/design.md). A user's own one stays.
            stamp = self._stamp
            if stamp is None:
                stamp = self._stamp = self.amqp_broker()
            if stamp and properties is not None and properties.get("timestamp") is None:
                properties["timestamp"] = int(now)
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.handler_failed("before_task_publish", exc)

    def amqp_broker(self) -> bool:
        """Whether the app publishes to an AMQP broker (RabbitMQ); True when it cannot tell, as before."""
        try:
            connection = self.app.connection_for_write()  # a description only: nothing connects
            try:
                return bool(connection.transport.driver_type == "amqp")
            finally:
                connection.release()
        except Exception:  # noqa: BLE001 - an odd transport: carry the timestamp, as every publish once did
            return True

    def after_publish(
        self, signal: Any = None, sender: Any = None, body: Any = None, headers: Any = None, exchange: Any = None,
        routing_key: Any = None, **_: Any,
    ) -> None:
        try:
            took = None
            if self._timing:
                # Not reset after use: Celery always sends before_task_publish first, in the same thread.
                start = self._publishing.start
                took = _perf_counter() - start if start >= 0 else None
            # Celery sends the task name as the sender. The series are remembered per
            # (name, exchange, routing key), so a publish costs one dict lookup.
            key = (sender, exchange, routing_key)
            series = self._sent.get(key)
            if series is None:
                name = self.task_name(sender)
                if name is None:
                    return
                queue = self.queues.for_publish(exchange, routing_key)
                series = _PublishSeries(self.store, self.sent.labels(name, queue),
                                        self.publish.labels(name, queue) if self._timing else None)
                # Folds are not remembered, so that every folded publish is counted as one.
                if name != OVERFLOW and queue != OVERFLOW and len(self._sent) < CACHE_LIMIT:
                    self._sent[key] = series
            series.sent_one(took)
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.handler_failed("after_task_publish", exc)

    # -- worker main process -------------------------------------------------

    def on_received(self, signal: Any = None, sender: Any = None, request: Any = None, **_: Any) -> None:
        try:
            message = request.message
            info = message.delivery_info
            # The queue and series of a (task, delivery) pair are worked out once: the
            # worker main process handles every message, so this is its per-task cost.
            key = (request.name, info.get("consumer_tag"), info.get("exchange"), info.get("routing_key"))
            known = self._received.get(key)
            if known is None:
                queue = self.queues.for_message(sender, message)
                name = self.task_name(request.name)
                if name is None:
                    known = (queue, None, None)
                else:
                    again = self.redelivered.labels(name, queue)
                    again.inc(0)  # at 0 beside received, so that received - redelivered always works
                    known = (queue, self.received.labels(name, queue), again)
                if name != OVERFLOW and queue != OVERFLOW and len(self._received) < CACHE_LIMIT:
                    self._received[key] = known
            queue, series, redelivered = known
            request.request_dict[QUEUE_HEADER] = queue
            if series is not None:
                series.inc()
                # Set by the broker (AMQP) or by kombu when it restores an unacked message (Redis).
                if info.get("redelivered") and redelivered is not None:
                    redelivered.inc()
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.handler_failed("task_received", exc)

    def on_rejected(self, sender: Any = None, message: Any = None, **_: Any) -> None:
        self.rejected.labels(self.queues.for_message(sender, message)).inc()

    def on_revoked(
        self, sender: Any = None, request: Any = None, terminated: bool = False,
        expired: bool = False, **_: Any,
    ) -> None:
        name = self.task_name(getattr(sender, "name", None) or getattr(request, "task", "unknown"))
        if name is None:
            return
        reason = "expired" if expired else "terminated" if terminated else "revoked"
        self.revoked.labels(name, self.queue_of(request), reason).inc()
        self.beat_runs.revoked(request, name, expired)

    # -- pool process --------------------------------------------------------

    def queue_of(self, request: Any) -> str:
        queue = getattr(request, QUEUE_HEADER, None)
        if isinstance(queue, str):
            return queue
        info = getattr(request, "delivery_info", None) or {}
        return self.queues.for_publish(info.get("exchange"), info.get("routing_key"))

    def series_for(self, name: str, queue: str) -> _TaskSeries | None:
        """The pool-side series of one (task, queue), looked up once per pair rather than per call.

        Keyed by the raw task name, so a known task skips the name checks too;
        None for an ignored task.
        """
        key = (name, queue)
        series = self._series.get(key)
        if series is None:
            label = self.task_name(name)
            if label is None:
                return None
            resources = self._resources
            series = _TaskSeries(
                self.store, self.in_progress.labels(label, queue), self.started.labels(label, queue),
                self.queue_wait.labels(label, queue), self.runtime.labels(label, queue),
                self.succeeded.labels(label, queue), self.last_success.labels(label),
                self.cpu.labels(label, queue) if resources else None,
                self.memory_growth.labels(label, queue) if resources else None, self.peak, label, queue,
            )
            if label != OVERFLOW:  # folded names are not remembered one by one
                self._series[key] = series
        return series

    def on_prerun(
        self, signal: Any = None, sender: Any = None, task_id: str = "", task: Any = None, args: Any = None,
        kwargs: Any = None, **_: Any,
    ) -> None:
        try:
            request = _request_of(task)
            entry = getattr(request, ENTRY_HEADER, None)  # a run beat dispatched: counted per schedule entry
            if entry is not None:
                self.beat_runs.start(request, entry, task.name)
            # The common case in one lookup: a known task from the queue the worker main process named.
            series = self._series.get((task.name, getattr(request, QUEUE_HEADER, None)))
            if series is None:
                series = self.series_for(task.name, self.queue_of(request))
                if series is None:
                    return
            due = getattr(request, DUE_HEADER, None)
            wait = max(0.0, _time() - due) if isinstance(due, (int, float)) and math.isfinite(due) else None
            series.start(wait)
            # Remembered only once counted, so that a failing write (a full disk) can never
            # leave the live gauge off by one: postrun takes back only what prerun added.
            beat = request if entry is not None else None
            if self._resources:
                if self.peak.maxrss < 0:  # a new process's first run
                    self.peak.begin()
                self._runs.stack.append((task_id, _perf_counter(), _thread_time(), series, beat))
            else:
                self._runs.stack.append((task_id, _perf_counter(), 0.0, series, beat))
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.handler_failed("task_prerun", exc)

    def on_postrun(
        self, signal: Any = None, sender: Any = None, task_id: str = "", task: Any = None, args: Any = None,
        kwargs: Any = None, retval: Any = None, state: str | None = None, **_: Any,
    ) -> None:
        """Runtime, in-progress and the run's outcome, in one write: task_postrun says the state
        (and carries what the run raised), which saves Celery dispatching task_success to us on
        every task and makes every run that prerun counted end exactly once."""
        try:
            runs = self._runs.stack
            # The run prerun started last in this thread is this one, but for an odd nesting.
            run = runs.pop() if runs and runs[-1][0] == task_id else _take_run(runs, task_id)
            if state == SUCCESS:
                success_at: float | None = _time()
                ended = None
            elif run is not None:
                success_at = None
                ended = self.outcome(run[3], task, task_id, state, retval, _perf_counter() - run[1])
            else:
                success_at = None
                ended = self.outcome(None, task, task_id, state, retval, 0.0)
            gave_up = self.gave_up(run[3] if run else None, task) if state == FAILURE and ended is not None else None
            if run is not None:
                _, begin, cpu_begin, series, beat = run
                if self._resources:
                    # One read of the peak per run, against the peak the previous run left (a second
                    # read at prerun would double it): a run that set no new peak grew 0.
                    peak = self.peak
                    series.finish(_perf_counter() - begin, success_at, _thread_time() - cpu_begin,
                                  peak.read() if peak.inherited else _getrusage(_RUSAGE_SELF).ru_maxrss, ended,
                                  gave_up)
                else:
                    series.finish(_perf_counter() - begin, success_at, ended=ended, gave_up=gave_up)
                if beat is not None:
                    self.beat_runs.finish(beat, success_at is not None)
            else:
                self._postrun_uncounted(task, success_at, ended)
                if gave_up is not None:
                    gave_up.inc()
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.handler_failed("task_postrun", exc)

    def gave_up(self, series: _TaskSeries | None, task: Any) -> m.Series | None:
        """The retries-exhausted counter of a failed run that had been retried (`request.retries` >= 1):
        the task gave up. Read on the failure path only."""
        request = _request_of(task)
        retries = getattr(request, "retries", 0)
        if not isinstance(retries, int) or retries < 1:
            return None
        if series is None:
            series = self.series_for(task.name, self.queue_of(request))
            if series is None:
                return None
        return self.retries_exhausted.labels(series.name, series.queue)

    def outcome(self, series: _TaskSeries | None, task: Any, task_id: str, state: str | None,
                retval: Any, elapsed: float) -> m.Series | None:
        """The counter a run that did not succeed ends in, from postrun's state and what the run raised.

        Called only for runs that did not succeed, so the common path pays nothing. None: the run ends
        where only the worker main can tell how (a termination ends the pool process's run with
        SystemExit, and the worker main counts it as revoked), or the task is ignored.
        """
        if series is None:
            series = self.series_for(task.name, self.queue_of(_request_of(task)))
            if series is None:
                return None
        name, queue = series.name, series.queue
        if state == FAILURE:  # retval is what the task raised (task_failure sends a picklable copy)
            return self.failed.labels(name, queue, exception_name(retval))
        if state == RETRY:
            return self.retried.labels(name, queue)
        if state == IGNORED:
            if isinstance(retval, Ignore) and retval.args[:1] == (REPLACED_MESSAGE,):
                return self.replaced.labels(name, queue)
            return self.ignored.labels(name, queue)
        if state == REJECTED:
            requeue = "true" if isinstance(retval, Reject) and retval.requeue else "false"
            return self.run_rejected.labels(name, queue, requeue)
        # No state: the run raised past Celery's handling. Eager with task_eager_propagates (or
        # apply(throw=True)), where Celery re-raises before task_failure; or SystemExit in a pool process.
        raised = sys.exc_info()[1]  # postrun is sent from a `finally`: the exception in flight
        if raised is None:
            return None
        if isinstance(raised, Retry):
            return self.retried.labels(name, queue)
        if not isinstance(raised, Exception):
            request = _request_of(task)
            if not getattr(request, "is_eager", False):
                # SIGTERM (billiard raises SystemExit) or a greenlet pool's timeout: a hard time limit
                # if the run lasted its limit, else a termination, which the worker main counts as revoked.
                limit = _hard_limit(request, task, self.worker_time_limit)
                if limit and elapsed >= limit - min(TIME_LIMIT_SLACK, limit / 2):
                    return self.failed.labels(name, queue, TimeLimitExceeded.__name__)
                return None
        elif not getattr(_request_of(task), "is_eager", False):
            # Celery's own handling raised (a result backend down): it reports task_failure again after this.
            self._remember(self._ended, task_id)
        return self.failed.labels(name, queue, exception_name(raised))

    @staticmethod
    def _remember(ids: dict[str, None], task_id: str) -> None:
        ids[task_id] = None
        if len(ids) > 1000:
            del ids[next(iter(ids))]

    def _postrun_uncounted(self, task: Any, success_at: float | None, ended: m.Series | None) -> None:
        """A postrun whose prerun counted nothing (an ignored task, a failed write): the outcome still counts."""
        request = _request_of(task)
        if getattr(request, ENTRY_HEADER, None) is not None:
            self.beat_runs.finish(request, success_at is not None)
        if success_at is not None:
            found = self.series_for(task.name, self.queue_of(request))
            if found is not None:
                found.finish(None, success_at)
        elif ended is not None:
            ended.inc()

    def _in_progress_here(self, task_id: Any) -> bool:
        """Whether this thread runs `task_id` now: its postrun, still to come, counts the outcome."""
        return any(run[0] == task_id for run in self._runs.stack)

    def on_failure(self, sender: Any = None, task_id: str = "", exception: BaseException | None = None,
                   **_: Any) -> None:
        # A failure of a run in progress in this thread is counted by its postrun, with the rest of the run.
        if self._in_progress_here(task_id):
            return
        # A lost run is counted by the reaper (compact.py), from the dead process's in-progress gauge,
        # exactly once. Celery sends task_failure(WorkerLostError) from the worker main only when it
        # does not requeue the message (Request.on_failure: not acks_late + reject_on_worker_lost), so
        # counting it here would count that run twice, and a requeued run not at all. A Reject
        # (requeue=False) is reported by the worker main after the run's postrun counted the rejection.
        if isinstance(exception, (WorkerLostError, Reject)):
            return
        if task_id in self._ended:  # Celery's handling failed after the run's postrun counted it
            del self._ended[task_id]
            return
        # A hard time limit is the run's own outcome: the pool process's postrun counts it (the run ends
        # there with SystemExit when its limit is up). Should the pool process die before its postrun
        # (billiard SIGKILLs it 0.1 s after SIGTERM), the reaper counts the run as lost instead: one
        # outcome either way, where counting Celery's report here too made two.
        if isinstance(exception, TimeLimitExceeded):
            return
        name = self.task_name(sender.name)
        if name is None:
            return
        # No run in progress: the delivery failed before its run started (arguments Celery cannot
        # apply, a task the pool process does not know), so it has no start to balance.
        self.failed_before_start.labels(name, self.queue_of(sender.request), exception_name(exception)).inc()

    def on_retry(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """A retry of a run in this thread is counted by its postrun; one the worker main announces
        (a run cancelled when the broker connection was lost) is counted here."""
        if self._in_progress_here(getattr(request, "id", None)):
            return
        name = self.task_name(sender.name)
        if name is not None:
            self.retried.labels(name, self.queue_of(request)).inc()

    def receivers(self) -> list[tuple[Any, str, Callable[..., None]]]:
        """(signal, label, receiver) for every signal we use; each receiver is safe to connect as is."""
        return [
            (signals.before_task_publish, "before_task_publish", self.before_publish),
            (signals.after_task_publish, "after_task_publish", self.after_publish),
            (signals.task_received, "task_received", self.on_received),
            (signals.task_rejected, "task_rejected", self.guard("task_rejected", self.on_rejected)),
            (signals.task_unknown, "task_unknown", self.guard("task_unknown", self.on_rejected)),
            (signals.task_revoked, "task_revoked", self.guard("task_revoked", self.on_revoked)),
            (signals.task_prerun, "task_prerun", self.on_prerun),
            (signals.task_postrun, "task_postrun", self.on_postrun),
            (signals.task_failure, "task_failure", self.guard("task_failure", self.on_failure)),
            (signals.task_retry, "task_retry", self.guard("task_retry", self.on_retry)),
        ]

    def reserve(self) -> None:
        """Make the ledger the worker main's children count their errors and lost writes in (see store.Ledger)."""
        keys = [recorder.labels(signal).key for signal in self.signal_names()
                for recorder in (self.handler_errors, self.writes_lost)]
        self.store.reserve(keys)

    def signal_names(self) -> list[str]:
        worker_side = ["worker_tick", "worker_init", "worker_shutdown", "worker_compact", "beat_run"]
        return [label for _, label, _ in self.receivers()] + worker_side

    def connect(self) -> None:
        """Connect every receiver once; dispatch_uid makes a second call a no-op."""
        for signal, label, fn in self.receivers():
            signal.connect(fn, weak=False, dispatch_uid=f"celery_signal_exporter.{label}")
        cache_receivers()


def _request_of(task: Any) -> Any:
    """The request of the task's run in progress: what `task.request` returns mid-run.

    Read straight from Celery's `Local` (celery.utils.threads): `task.request_stack.top` reaches
    `Local.__getattr__` only after Python has raised and formatted an AttributeError, ~2 000
    instructions a read (callgrind), on every task. Anything unexpected (another Celery's
    locals, no run in progress) falls back to `.top`, which says the same.
    """
    try:
        local = task.request_stack._local
        return local.__storage__[local.__ident_func__()]["stack"][-1]
    except Exception:  # noqa: BLE001 - the documented way, slower
        return task.request_stack.top


def _hard_limit(request: Any, task: Any, worker_limit: Any) -> float | None:
    """The hard time limit the pool enforces on this run: the message's, else the task's, else the worker's."""
    limits = getattr(request, "timelimit", None)
    for limit in (limits[0] if isinstance(limits, (list, tuple)) and limits else None,
                  getattr(task, "time_limit", None), worker_limit):
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
            return float(limit)
    return None


def _take_run(runs: list[tuple[Any, float, float, _TaskSeries, Any]], task_id: Any) -> Any:
    """The record of `task_id` below the top of the stack, if any, taken with every record above it: those
    are runs whose postrun never came (Celery sends it in a `finally`, so none), and the stack cannot grow."""
    for i in range(len(runs) - 1, -1, -1):
        if runs[i][0] == task_id:
            run = runs[i]
            del runs[i:]
            return run
    return None


class _TaskSeries:
    """The pool-side series of one (task, queue), written together: one lock and one
    binding check per signal instead of one per series, since this runs on every task.

    Bound in three groups, each on first use, so that a series appears exactly when
    it would with one write per series: the run group (in progress, started, runtime,
    and CPU and memory growth when `task_resources` is on) on the first start, queue
    wait on the first due header, success on the first success.
    """

    def __init__(self, store: Store, in_progress: m.Series, started: m.Series, queue_wait: m.Series,
                 runtime: m.Series, succeeded: m.Series, last_success: m.Series, cpu: m.Series | None,
                 memory_growth: m.Series | None, peak: _Peak, name: str = "", queue: str = "") -> None:
        self.store = store
        self.name, self.queue = name, queue  # label values, for the outcomes other than success
        self.in_progress, self.started, self.queue_wait = in_progress, started, queue_wait
        self.runtime, self.succeeded, self.last_success = runtime, succeeded, last_success
        self.cpu, self.memory_growth, self.peak = cpu, memory_growth, peak
        self.wait_bounds, self.runtime_bounds = queue_wait.bounds, runtime.bounds
        self.growth_bounds = memory_growth.bounds if memory_growth is not None else []
        self.run_bound = self.wait_bound = self.success_bound = -1

    def _bind_run(self) -> None:
        # Every slot of the group is made before anything is written, so a write that
        # cannot grow its file (a full disk) fails whole and counts nothing.
        (self.live, (self.live_i,)), (self.counters, (self.started_i,)), (self.runtimes, self.runtime_i) = \
            self.in_progress.binding(), self.started.binding(), self.runtime.binding()
        if self.cpu is not None and self.memory_growth is not None:
            (self.cpus, (self.cpu_i,)), (self.growths, self.growth_i) = \
                self.cpu.binding(), self.memory_growth.binding()
        self.run_bound = self.store.generation

    def _bind_wait(self) -> None:
        self.waits, self.wait_i = self.queue_wait.binding()
        self.wait_bound = self.store.generation

    def _bind_success(self) -> None:
        (self.successes, (self.succeeded_i,)), (self.stamps, (self.last_i,)) = \
            self.succeeded.binding(), self.last_success.binding()
        self.success_bound = self.store.generation

    def start(self, wait: float | None) -> None:
        store = self.store
        with store.lock:
            if self.run_bound != store.generation:
                self._bind_run()
            if wait is not None and self.wait_bound != store.generation:
                self._bind_wait()
            self.live.values[self.live_i] += 1.0
            self.counters.values[self.started_i] += 1.0
            if wait is not None:  # write_observation inlined, here and in finish(): one call frame fewer each
                waits, index = self.waits.values, self.wait_i
                waits[index[bisect.bisect_left(self.wait_bounds, wait)]] += 1.0
                waits[index[-1]] += wait

    def finish(self, runtime: float | None, success_at: float | None, cpu: float = 0.0, maxrss: int = -1,
               ended: m.Series | None = None, gave_up: m.Series | None = None) -> None:
        """The live gauge back down, the runtime (and CPU and memory growth when `task_resources` is
        on), if the start was counted; the success, if any, or the counter of the run's other outcome
        (`ended`), in the same write. `maxrss` is the process's peak RSS now (getrusage units)."""
        store = self.store
        with store.lock:
            if runtime is not None and self.run_bound != store.generation:
                self._bind_run()
            if success_at is not None and self.success_bound != store.generation:
                self._bind_success()
            if ended is not None:  # bound under the lock, before anything is written: one write per run
                outcomes, (ended_i,) = ended.binding()
                if gave_up is not None:  # a failure after retries: both counters in the same write
                    exhausted, (gave_up_i,) = gave_up.binding()
                    exhausted.values[gave_up_i] += 1.0
                outcomes.values[ended_i] += 1.0
            if runtime is not None:
                self.live.values[self.live_i] -= 1.0
                runtimes, index = self.runtimes.values, self.runtime_i
                runtimes[index[bisect.bisect_left(self.runtime_bounds, runtime)]] += 1.0
                runtimes[index[-1]] += runtime
                if self.cpu is not None:
                    self.cpus.values[self.cpu_i] += cpu
                    # Compared under the lock, so that two threads finishing at once charge a rise once.
                    peak = self.peak
                    last = peak.maxrss
                    if maxrss > last >= 0:
                        peak.maxrss = maxrss
                        m.write_observation(self.growths.values, self.growth_i, self.growth_bounds,
                                            (maxrss - last) * _MAXRSS_BYTES)
                    else:  # no new peak, the common case: 0, the lowest bucket (bounds are > 0)
                        self.growths.values[self.growth_i[0]] += 1.0
            if success_at is not None:
                self.successes.values[self.succeeded_i] += 1.0
                # store.write_gauge inlined: the value, then its timestamp in the double after it (collect.py)
                stamps, last = self.stamps.values, self.last_i
                stamps[last] = stamps[last + 1] = success_at


class _PublishSeries:
    """The producer-side series of one (task, exchange, routing key): sent and, when `publish_timing`
    is on, publish time, bound together on the first publish and written under one lock."""

    def __init__(self, store: Store, sent: m.Series, publish: m.Series | None) -> None:
        self.store, self.sent, self.publish = store, sent, publish
        self.bounds = publish.bounds if publish is not None else []
        self.bound = -1

    def sent_one(self, took: float | None) -> None:
        """One publish, and how long it took when before_task_publish timed it."""
        store = self.store
        with store.lock:
            if self.bound != store.generation:
                self.counters, (self.sent_i,) = self.sent.binding()
                if self.publish is not None:
                    self.histograms, self.publish_i = self.publish.binding()
                self.bound = store.generation
            self.counters.values[self.sent_i] += 1.0
            if took is not None:  # write_observation inlined: 1 400 instructions fewer a publish (callgrind)
                values, index = self.histograms.values, self.publish_i
                values[index[bisect.bisect_left(self.bounds, took)]] += 1.0
                values[index[-1]] += took


def exception_name(exception: BaseException | None) -> str:
    """The class name of what the task raised.

    Celery replaces an exception it cannot pickle with UnpickleableExceptionWrapper
    before task_failure fires; the wrapper keeps the real class name, so use it.
    """
    if exception is None:
        return "unknown"
    name = type(exception).__name__
    if name == "UnpickleableExceptionWrapper":
        wrapped = getattr(exception, "exc_cls_name", None)
        if isinstance(wrapped, str) and wrapped:
            name = wrapped
    if len(name) > MAX_LABEL_LENGTH:  # a class made at run time can have any name
        return _long_exception_name(name)
    return name


_long_exceptions: dict[str, str] = {}


def _long_exception_name(name: str) -> str:
    """A too-long exception class name cut, the cut counted once per name and process."""
    short = _long_exceptions.get(name)
    if short is None:
        short = cut(name)
        if _active is not None:
            _active.truncated.labels("exception").inc()
        if len(_long_exceptions) < CACHE_LIMIT:
            _long_exceptions[name] = short
    return short


def _timestamp(eta: Any) -> float:
    if isinstance(eta, datetime):
        return eta.timestamp()
    return datetime.fromisoformat(str(eta)).timestamp()


_active: Instrumentation | None = None


def instrument(
    app: Celery,
    *,
    metrics_dir: str | None = None,
    runtime_buckets: Sequence[float] | str | None = None,
    queue_wait_buckets: Sequence[float] | str | None = None,
    memory_growth_buckets: Sequence[float] | str | None = None,
    publish_buckets: Sequence[float] | str | None = None,
    max_task_names: int = 500,
    max_queue_names: int = 100,
    ignore_tasks: Iterable[str] = (),
    heartbeat_interval: float = 2.0,
    schedule_refresh: float = 30.0,
    task_resources: bool = False,
    publish_timing: bool = False,
    exclude_metrics: str | None = None,
) -> Instrumentation:
    """Connect the exporter's signal receivers for `app`, once per process.

    A second call returns the instrumentation already in place, so importing
    an app module twice never double counts. Buckets not given come from
    CELERY_EXPORTER_RUNTIME_BUCKETS / CELERY_EXPORTER_QUEUE_WAIT_BUCKETS /
    CELERY_EXPORTER_PUBLISH_BUCKETS ("0.1,1,10", seconds) and
    CELERY_EXPORTER_MEMORY_GROWTH_BUCKETS (bytes), which `celery-signal-exporter
    check` validates, else the defaults.
    In a beat process (standalone or `worker -B`) the schedule is read at `beat_init` and
    again every `schedule_refresh` seconds (beat.py).

    Opt-in, because each costs more per task than the overhead budget allows (docs/design.md):
    `task_resources` (or CELERY_EXPORTER_TASK_RESOURCES=1) records each run's CPU seconds and
    memory growth; `publish_timing` (or CELERY_EXPORTER_PUBLISH_TIMING=1) each publish's time.
    Off, those series are absent and nothing is read for them.

    `exclude_metrics` (or CELERY_EXPORTER_EXCLUDE_METRICS): a regex of metric families this process
    records nothing of (options.py), e.g. "celery_task_queue_wait_seconds" for a team that does not
    want per-task queue-wait histograms; `check` names the alerts that would go blind.
    """
    global _active
    # Options are checked on every call, so a bad one fails loudly even where a first call won.
    runtime = check_buckets(or_env(runtime_buckets, "RUNTIME_BUCKETS", m.DEFAULT_RUNTIME_BUCKETS), "runtime_buckets")
    queue_wait = check_buckets(
        or_env(queue_wait_buckets, "QUEUE_WAIT_BUCKETS", m.DEFAULT_QUEUE_WAIT_BUCKETS), "queue_wait_buckets"
    )
    growth = check_buckets(
        or_env(memory_growth_buckets, "MEMORY_GROWTH_BUCKETS", m.DEFAULT_MEMORY_GROWTH_BUCKETS),
        "memory_growth_buckets", "bytes",
    )
    publish = check_buckets(or_env(publish_buckets, "PUBLISH_BUCKETS", m.DEFAULT_PUBLISH_BUCKETS), "publish_buckets")
    for option, cap in (("max_task_names", max_task_names), ("max_queue_names", max_queue_names)):
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"{option}: must be a whole number of at least 1, not {cap!r}")
    resources = switch(task_resources, "TASK_RESOURCES")
    timing = switch(publish_timing, "PUBLISH_TIMING")
    exclude = parse_exclude(exclude_metrics if exclude_metrics is not None else os.environ.get(EXCLUDE_ENV),
                            "exclude_metrics" if exclude_metrics is not None else EXCLUDE_ENV)
    if _active is not None:
        return _active
    options = Options(
        metrics_dir=resolve_metrics_dir(metrics_dir),
        runtime_buckets=runtime,
        queue_wait_buckets=queue_wait,
        memory_growth_buckets=growth,
        publish_buckets=publish,
        max_task_names=max_task_names,
        max_queue_names=max_queue_names,
        ignore_tasks=frozenset(ignore_tasks),
        heartbeat_interval=heartbeat_interval,
        schedule_refresh=schedule_refresh,
        task_resources=resources,
        publish_timing=timing,
        exclude=exclude,
    )
    inst = Instrumentation(app, options)
    inst.connect()
    install_worker_metrics(app, inst)
    install_beat_metrics(inst)
    _active = inst
    return inst

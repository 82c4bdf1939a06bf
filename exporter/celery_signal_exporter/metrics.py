"""Where every signal-side metric is defined: name, type, labels, help.

`docs/metrics.md` is the human copy of this module plus the broker-probe and
exporter metrics; a test keeps them equal. Recording happens in
`receivers.py` (task side) and `worker.py` (worker side).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from celery_signal_exporter.store import Doubles, MetricFile, Store, series_key, write_gauge

DEFAULT_RUNTIME_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)
DEFAULT_QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)


@dataclass(frozen=True)
class Spec:
    """One metric of the catalogue. `mode` is the multiprocess merge rule for gauges."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    mode: str = ""


TASK = ("name", "queue_name")

SENT = Spec("celery_task_sent", "counter", "Tasks published, counted by the producer.", TASK)
RECEIVED = Spec(
    "celery_task_received", "counter",
    "Task deliveries a worker took off a queue and accepted; a redelivered message counts again.", TASK,
)
REDELIVERED = Spec(
    "celery_task_redelivered", "counter",
    "Received deliveries the broker flagged as redelivered (restored or requeued after a first delivery).", TASK,
)
STARTED = Spec("celery_task_started", "counter", "Tasks that began executing.", TASK)
SUCCEEDED = Spec("celery_task_succeeded", "counter", "Tasks that returned successfully.", TASK)
FAILED = Spec(
    "celery_task_failed", "counter", "Tasks that raised; exception is the class name.",
    ("name", "queue_name", "exception"),
)
RETRIED = Spec("celery_task_retried", "counter", "Task executions that asked to be retried.", TASK)
REVOKED = Spec(
    "celery_task_revoked", "counter", "Tasks revoked, expired or terminated instead of completing.",
    ("name", "queue_name", "reason"),
)
REJECTED = Spec(
    "celery_task_rejected", "counter", "Messages the worker rejected: unknown task or bad format.",
    ("queue_name",),
)
RUNTIME = Spec("celery_task_runtime_seconds", "histogram", "Task execution time, prerun to postrun.", TASK)
QUEUE_WAIT = Spec(
    "celery_task_queue_wait_seconds", "histogram",
    "Time from when a task was due (publish, or its ETA) until it started.", TASK,
)
IN_PROGRESS = Spec(
    "celery_task_in_progress", "gauge", "Tasks executing right now.", TASK, mode="livesum",
)
LAST_SUCCESS = Spec(
    "celery_task_last_success_timestamp_seconds", "gauge",
    "When the task last succeeded, as a UNIX time.", ("name",), mode="max",
)
HEARTBEAT = Spec(
    "celery_worker_heartbeat_timestamp_seconds", "gauge",
    "Internal: the worker's last heartbeat; the exporter turns it into celery_worker_up.",
    ("hostname",), mode="mostrecent",
)
POOL_PROCESSES = Spec(
    "celery_worker_pool_processes", "gauge", "Pool size: processes or threads that run tasks.",
    ("hostname",), mode="livesum",
)
TASKS_ACTIVE = Spec(
    "celery_worker_tasks_active", "gauge", "Tasks the worker is executing now.",
    ("hostname",), mode="livesum",
)
DROPPED_LABELS = Spec(
    "celery_exporter_dropped_label_values", "counter",
    "Label values folded into the overflow value because a cap was reached.", ("label",),
)
LABELS_TRUNCATED = Spec(
    "celery_exporter_label_values_truncated", "counter",
    "Label values longer than the cap, cut to a prefix and a hash of the whole value.", ("label",),
)
HANDLER_ERRORS = Spec(
    "celery_exporter_handler_errors", "counter",
    "Signal handler errors swallowed so they never reach Celery.", ("signal",),
)

COMPACTED = Spec(
    "celery_exporter_compacted_processes", "counter",
    "Dead processes whose counter files were folded into the archive.", (),
)


def file_prefix(spec: Spec) -> str:
    return f"gauge_{spec.mode}" if spec.kind == "gauge" else spec.kind


def format_le(bound: float) -> str:
    """Bucket bound formatted as prometheus-client formats it."""
    if bound == math.inf:
        return "+Inf"
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


class Series:
    """One labelled series, writing straight into this process's file.

    Its slots are looked up once and kept as indexes into the file's doubles
    until the store changes (after a fork), so a write is one lock and one
    `values[i] += x`.
    """

    __slots__ = ("_bounds", "_file", "_generation", "_index", "_keys", "_prefix", "_store")

    def __init__(self, store: Store, spec: Spec, values: Sequence[str], buckets: Sequence[float]) -> None:
        labels = dict(zip(spec.labels, values, strict=True))
        self._store = store
        self._bounds: list[float] = list(buckets)
        if spec.kind == "counter":
            self._keys = [series_key(spec.name, spec.name + "_total", labels, spec.help)]
        elif spec.kind == "gauge":
            self._keys = [series_key(spec.name, spec.name, labels, spec.help)]
        else:
            self._keys = [
                series_key(spec.name, spec.name + "_bucket", {**labels, "le": format_le(b)}, spec.help)
                for b in self._bounds
            ] + [series_key(spec.name, spec.name + "_sum", labels, spec.help)]
        self._prefix = file_prefix(spec)
        self._generation = -1
        self._file: MetricFile | None = None
        self._index: list[int] = []

    def _current(self) -> MetricFile:
        f = self._file
        if f is None or self._generation != self._store.generation:
            f = self._store.file(self._prefix)
            self._index = [f.slot(k) >> 3 for k in self._keys]
            self._file = f
            self._generation = self._store.generation
        return f

    @property
    def bounds(self) -> list[float]:
        """A histogram's bucket upper bounds, +Inf last."""
        return self._bounds

    def binding(self) -> tuple[MetricFile, list[int]]:
        """The file and value indexes to write, for a caller that holds the store lock and
        writes several series at once (the per-task path in receivers.py)."""
        return self._current(), self._index

    def inc(self, amount: float = 1.0) -> None:
        with self._store.lock:
            self._current().values[self._index[0]] += amount

    def set(self, value: float, timestamp: float = 0.0) -> None:
        with self._store.lock:
            write_gauge(self._current().values, self._index[0], value, timestamp)

    def observe(self, value: float) -> None:
        with self._store.lock:
            write_observation(self._current().values, self._index, self._bounds, value)


def write_observation(values: Doubles, index: list[int], bounds: list[float], value: float) -> None:
    """One histogram observation: its (non-cumulative) bucket and the sum. The caller holds the store lock."""
    values[index[bisect.bisect_left(bounds, value)]] += 1.0
    values[index[-1]] += value


class Metric:
    """A spec bound to a store, with its series cached by label values."""

    def __init__(self, store: Store, spec: Spec, buckets: Sequence[float] = ()) -> None:
        self.spec = spec
        self._store = store
        finite = sorted(float(b) for b in buckets if b != math.inf)
        self._buckets = (*finite, math.inf) if spec.kind == "histogram" else ()
        self._series: dict[tuple[str, ...], Series] = {}

    def labels(self, *values: str) -> Series:
        series = self._series.get(values)
        if series is None:
            series = Series(self._store, self.spec, values, self._buckets)
            self._series[values] = series
        return series


ALL_SPECS: tuple[Spec, ...] = (
    SENT, RECEIVED, REDELIVERED, STARTED, SUCCEEDED, FAILED, RETRIED, REVOKED, REJECTED, RUNTIME, QUEUE_WAIT,
    IN_PROGRESS, LAST_SUCCESS, HEARTBEAT, POOL_PROCESSES, TASKS_ACTIVE, DROPPED_LABELS, LABELS_TRUNCATED,
    HANDLER_ERRORS, COMPACTED,
)

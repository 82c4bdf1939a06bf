"""What the worker's tick, its state and beat use of the instrumentation, and its options.

The worker and beat modules take a `Host` instead of the whole `Instrumentation`, so they do not
import receivers.py (which imports them to install their steps): no import cycle, and what they may
touch is written down here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery

from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.queues import QueueResolver
from celery_signal_exporter.recording.store import Store


@dataclass(frozen=True)
class Options:
    metrics_dir: str
    runtime_buckets: tuple[float, ...] = m.DEFAULT_RUNTIME_BUCKETS
    queue_wait_buckets: tuple[float, ...] = m.DEFAULT_QUEUE_WAIT_BUCKETS
    memory_growth_buckets: tuple[float, ...] = m.DEFAULT_MEMORY_GROWTH_BUCKETS
    publish_buckets: tuple[float, ...] = m.DEFAULT_PUBLISH_BUCKETS
    max_task_names: int = 500
    max_queue_names: int = 100
    ignore_tasks: frozenset[str] = frozenset()
    heartbeat_interval: float = 2.0
    schedule_refresh: float = 30.0
    #: Opt-in per-run CPU seconds and memory growth: two clock reads and a getrusage per run cost more than
    #: the per-task budget (docs/design.md, *Overhead in instructions*), so they are off unless asked for
    #: (`task_resources`).
    task_resources: bool = False
    #: Opt-in publish latency: a clock read in each publish signal and a histogram write (`publish_timing`).
    publish_timing: bool = False
    #: Families recorded nowhere (`exclude_metrics`, options.py).
    exclude: re.Pattern[str] | None = None


class Host(Protocol):
    """The instrumentation as the worker main's tick, its state and beat see it (receivers.Instrumentation)."""

    app: Celery
    options: Options
    store: Store
    queues: QueueResolver
    dropped: m.Recorder
    truncated: m.Recorder
    handler_errors: m.Recorder
    writes_lost: m.Recorder
    #: The worker's hard time limit (`--time-limit`, `task_time_limit`), set at worker_init (worker.py).
    worker_time_limit: Any

    def handler_failed(self, signal: str, exc: BaseException) -> None:
        """Count (and log once) an error a receiver or a tick caught instead of raising into Celery."""

    def signal_names(self) -> list[str]:
        """The `signal` labels of the error counters, every receiver and tick."""

    def reserve(self) -> None:
        """Prepare, before the pool forks, where the children count what they cannot write."""

    def task_name(self, raw: Any, count: bool = True) -> str | None:
        """The label for a task name; None for an ignored task."""

    def queue_label(self, queue: str, count: bool = True) -> str:
        """The label for a queue name, past the cap folded."""

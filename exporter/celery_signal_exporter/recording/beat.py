"""Periodic tasks watched from the beat schedule itself.

Beat side (standalone `celery beat`, or a worker started with `-B`): at
`beat_init` the scheduler's `tick` and `apply_async` are wrapped on the
instance. Both run on beat's own thread, so the schedule is only ever read
where beat itself reads it, and nothing per entry does network I/O:

- every `schedule_refresh` seconds, after one of beat's ticks, each entry's
  interval and next due time are written; entries gone from the schedule
  have their gauges written 0, which the merge (collect.py) leaves out, so a
  removed entry's series goes. Database-backed schedulers (django-celery-beat,
  RedBeat) are followed because beat's own `schedule` property reloads them.
- each dispatch writes the entry's last dispatch, next due and dispatch count,
  or its failure, and puts the entry's name (`csx_entry`) and the next due
  time (`csx_next_due`) in the message headers.
- a heartbeat on a daemon thread, since beat sleeps up to
  `beat_max_loop_interval` between ticks; the exporter turns it into
  `celery_beat_up`.

Worker side: a run whose request carries `csx_entry` is counted per entry
by `BeatRuns`, called once from prerun, postrun and task_revoked in
receivers.py: runs in progress, starts, last success, overlaps (a run still
in progress when its entry's next run was due) and expirations.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import datetime, timedelta
from typing import Any

from celery import signals

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.directory import read_entries
from celery_signal_exporter.headers import BEAT_RUN_ATTR, ENTRY_HEADER, NEXT_DUE_HEADER
from celery_signal_exporter.labels import cut
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.host import Host
from celery_signal_exporter.recording.queues import CACHE_LIMIT
from celery_signal_exporter.recording.tick import TickThread

#: The `signal` labels beat's own errors count under in celery_exporter_handler_errors_total.
BEAT_SIGNALS = ("beat_init", "beat_tick", "beat_schedule", "beat_dispatch", "beat_shutdown")


def _seconds(delta: Any) -> float:
    return float(delta.total_seconds()) if hasattr(delta, "total_seconds") else float(delta)


def _aware_now(schedule: Any) -> datetime:
    now = schedule.now()
    made: datetime = schedule.maybe_make_aware(now) if hasattr(schedule, "maybe_make_aware") else now
    return made


def next_due_after(schedule: Any, last_run_at: datetime | None) -> float | None:
    """The UNIX time an entry last run at `last_run_at` is next due; None if the schedule cannot say."""
    estimate = getattr(schedule, "remaining_estimate", None)
    if estimate is None or last_run_at is None:
        return None
    return time.time() + _seconds(estimate(last_run_at))


def interval_of(schedule: Any) -> float | None:
    """Seconds between runs: `run_every` for interval schedules; for crontab and other schedules,
    the gap between the next due time and the one after it."""
    run_every = getattr(schedule, "run_every", None)
    if run_every is not None:
        return _seconds(run_every)
    estimate = getattr(schedule, "remaining_estimate", None)
    if estimate is None:
        return None
    now = _aware_now(schedule)
    first = now + estimate(now)  # the next due time after a run now
    # The one after a run at `first`. Each estimate reads the clock anew, so `first` can land a hair before
    # the due time it stands for; a quarter second later is past it, and short of any sane schedule's next.
    second = now + estimate(first + timedelta(seconds=0.25))
    gap = round(_seconds(second - first), 3)  # the clock reads between the estimates are µs apart
    return gap if gap > 0 else None


class BeatMetrics:
    """The beat process's series: per-entry schedule and dispatches, and its heartbeat."""

    def __init__(self, inst: Host, refresh: float) -> None:
        self.inst = inst
        self.refresh = refresh
        s = inst.store
        self.heartbeat = m.Recorder(s, c.BEAT_HEARTBEAT)
        self.interval = m.Recorder(s, c.BEAT_ENTRY_INTERVAL)
        self.next_due = m.Recorder(s, c.BEAT_ENTRY_NEXT_DUE)
        self.last_dispatch = m.Recorder(s, c.BEAT_ENTRY_LAST_DISPATCH)
        self.dispatched = m.Recorder(s, c.BEAT_ENTRY_DISPATCHED)
        self.failures = m.Recorder(s, c.BEAT_ENTRY_DISPATCH_FAILURES)
        self.hostname = cut(socket.gethostname())
        self.known: set[tuple[str, str]] = set()  # (entry, task) labels of the entries last read
        self.read_at = 0.0

    def labels(self, entry: Any) -> tuple[str, str]:
        return cut(str(entry.name)), cut(str(entry.task))

    def beat(self) -> None:
        try:
            now = time.time()
            self.heartbeat.labels(self.hostname).set(now, now)
        except Exception as exc:  # noqa: BLE001 - never raise into beat
            self.inst.handler_failed("beat_tick", exc)

    def stopped(self) -> None:
        """Graceful shutdown: beat is down at once, not after the timeout."""
        try:
            self.heartbeat.labels(self.hostname).set(0.0, time.time())
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("beat_shutdown", exc)

    def read_schedule(self, scheduler: Any) -> None:
        """Write every entry's interval and next due time; zero the gauges of entries that left."""
        try:
            now = time.time()
            self.read_at = now
            seen: set[tuple[str, str]] = set()
            for entry in list(scheduler.schedule.values()):
                labels = self.labels(entry)
                seen.add(labels)
                if labels not in self.known:
                    self.failures.labels(*labels).inc(0)  # at 0 from the start, so increase() sees the first
                every = interval_of(entry.schedule)
                if every is not None:
                    self.interval.labels(*labels).set(every, now)
                due = next_due_after(entry.schedule, entry.last_run_at)
                if due is not None:
                    self.next_due.labels(*labels).set(due, now)
            for labels in self.known - seen:
                for gauge in (self.interval, self.next_due, self.last_dispatch):
                    gauge.labels(*labels).set(0.0, now)  # 0: the merge leaves it out
            self.known = seen
        except Exception as exc:  # noqa: BLE001 - never raise into beat
            self.inst.handler_failed("beat_schedule", exc)

    def dispatching(self, entry: Any) -> tuple[tuple[str, str], float | None] | None:
        """Before a dispatch: the entry's labels and its next due time, for the headers."""
        try:
            due = next_due_after(entry.schedule, _aware_now(entry.schedule))
            return self.labels(entry), due
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("beat_dispatch", exc)
            return None

    def dispatched_one(self, labels: tuple[str, str], due: float | None, ok: bool) -> None:
        try:
            now = time.time()
            if ok:
                self.last_dispatch.labels(*labels).set(now, now)
                self.dispatched.labels(*labels).inc()
                if due is not None:
                    self.next_due.labels(*labels).set(due, now)
            else:
                self.failures.labels(*labels).inc()
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("beat_dispatch", exc)

    def wrap(self, scheduler: Any) -> None:
        """Wrap the scheduler's tick (to re-read the schedule) and apply_async (headers, dispatches)."""
        tick, apply_async = scheduler.tick, scheduler.apply_async
        metrics = self

        def wrapped_tick(*args: Any, **kwargs: Any) -> Any:
            result = tick(*args, **kwargs)
            if time.time() - metrics.read_at >= metrics.refresh:
                metrics.read_schedule(scheduler)
            return result

        def wrapped_apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
            found = metrics.dispatching(entry)
            if found is None:
                return apply_async(entry, *args, **kwargs)
            labels, due = found
            original = entry.options
            headers = {**(original.get("headers") or {}), ENTRY_HEADER: labels[0]}
            if due is not None:
                headers[NEXT_DUE_HEADER] = due
            entry.options = {**original, "headers": headers}
            try:
                result = apply_async(entry, *args, **kwargs)
            except Exception:
                metrics.dispatched_one(labels, due, ok=False)
                raise  # Celery's own error: beat logs it and goes on
            finally:
                entry.options = original  # what beat persists stays the user's
            metrics.dispatched_one(labels, due, ok=True)
            return result

        scheduler.tick = wrapped_tick
        scheduler.apply_async = wrapped_apply_async


def entries_on_disk(directory: str) -> set[tuple[str, str]]:
    """(entry, task) of every schedule entry a beat wrote a next due time for into `directory`, not zeroed.

    Read once at beat_init, from local files; a file that cannot be read is passed over.
    """
    found: set[tuple[str, str]] = set()
    try:
        names = [n for n in os.listdir(directory) if n.startswith("gauge_mostrecent_") and n.endswith(".db")]
    except OSError:
        return found
    for filename in names:
        try:
            with open(os.path.join(directory, filename), "rb") as f:
                data = f.read()
            for key, value, _ in read_entries(data):
                metric, _, labels, _ = json.loads(key)
                if metric == c.BEAT_ENTRY_NEXT_DUE.name and value != 0.0:
                    found.add((str(labels.get("entry", "")), str(labels.get("name", ""))))
        except (OSError, ValueError, TypeError, AttributeError):  # damaged or foreign: not ours to judge
            continue
    return found


def install_beat_metrics(inst: Host) -> None:
    """Watch the schedule in whichever process runs beat (standalone or `-B`)."""

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        try:
            metrics = BeatMetrics(inst, inst.options.schedule_refresh)
            # A beat restarted on the same directory (a container restart) finds its predecessor's entries:
            # those no longer scheduled are zeroed at the first read, or their frozen due times would page.
            metrics.known = entries_on_disk(inst.options.metrics_dir)
            for signal in BEAT_SIGNALS:
                inst.handler_errors.labels(signal).inc(0)  # at 0 from the start, so rate() works from the first
            metrics.beat()
            thread = TickThread(inst.options.heartbeat_interval, metrics.beat)
            scheduler = sender.scheduler
            metrics.wrap(scheduler)
            metrics.read_schedule(scheduler)
            close = scheduler.close

            def closing(*args: Any, **kwargs: Any) -> Any:
                thread.stop()
                metrics.stopped()
                return close(*args, **kwargs)

            scheduler.close = closing
        except Exception as exc:  # noqa: BLE001 - never raise into beat
            inst.handler_failed("beat_init", exc)

    signals.beat_init.connect(on_beat_init, weak=False, dispatch_uid="celery_signal_exporter.beat_init")


class BeatRuns:
    """Per-entry series of runs, written in pool processes for requests that carry `csx_entry`."""

    def __init__(self, inst: Host) -> None:
        self.inst = inst
        s = inst.store
        self.running = m.Recorder(s, c.BEAT_ENTRY_RUNNING)
        self.started = m.Recorder(s, c.BEAT_ENTRY_STARTED)
        self.last_success = m.Recorder(s, c.BEAT_ENTRY_LAST_SUCCESS)
        self.overlaps = m.Recorder(s, c.BEAT_ENTRY_OVERLAPS)
        self.expired = m.Recorder(s, c.BEAT_ENTRY_EXPIRED)
        self.seen: set[tuple[str, str]] = set()

    def start(self, request: Any, entry: Any, name: str) -> None:
        try:
            labels = cut(str(entry)), cut(name)
            if labels not in self.seen and len(self.seen) < CACHE_LIMIT:
                self.seen.add(labels)
                self.overlaps.labels(*labels).inc(0)  # at 0 from the first run, so increase() sees the first
            self.started.labels(*labels).inc()
            self.running.labels(*labels).inc()
            due = getattr(request, NEXT_DUE_HEADER, None)
            due = float(due) if isinstance(due, (int, float)) and math.isfinite(due) else None
            setattr(request, BEAT_RUN_ATTR, (labels, time.time(), due))
        except Exception as exc:  # noqa: BLE001 - never raise into Celery
            self.inst.handler_failed("beat_run", exc)

    def finish(self, request: Any, success: bool) -> None:
        try:
            run = getattr(request, BEAT_RUN_ATTR, None)
            if run is None:
                return
            setattr(request, BEAT_RUN_ATTR, None)
            labels, began, due = run
            now = time.time()
            self.running.labels(*labels).inc(-1.0)
            if success:
                self.last_success.labels(*labels).set(now, now)
            if due is not None and began < due < now:
                self.overlaps.labels(*labels).inc()
        except Exception as exc:  # noqa: BLE001
            self.inst.handler_failed("beat_run", exc)

    def revoked(self, request: Any, name: str, expired: bool) -> None:
        entry = getattr(request, ENTRY_HEADER, None)
        if expired and entry is not None:
            self.expired.labels(cut(str(entry)), cut(name)).inc()

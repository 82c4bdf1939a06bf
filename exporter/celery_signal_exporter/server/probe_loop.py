"""Run one broker probe on its own clock, off the scrape path.

A scrape only reads what the last probe cycle left behind, so a slow or dead
broker can never make `/metrics` slow or fail: it shows up as
`celery_broker_up 0` and counted probe errors instead.

Each cycle runs the probe in a fresh daemon thread and waits at most
`timeout` for it. A call that overruns counts as a `timeout` error; while it
is still stuck no new call is started, so hung calls never pile up threads.
The probe's own socket timeouts (set from the same value) make the stuck call
end by itself, and the next cycle reconnects.

A probe that can read its broker's resource alarms live (`AlarmWatch`: RabbitMQ)
is also asked for them on a fast cadence of its own, in a second thread, and
every check that finds an alarm raised is counted: a counter keeps each burst
of an alarm that flaps for seconds, which a gauge sampled by 30 s scrapes misses.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.catalogue import Spec
from celery_signal_exporter.probes.base import (
    ALARM_RESOURCES,
    ERROR_REASONS,
    AlarmWatch,
    BrokerSnapshot,
    Probe,
    ProbeError,
    QueueStats,
)
from celery_signal_exporter.redact import redact_url, scrub
from celery_signal_exporter.server.config import ServeConfig

log = logging.getLogger("celery_signal_exporter")  # one logger for the whole exporter, as in the other modules

#: Ask the broker for its queue names (Redis: kombu bindings) every N cycles: costlier than a snapshot.
DISCOVER_EVERY = 20


@dataclass
class _Result:
    """What one cycle's worker thread hands back to the scheduler."""

    snapshot: BrokerSnapshot | None = None
    dropped: int = 0
    reason: str = ""
    cause: str = ""
    message: str = ""
    discovered: set[str] | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ProbeLoop:
    """Probe one broker every `config.probe_interval` seconds and serve the result as metrics."""

    def __init__(
        self,
        probe: Probe,
        url: str,
        config: ServeConfig | None = None,
        known_queues: Callable[[], Iterable[str]] | None = None,
        discover_every: int = DISCOVER_EVERY,
    ) -> None:
        if discover_every < 1:
            raise ValueError("discover_every must be >= 1")
        self.probe = probe
        #: Read for the probe interval and timeout, the queues to report and the cap on them.
        self.config = config or ServeConfig()
        self.discover_every = discover_every
        self.broker = redact_url(url)
        self._url = url
        #: The instrumentation's seen queues; settable after construction.
        self.known_queues = known_queues
        self._include = [re.compile(p) for p in self.config.queue_include]
        self._exclude = [re.compile(p) for p in self.config.queue_exclude]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: threading.Thread | None = None
        self._cycle = 0
        self._discovered: set[str] = set()
        self._discovery_due = True
        # Guarded by _lock: everything collect() and ready() read.
        self._snapshot: BrokerSnapshot | None = None
        self._up = False
        self._last_success: float | None = None
        self._duration: float | None = None
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._dropped_total = 0
        self._last_failure = ""
        # The alarm watch (None for brokers without one); guarded by _lock like the above.
        self._watch = probe if isinstance(probe, AlarmWatch) else None
        self._watch_thread: threading.Thread | None = None
        self._alarm_checks = 0
        self._alarm_raised: dict[tuple[str, str], int] = {}  # (node, resource) -> checks that saw it
        self._alarms_now: set[tuple[str, str]] | None = None  # the last check's answer; None after a failure
        self._watch_failing = False
        self._known_nodes: set[str] = set()
        self._counters: dict[Spec, float] = {}  # the probe's own counters, as of its last snapshot

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start probing in the background; the first cycle runs at once."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"probe-loop {self.broker}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and release the probe's connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.probe_timeout + 1)
            self._thread = None
        if self._watch_thread is not None:
            self._watch_thread.join(self.config.probe_timeout + 1)
            self._watch_thread = None
        try:
            self.probe.close()
        except Exception as exc:  # noqa: BLE001 - shutting down; report, never raise
            log.debug("closing probe for %s: %s", self.broker, type(exc).__name__)

    def _run(self) -> None:
        next_run = time.monotonic()
        while not self._stop.is_set():
            self.probe_once()
            if self._watch is not None and self._watch_thread is None:
                # After the first snapshot, which names the nodes whose alarm counters start at 0.
                self._watch_thread = threading.Thread(target=self._watch_alarms, args=(self._watch,),
                                                      name=f"alarm watch {self.broker}", daemon=True)
                self._watch_thread.start()
            next_run += self.config.probe_interval
            now = time.monotonic()
            next_run = max(next_run, now)  # after a long stall, don't burst to catch up
            self._stop.wait(next_run - now)

    # -- one cycle ----------------------------------------------------------

    def probe_once(self) -> bool:
        """Run one probe cycle now (bounded by the timeout); True on success."""
        started = time.monotonic()
        if self._inflight is not None and self._inflight.is_alive():
            self._record_failure("timeout", "timeout", "the previous probe call is still running", started)
            return False
        result = _Result()
        discover = self._discovery_due or self._cycle % self.discover_every == 0
        self._cycle += 1
        worker = threading.Thread(
            target=self._attempt, args=(result, discover), name=f"probe {self.broker}", daemon=True
        )
        worker.start()
        if not result.done.wait(self.config.probe_timeout):
            self._inflight = worker
            self._record_failure("timeout", "timeout", f"no answer within {self.config.probe_timeout:g}s", started)
            return False
        self._inflight = None
        if result.discovered is not None:
            self._discovered = result.discovered
            self._discovery_due = False
        if result.snapshot is None:
            self._record_failure(result.reason, result.cause, result.message, started)
            return False
        self._record_success(result.snapshot, result.dropped, started)
        return True

    def _watch_alarms(self, watch: AlarmWatch) -> None:
        """The alarm watch thread: one check every `alarm_interval`, never catching up after a stall.
        A check that hangs is bounded by the probe's own HTTP timeout and only delays the next."""
        next_run = time.monotonic()
        while not self._stop.is_set():
            self.check_alarms_once()
            next_run += watch.alarm_interval
            now = time.monotonic()
            next_run = max(next_run, now)
            self._stop.wait(next_run - now)

    def check_alarms_once(self) -> bool:
        """Ask the probe for the alarms raised now and count them; True on an answer. A failed check
        is counted as a probe error by reason; it does not mark the broker down (snapshots do)."""
        if self._watch is None:
            return False
        try:
            answer = self._watch.alarms()
        except Exception as exc:  # noqa: BLE001 - a probe bug must not kill the watch
            reason, cause, message = ("other", type(exc).__name__, str(exc))
            if isinstance(exc, ProbeError):
                reason, cause, message = exc.reason, exc.cause, exc.message
            with self._lock:
                self._errors[reason if reason in self._errors else "other"] += 1
                self._alarms_now = None
                first, self._watch_failing = not self._watch_failing, True
            log.log(logging.WARNING if first else logging.DEBUG, "broker %s alarm check failed (%s): %s: %s",
                    self.broker, reason, cause, scrub(message, self._url))
            return False
        raised = {(node, resource) for node, resource in answer.raised if resource in ALARM_RESOURCES}
        with self._lock:
            self._known_nodes.update(answer.nodes)
            self._count_check(raised)
            self._alarms_now = raised
            self._watch_failing = False
        return True

    def _count_check(self, raised: set[tuple[str, str]]) -> None:
        """One alarm check and what it found raised; the caller holds `_lock`."""
        self._alarm_checks += 1
        for key in raised:
            self._alarm_raised[key] = self._alarm_raised.get(key, 0) + 1
        self._known_nodes.update(node for node, _ in raised)

    def _attempt(self, result: _Result, discover: bool) -> None:
        """The worker thread: all broker I/O of a cycle happens here."""
        try:
            if discover:
                result.discovered = self.probe.discover()
            discovered = result.discovered if result.discovered is not None else self._discovered
            candidates = set(self.config.queues) | self._known() | discovered
            wanted = self._select(candidates)
            snapshot = self.probe.snapshot(set(wanted))
            # RabbitMQ lists every queue, so filter and cap what came back too.
            keep = self._select(candidates | {q.name for q in snapshot.queues})
            kept = set(keep)
            result.dropped = len(self._filtered(candidates | {q.name for q in snapshot.queues})) - len(keep)
            result.snapshot = BrokerSnapshot(
                queues=[q for q in snapshot.queues if q.name in kept],
                nodes=snapshot.nodes,
                unacked_total=snapshot.unacked_total,
                counters=snapshot.counters,
            )
        except ProbeError as exc:
            result.reason, result.cause, result.message = exc.reason, exc.cause, exc.message
        except Exception as exc:  # noqa: BLE001 - a probe bug must not kill the loop
            result.reason, result.cause, result.message = "other", type(exc).__name__, str(exc)
        finally:
            result.done.set()

    def _known(self) -> set[str]:
        if self.known_queues is None:
            return set()
        try:
            return set(self.known_queues())
        except Exception as exc:  # noqa: BLE001 - the caller's callback must not stop probing
            log.warning("known_queues() failed for %s: %s", self.broker, type(exc).__name__)
            return set()

    def _filtered(self, names: Iterable[str]) -> set[str]:
        return {
            n
            for n in names
            if (not self._include or any(p.fullmatch(n) for p in self._include))
            and not any(p.fullmatch(n) for p in self._exclude)
        }

    def _select(self, names: Iterable[str]) -> list[str]:
        """Filtered names, configured queues first then alphabetical, capped."""
        allowed = self._filtered(names)
        configured = [q for q in dict.fromkeys(self.config.queues) if q in allowed]
        rest = sorted(allowed - set(configured))
        return (configured + rest)[: self.config.max_queues]

    def _record_success(self, snapshot: BrokerSnapshot, dropped: int, started: float) -> None:
        with self._lock:
            was_up = self._up
            self._snapshot = snapshot
            self._up = True
            self._last_success = time.time()
            self._duration = time.monotonic() - started
            self._dropped_total += max(0, dropped)
            self._counters.update(snapshot.counters)
            # Nodes that can raise alarms (RabbitMQ's, not Redis's) get their alarm counters at 0.
            alarming = [n for n in snapshot.nodes if n.memory_alarm is not None or n.disk_alarm is not None]
            self._known_nodes.update(n.node for n in alarming)
            if alarming and self._watch is None:
                # A probe without a fast watch: each snapshot's reading is the alarm check.
                self._count_check({(n.node, "memory") for n in alarming if n.memory_alarm}
                                  | {(n.node, "disk") for n in alarming if n.disk_alarm})
            self._last_failure = ""
        if not was_up:
            log.info("broker %s up: %d queues", self.broker, len(snapshot.queues))
        if dropped > 0:
            log.debug("broker %s: %d queues over the cap of %d", self.broker, dropped, self.config.max_queues)

    def _record_failure(self, reason: str, cause: str, message: str, started: float) -> None:
        message = scrub(message, self._url)
        self._discovery_due = True  # the broker may come back without its bindings
        with self._lock:
            was_up = self._up
            first = self._last_success is None and not self._last_failure
            self._up = False
            self._snapshot = None  # never serve stale depths as current ones
            self._duration = time.monotonic() - started
            self._errors[reason if reason in self._errors else "other"] += 1
            self._last_failure = cause
        level = logging.WARNING if was_up or first else logging.DEBUG
        log.log(level, "broker %s probe failed (%s): %s: %s", self.broker, reason, cause, message)

    # -- what a scrape sees ---------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Ready once a probe has succeeded (it stays ready: a later outage is
        `celery_broker_up 0`, which needs the scrape to keep working)."""
        with self._lock:
            if self._last_success is not None:
                return True, f"broker {self.broker} probed"
            if not self._last_failure:
                return False, f"broker {self.broker} not probed yet"
            return False, f"broker {self.broker} not reachable: {self._last_failure}"

    def collect(self) -> Iterator[Metric]:
        """Metric families from cached state only: no broker I/O here."""
        with self._lock:
            snapshot, up = self._snapshot, self._up
            last_success, duration = self._last_success, self._duration
            errors, dropped = dict(self._errors), self._dropped_total
            alarm_checks, alarm_raised = self._alarm_checks, dict(self._alarm_raised)
            alarms_now, known_nodes = self._alarms_now, sorted(self._known_nodes)
            counters = dict(self._counters)
        b = [self.broker]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "length": c.family(c.QUEUE_LENGTH),
            "unacked": c.family(c.QUEUE_UNACKED),
            "consumers": c.family(c.QUEUE_CONSUMERS),
            "age": c.family(c.QUEUE_OLDEST_AGE),
            "broker_unacked": c.family(c.BROKER_UNACKED),
            "up": c.family(c.BROKER_UP),
            "mem_used": c.family(c.BROKER_MEMORY_USED),
            "mem_limit": c.family(c.BROKER_MEMORY_LIMIT),
            "mem_alarm": c.family(c.BROKER_MEMORY_ALARM),
            "disk_alarm": c.family(c.BROKER_DISK_ALARM),
            "alarm_checks": c.family(c.BROKER_ALARM_CHECKS),
            "memory_raised": c.family(c.BROKER_MEMORY_ALARM_RAISED),
            "disk_raised": c.family(c.BROKER_DISK_ALARM_RAISED),
            "duration": c.family(c.PROBE_DURATION),
            "last_success": c.family(c.PROBE_LAST_SUCCESS),
            "errors": c.family(c.PROBE_ERRORS),
            "dropped": c.family(c.PROBE_QUEUES_DROPPED),
        }
        families["up"].add_metric(b, 1.0 if up else 0.0)
        for reason, count in errors.items():
            families["errors"].add_metric([self.broker, reason], count)
        families["dropped"].add_metric(b, dropped)
        for spec, total in counters.items():  # kept through an outage: a counter must not vanish
            families.setdefault(spec.name, c.family(spec)).add_metric(b, total)
        if duration is not None:
            families["duration"].add_metric(b, duration)
        if last_success is not None:
            families["last_success"].add_metric(b, last_success)
        if snapshot is not None:
            _add_snapshot(families, self.broker, snapshot, alarm_states=alarms_now is None)
        if alarms_now is not None:
            # The last alarm check answered: its live state, for every node, wins over the snapshot's
            # (which lags by the statistics interval and lacks a node until its first statistics).
            for node in known_nodes:
                families["mem_alarm"].add_metric([self.broker, node], float((node, "memory") in alarms_now))
                families["disk_alarm"].add_metric([self.broker, node], float((node, "disk") in alarms_now))
        if self._watch is not None or known_nodes:
            families["alarm_checks"].add_metric(b, alarm_checks)
            # Every node a snapshot or a check named, at 0 until seen raised, so that `increase()`
            # sees the first raise of a node (a series born at 1 reads no increase).
            for node in known_nodes:
                families["memory_raised"].add_metric([self.broker, node], alarm_raised.get((node, "memory"), 0))
                families["disk_raised"].add_metric([self.broker, node], alarm_raised.get((node, "disk"), 0))
        yield from families.values()


def _add_snapshot(
    families: dict[str, GaugeMetricFamily | CounterMetricFamily],
    broker: str,
    snapshot: BrokerSnapshot,
    alarm_states: bool = True,
) -> None:
    """`alarm_states` False leaves the alarm gauges to the alarm watch's last answer."""
    for q in snapshot.queues:
        _add_queue(families, q)
    if snapshot.unacked_total is not None:
        families["broker_unacked"].add_metric([broker], snapshot.unacked_total)
    for node in snapshot.nodes:
        labels = [broker, node.node]
        families["mem_used"].add_metric(labels, node.memory_used_bytes)
        families["mem_limit"].add_metric(labels, node.memory_limit_bytes)
        if alarm_states and node.memory_alarm is not None:
            families["mem_alarm"].add_metric(labels, float(node.memory_alarm))
        if alarm_states and node.disk_alarm is not None:
            families["disk_alarm"].add_metric(labels, float(node.disk_alarm))


def _add_queue(families: dict[str, GaugeMetricFamily | CounterMetricFamily], q: QueueStats) -> None:
    labels = [q.name, q.vhost]
    families["length"].add_metric(labels, q.length)
    if q.unacked is not None:
        families["unacked"].add_metric(labels, q.unacked)
    if q.consumers is not None:
        families["consumers"].add_metric(labels, q.consumers)
    if q.oldest_message_age_seconds is not None:
        families["age"].add_metric(labels, q.oldest_message_age_seconds)
    for spec, measure in q.measures:
        families.setdefault(spec.name, c.family(spec)).add_metric(labels, measure)


def collect_all(loops: Sequence[ProbeLoop]) -> list[Metric]:
    """One family per metric name over several brokers' loops, for a single
    collector: a registry must not see the same family name twice."""
    merged: dict[str, Metric] = {}
    for loop in loops:
        for family in loop.collect():
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    return list(merged.values())


class ProbeGroup:
    """Several brokers' loops as one metrics source, so each family is
    exposed once (a second `# TYPE` line for a name breaks the scrape)."""

    def __init__(self, loops: Iterable[ProbeLoop]) -> None:
        self.loops = list(loops)

    @property
    def known_queues(self) -> Callable[[], Iterable[str]] | None:
        return self.loops[0].known_queues if self.loops else None

    @known_queues.setter
    def known_queues(self, known: Callable[[], Iterable[str]] | None) -> None:
        for loop in self.loops:
            loop.known_queues = known

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()

    def ready(self) -> tuple[bool, str]:
        """Ready when every broker has been probed once."""
        for loop in self.loops:
            ok, reason = loop.ready()
            if not ok:
                return False, reason
        return True, f"{len(self.loops)} broker(s) probed"

    def collect(self) -> Iterator[Metric]:
        yield from collect_all(self.loops)


"""The one place that sets thresholds, windows, selectors and dashboard filters.

Rules, dashboards and their tests are all generated from a `Config`, so a user
who changes a threshold here (or in a YAML file passed to
`python -m celery_signal_exporter.mixin --config`) gets rules, dashboards and tests that agree.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(duration: str) -> float:
    """A Prometheus duration ("15m") in seconds, for thresholds written as durations."""
    m = _DURATION.match(duration)
    if not m:
        raise ValueError(f"not a Prometheus duration: {duration!r} (expected e.g. 30s, 15m, 2h)")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def matcher(label: str, value: str, op: str = "=~") -> str:
    """A label matcher with the value quoted as PromQL wants it."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{label}{op}"{escaped}"'


@dataclass(frozen=True)
class PeriodicTask:
    """Tasks (by name regex) that beat runs, and how stale their last success may get."""

    name_regex: str
    max_age: str


@dataclass(frozen=True)
class RunLimit:
    """How long runs of tasks (by name regex) may take when the task has no Celery time limit."""

    name_regex: str
    max_age: str


@dataclass(frozen=True)
class RuntimeObjective:
    """Runs of tasks (by name regex) on an objective's queues: `target` of them finish `within`."""

    task: str
    within: str
    target: float = 0.99


@dataclass(frozen=True)
class QueueObjective:
    """How long tasks of queues (by name regex) may wait: `target` of them start `wait` after their
    publish (ETA and countdown tasks from when they were due). `wait` must be a bucket boundary of
    celery_task_queue_wait_seconds, so the share within it is read exactly from the histogram."""

    queue: str
    wait: str
    target: float = 0.99
    runtime: tuple[RuntimeObjective, ...] = ()


@dataclass(frozen=True)
class BurnWindows:
    """One multiwindow burn-rate condition (the SRE workbook's): the error budget burns `factor`
    times too fast over both the long and the short window."""

    long: str
    short: str
    factor: float


# Seconds. The exporter's default buckets, which the workers use unless CELERY_EXPORTER_QUEUE_WAIT_BUCKETS
# or CELERY_EXPORTER_RUNTIME_BUCKETS say otherwise; an objective must be one of them.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)


@dataclass(frozen=True)
class Config:
    """Every knob of the generated monitoring content, with production defaults."""

    # Which series rules and dashboards look at: added to every selector of a raw metric.
    selector: str = 'job=~".*celery.*"'
    # Labels kept when aggregating across pods: one Celery app per namespace is the common case.
    # Each is also a dashboard variable, and every panel splits by them.
    group_labels: tuple[str, ...] = ("namespace",)
    # Series left out of every alert and dashboard ("" keeps all): regexes on the task name and the
    # queue name, e.g. a noisy internal task or a queue another team watches.
    ignore_tasks: str = ""
    ignore_queues: str = ""
    # Alerts left out of the rules, by name: e.g. CeleryWorkerDown where an autoscaler stops workers.
    disabled_alerts: tuple[str, ...] = ()
    # Where alert annotations point: the runbook, and the Grafana serving the dashboards
    # (each alert's dashboard_url opens its panel there).
    runbook_url: str = "https://github.com/celery-signal-exporter/celery-signal-exporter/blob/main/docs/runbooks.md"
    grafana_url: str = "http://localhost:3000"

    # Windows.
    rate_window: str = "5m"  # rates in recording rules
    predict_window: str = "30m"  # predict_linear() look-back
    failure_window: str = "10m"  # failure ratio and expirations

    # Objectives. Each queue takes the first entry of `objectives` whose regex matches its whole name,
    # else `default_objective`. Pages come from them: CeleryQueueWaitWillBreach (the expected wait of a
    # task published now will pass the objective within `breach_horizon`) and CeleryQueueWaitBudgetBurn
    # (tasks started later than the objective, at the SRE workbook's burn rates).
    objectives: tuple[QueueObjective, ...] = ()
    default_objective: QueueObjective = QueueObjective(queue=".*", wait="5m")
    # The buckets the workers use (CELERY_EXPORTER_QUEUE_WAIT_BUCKETS / _RUNTIME_BUCKETS), in seconds.
    queue_wait_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    runtime_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    # Burn rates: page when either pair burns, ticket (severity warning) for the slow pairs.
    burn_page: tuple[BurnWindows, ...] = (BurnWindows("1h", "5m", 14.4), BurnWindows("6h", "30m", 6))
    burn_ticket: tuple[BurnWindows, ...] = (BurnWindows("1d", "2h", 3), BurnWindows("3d", "6h", 1))
    budget_period: str = "30d"  # the error budget the dashboards show
    # CeleryQueueWaitWillBreach: expected wait (true backlog / start rate) plus `breach_horizon` times
    # the backlog's growth per started task, over `breach_long_window` (long enough to see arrivals 5%
    # over the start rate through Poisson noise) or `breach_short_window` (fast overloads), whichever is
    # larger, passes the objective; while the backlog is larger than `breach_guard_window` ago (a burst
    # stops growing at once: that holds for one window, never for `breach_for`), the expected wait is at least
    # `breach_floor_ratio` of the objective and the backlog at least `backlog_floor`.
    breach_long_window: str = "30m"
    breach_short_window: str = "5m"
    breach_horizon: str = "1h"
    breach_guard_window: str = "1m"
    breach_floor_ratio: float = 0.1
    breach_for: str = "2m"
    burn_for: str = "2m"

    # Backlog. Every backlog alert reads the true backlog (queue:celery_queue_backlog:sum: ready, plus held in
    # workers or unacked and not running) and consumption from `started`, whatever the prefetch.
    backlog_floor: int = 100  # true backlogs shorter than this never page
    # CeleryBacklogGrowing: the backlog grew, over backlog_growth_window, faster than this share of the queue's
    # start rate (arrivals above (1 + ratio) x starts), for backlog_for. A share of the start rate, so a busy
    # queue's noise stays under it and a slow queue's real growth does not. Window and `for` are short, so a
    # sustained overload pages within 5 minutes (60s/120s page the incident tests' 1.5 x overloads in about
    # 3 to 4 minutes; 90s/150s page them at 4 to 4.7, too near the target); `for` exceeds the window by a minute,
    # so a bulk enqueue that lasts under a minute (growth seen for under window + 1m) does not page.
    backlog_growth_ratio: float = 0.25
    backlog_growth_window: str = "60s"
    backlog_for: str = "120s"
    queue_limit: int = 10000  # what "breach" means for a queue
    backlog_horizon: str = "1h"
    backlog_breach_for: str = "10m"
    drain_max: str = "30m"
    drain_for: str = "15m"
    oldest_message_for: str = "5m"  # CeleryOldestMessageTooOld: the head has waited past its objective
    no_consumers_for: str = "10m"
    # Tasks sent and not yet started, per task (task:celery_task_waiting:estimate): publishes minus starts over
    # this window, so it should exceed the longest wait worth seeing.
    waiting_window: str = "1h"

    # Broker.
    broker_memory_ratio: float = 0.8
    broker_memory_for: str = "10m"
    broker_memory_horizon: str = "4h"
    broker_memory_predict_for: str = "15m"
    # An alarm pages once the probe's alarm checks (every `--rabbitmq-alarm-interval`, 1 s) found it
    # raised at least `broker_alarm_samples` times within `broker_alarm_window`: a counter keeps every
    # burst of a flapping alarm (set and cleared every few seconds), which never holds for a whole
    # `for` and which 30 s scrapes of a gauge catch by chance only. 3 checks are about 3 s of blocked
    # publishers: the first two bursts of any flap (2 s or more each) reach it, and so does a steady
    # alarm within 3 s, while an alarm of a second or less caught by one or two checks stays quiet.
    # A count of checks, which a scaled profile keeps: the test divides the check interval by K too.
    broker_alarm_window: str = "5m"
    broker_alarm_samples: int = 3
    broker_alarm_for: str = "0s"
    broker_down_for: str = "5m"

    # Exporter and workers.
    exporter_down_for: str = "5m"
    # A worker that vanished (SIGKILL, node lost); one shut down gracefully is no longer served at all.
    worker_down_for: str = "5m"

    # Tasks.
    failure_ratio: float = 0.05
    failure_min: int = 5  # at least this many failures in the window before the ratio pages
    failure_for: str = "10m"
    expiring_for: str = "5m"
    retries_exhausted_for: str = "0s"  # CeleryTaskRetriesExhausted: any run that gave up, over failure_window
    # CeleryTasksDroppedByBroker: sent, less received, revoked and the queue's growth (messages the broker
    # dropped unseen, e.g. Celery's `expires` as a RabbitMQ message TTL), over `dropped_window`; pages at
    # `dropped_min` such messages and more than `dropped_ratio` of those sent.
    dropped_window: str = "10m"
    dropped_min: int = 3
    dropped_ratio: float = 0.1
    dropped_for: str = "2m"
    # CeleryTaskSlowerThanYesterday: a task's mean runtime (sum over count, not a bucket quantile) over
    # `slower_window` above `slower_ratio` times its mean `slower_baseline` earlier, with at least
    # `slower_runs_min` runs in both windows so rare tasks do not page.
    slower_ratio: float = 1.5
    slower_baseline: str = "1d"
    slower_window: str = "30m"
    slower_runs_min: int = 20
    slower_for: str = "15m"
    # Tasks beat does not schedule (another scheduler, cron, a producer's loop) that must succeed often; by
    # name regex. Beat's own entries need none of this: the Periodic tasks alerts read beat's schedule.
    periodic_tasks: tuple[PeriodicTask, ...] = ()

    # Periodic tasks, from beat's schedule.
    beat_down_for: str = "5m"
    beat_seen_window: str = "24h"  # beat counts as down when its series vanished within this window
    periodic_missed_grace: str = "5m"  # how late past its due time an entry may be dispatched
    periodic_missed_for: str = "0s"
    periodic_not_succeeding_intervals: int = 3  # dispatched runs without a success, counted in intervals
    periodic_lookback: str = "48h"  # history kept for last success across worker pod replacements
    periodic_not_succeeding_for: str = "0s"
    periodic_window: str = "1h"  # overlaps and expirations are counted over this window
    periodic_start_lag: str = "15m"  # a dispatched run that has not started after this is taken as lost
    # CeleryTaskStuck: a run older than its task's Celery time limit where the worker reports one,
    # else than the first entry whose regex matches the task name (the last entry is the default).
    run_limits: tuple[RunLimit, ...] = (RunLimit(name_regex=".*", max_age="1h"),)
    stuck_for: str = "2m"

    # Dashboards.
    dashboard_refresh: str = "30s"
    dashboard_time_from: str = "now-3h"
    dashboard_tags: tuple[str, ...] = ("celery", "celery-signal-exporter")
    uid_prefix: str = "celery-signal"

    @property
    def ignores(self) -> tuple[str, ...]:
        """The negative matchers of the ignore regexes; a series without the label is kept."""
        found = []
        if self.ignore_tasks:
            found.append(matcher("name", self.ignore_tasks, "!~"))
        if self.ignore_queues:
            found.append(matcher("queue_name", self.ignore_queues, "!~"))
        return tuple(found)

    def sel(self, *extra: str) -> str:
        """The label matchers of one raw-metric selector: config selector, ignores, then `extra`."""
        return ", ".join(m for m in (self.selector, *self.ignores, *extra) if m)

    @property
    def queue_objectives(self) -> tuple[QueueObjective, ...]:
        """Every objective in the order queues take them: the named ones, then the default."""
        return (*self.objectives, self.default_objective)

    def objective_matchers(self, index: int) -> tuple[str, ...]:
        """The queue_name matchers of the queues that take objective `index`: its regex, less every
        earlier one (the first match wins)."""
        mine = self.queue_objectives[index]
        earlier = self.queue_objectives[:index]
        return (matcher("queue_name", mine.queue), *(matcher("queue_name", o.queue, "!~") for o in earlier))

    @property
    def by(self) -> str:
        """The group labels as they go into `by (...)`, with a trailing comma when non-empty."""
        return "".join(f"{label}, " for label in self.group_labels)


PRODUCTION = Config()


#: Count thresholds a scaled profile divides by K with the durations. Ratios, counts of an
#: entry's own intervals (which scale with the entry) and counts of alarm checks (`broker_alarm_samples`:
#: the test divides the probe's alarm interval by K with the window) stay as they are.
COUNT_FIELDS = ("backlog_floor", "queue_limit", "failure_min", "dropped_min", "slower_runs_min")


def _scaled_duration(duration: str, k: int) -> str:
    """`duration` divided by `k`, in whole milliseconds, written in the largest unit that is exact."""
    ms, rest = divmod(round(seconds(duration) * 1000), k)
    if rest:
        raise ValueError(f"{duration} is not a whole number of milliseconds when divided by {k}")
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms" if ms else "0s"


def _scaled_objective(o: QueueObjective, k: int) -> QueueObjective:
    runtime = tuple(dataclasses.replace(r, within=_scaled_duration(r.within, k)) for r in o.runtime)
    return dataclasses.replace(o, wait=_scaled_duration(o.wait, k), runtime=runtime)


def scaled(base: Config, k: int) -> Config:
    """The same rules K times faster: every duration (windows, `for`, horizons, limits) and every
    count threshold divided by K, nothing else changed, so that a page t seconds after an incident's
    onset under this profile is a page K·t seconds after it in production. Scrape and evaluation
    intervals are the test's to divide by the same K."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(base):
        value = getattr(base, field.name)
        if field.name in COUNT_FIELDS:
            changes[field.name] = value / k
        elif isinstance(value, str) and _DURATION.match(value):
            changes[field.name] = _scaled_duration(value, k)
    changes["run_limits"] = tuple(dataclasses.replace(r, max_age=_scaled_duration(r.max_age, k))
                                  for r in base.run_limits)
    changes["objectives"] = tuple(_scaled_objective(o, k) for o in base.objectives)
    changes["default_objective"] = _scaled_objective(base.default_objective, k)
    for key in ("burn_page", "burn_ticket"):
        changes[key] = tuple(dataclasses.replace(b, long=_scaled_duration(b.long, k),
                                                 short=_scaled_duration(b.short, k)) for b in getattr(base, key))
    for key in ("queue_wait_buckets", "runtime_buckets"):
        changes[key] = tuple(bound / k for bound in getattr(base, key))
    changes["periodic_tasks"] = tuple(dataclasses.replace(p, max_age=_scaled_duration(p.max_age, k))
                                      for p in base.periodic_tasks)
    return dataclasses.replace(base, **changes)


def load(path: Path | None, base: Config = PRODUCTION) -> Config:
    """Defaults overridden by a YAML mapping of field names; unknown keys are an error."""
    if path is None:
        return base
    data: Any = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}")
    for key in ("group_labels", "dashboard_tags", "disabled_alerts"):
        if key in data:
            data[key] = tuple(data[key])
    if "periodic_tasks" in data:
        data["periodic_tasks"] = tuple(PeriodicTask(**item) for item in data["periodic_tasks"])
    if "run_limits" in data:
        data["run_limits"] = tuple(RunLimit(**item) for item in data["run_limits"])
    if "objectives" in data:
        data["objectives"] = tuple(_objective(item, f"{path}: objectives") for item in data["objectives"] or ())
    if "default_objective" in data:
        data["default_objective"] = _objective({"queue": ".*", **(data["default_objective"] or {})},
                                               f"{path}: default_objective")
    for key in ("burn_page", "burn_ticket"):
        if key in data:
            data[key] = tuple(_built(BurnWindows, item, f"{path}: {key}") for item in data[key] or ())
    for key in ("queue_wait_buckets", "runtime_buckets"):
        if key in data:
            data[key] = tuple(float(b) for b in data[key])
    config = dataclasses.replace(base, **data)
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if f.name.endswith(("_window", "_for", "_max", "_horizon")) and isinstance(value, str):
            seconds(value)  # raises with the bad value named
    for limit in config.run_limits:
        seconds(limit.max_age)
        try:
            re.compile(limit.name_regex)
        except re.error as exc:
            raise ValueError(f"{path}: name_regex {limit.name_regex!r}: not a regex: {exc}") from None
    check_objectives(config, str(path))
    taken = sorted({"datasource", "queue", "task"} & set(config.group_labels))
    if taken:
        # Each group label becomes a dashboard variable of its name.
        raise ValueError(f"{path}: group_labels: {', '.join(taken)} would clash with a dashboard variable")
    for key in ("ignore_tasks", "ignore_queues"):
        pattern = getattr(config, key)
        try:
            matches_empty = bool(pattern) and re.fullmatch(pattern, "") is not None
        except re.error as exc:
            raise ValueError(f"{path}: {key}: not a regex: {exc}") from None
        if matches_empty:
            # `name!~".*"` would also drop every series without the label: broker, workers, `up`.
            raise ValueError(f"{path}: {key}: {pattern!r} matches the empty string")
    return config


def _built(cls: Any, item: Any, where: str) -> Any:
    """`cls(**item)`, with an unknown or missing key named in one line."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping, got {item!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key {', '.join(unknown)} (expected {', '.join(known)})")
    try:
        return cls(**item)
    except TypeError:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        raise ValueError(f"{where}: {item!r} needs {', '.join(required)}") from None


def _objective(item: Any, where: str) -> QueueObjective:
    objective: QueueObjective = _built(QueueObjective, item, where)
    runtime = tuple(_built(RuntimeObjective, r, f"{where}: runtime") for r in objective.runtime or ())
    return dataclasses.replace(objective, runtime=runtime)


def _buckets_env(bounds: tuple[float, ...], wanted: set[float]) -> str:
    """A bucket list holding `bounds` and every objective, as the environment variable takes it."""
    return ",".join(f"{b:g}" for b in sorted(set(bounds) | wanted))


def check_objectives(config: Config, where: str = "config") -> None:
    """Every objective is a valid regex, duration and share, and a bucket boundary of its histogram:
    the share of starts within it is then read exactly, never interpolated."""
    waits: set[float] = set()
    runtimes: set[float] = set()
    for o in config.queue_objectives:
        name = f"{where}: objective for queue {o.queue!r}"
        for regex in (o.queue, *(r.task for r in o.runtime)):
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"{name}: {regex!r} is not a regex: {exc}") from None
        for target in (o.target, *(r.target for r in o.runtime)):
            if not isinstance(target, float | int) or not 0 < target < 1:
                raise ValueError(f"{name}: target {target!r} must be a share between 0 and 1, e.g. 0.99")
        try:
            waits.add(seconds(o.wait))
            runtimes.update(seconds(r.within) for r in o.runtime)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    for wanted, bounds, metric, env in (
        (waits, config.queue_wait_buckets, "celery_task_queue_wait_seconds", "QUEUE_WAIT_BUCKETS"),
        (runtimes, config.runtime_buckets, "celery_task_runtime_seconds", "RUNTIME_BUCKETS"),
    ):
        missing = sorted(w for w in wanted if not any(abs(w - b) < 1e-9 for b in bounds))
        if missing:
            kind = "queue_wait_buckets" if env == "QUEUE_WAIT_BUCKETS" else "runtime_buckets"
            raise ValueError(
                f"{where}: objective {', '.join(f'{m:g}s' for m in missing)} is not a bucket of {metric}; "
                f"set CELERY_EXPORTER_{env}={_buckets_env(bounds, wanted)} on the workers and the same "
                f"list as {kind} here"
            )

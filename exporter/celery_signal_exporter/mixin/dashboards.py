"""The Grafana dashboards, built with Grafana's foundation SDK.

Every raw-metric query goes through `_q`, which adds the config's selector,
its ignore matchers and the group-label filters, so a panel cannot forget one;
a quantity that has a recording rule is read from the recorded series (`_r`),
so a panel and its alert never disagree. Every panel goes through `_panel`,
which insists on a unit and a description and gives it its stable id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    GridPos,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from celery_signal_exporter.mixin import objectives as slo
from celery_signal_exporter.mixin.config import Config, matcher, seconds
from celery_signal_exporter.mixin.panels import IDS, OBJECTIVES, OVERVIEW, PERIODIC, QUEUES, TASKS, WORKERS, uid
from celery_signal_exporter.mixin.rules import QUANTILES, alerts

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"

# Filters on the queue and task variables.
QUEUE = 'queue_name=~"$queue"'
TASK = 'name=~"$task"'

PanelBuilder = Any  # the SDK's panel builders share no public base class


def _groups(c: Config) -> tuple[str, ...]:
    """One filter per group label, on the dashboard variable of the same name."""
    return tuple(f'{label}=~"${label}"' for label in c.group_labels)


def _q(c: Config, metric: str, *matchers: str) -> str:
    """A raw-metric selector: config selector, ignore matchers, group filters, then `matchers`."""
    return f"{metric}{{{c.sel(*_groups(c), *matchers)}}}"


def _r(c: Config, series: str, *matchers: str) -> str:
    """A recorded series: its rule already applied the selector and ignores, and dropped `job`."""
    return f"{series}{{{', '.join((*_groups(c), *matchers))}}}"


def _by(c: Config, *labels: str) -> str:
    """`by (...)` with the group labels first, so panels split the way the rules aggregate."""
    every = (*c.group_labels, *labels)
    return f"by ({', '.join(every)}) " if every else ""


def _target(expr: str, legend: str, ref: str, fmt: str | None = None) -> prometheus.Dataquery:
    query: prometheus.Dataquery = prometheus.Dataquery().expr(expr).legend_format(legend)
    query.ref_id(ref).datasource(DATASOURCE)
    if fmt is not None:
        query.format(PromQueryFormat(fmt))
    return query


class _Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns, each with its id from panels.IDS
    and, in its description, the list of the alerts that link to it."""

    def __init__(self, c: Config, dashboard: Dashboard, slug: str) -> None:
        self.dashboard = dashboard
        self.ids = IDS[slug]
        # The alerts whose dashboard_url opens each panel; a switched-off alert is not listed.
        self.alerts: dict[str, list[str]] = {}
        for alert in alerts(c):
            if alert.panel[0] == slug:
                self.alerts.setdefault(alert.panel[1], []).append(alert.name)
        self.x = 0
        self.y = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.dashboard.with_row(Row(title).id(self.ids[title]).grid_pos(GridPos(h=1, w=24, x=0, y=self.y)))
        self.y += 1

    def add(self, panel: PanelBuilder, w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        title = panel.build().title
        panel.id(self.ids[title])
        if title in self.alerts:
            panel.description(f"{panel.build().description}\n\nAlerts: {', '.join(self.alerts[title])}.")
        panel.grid_pos(GridPos(h=h, w=w, x=self.x, y=self.y))
        self.dashboard.with_panel(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0


def _panel(
    c: Config,
    kind: Callable[[], PanelBuilder],
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    fmt: str | None = None,
) -> PanelBuilder:
    """A panel whose legends start with the group labels (but a heatmap's, whose series are buckets)."""
    prefix = "" if fmt == PromQueryFormat.HEATMAP else "".join(f"{{{{{label}}}}}/" for label in c.group_labels)
    panel = kind().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_target(expr, prefix + legend, chr(ord("A") + i), fmt))
    return panel


def _ts(c: Config, title: str, description: str, unit: str, *targets: tuple[str, str]) -> PanelBuilder:
    return _panel(c, timeseries.Panel, title, description, unit, list(targets)).fill_opacity(10)


def _stat(c: Config, title: str, description: str, unit: str, *targets: tuple[str, str]) -> PanelBuilder:
    return _panel(c, stat.Panel, title, description, unit, list(targets))


def _variable(name: str, label: str, query: str) -> QueryVariable:
    variable: QueryVariable = (
        QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(DATASOURCE)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )
    return variable


def _base(c: Config, slug: str, title: str, description: str, with_task: bool) -> tuple[Dashboard, _Layout]:
    """A dashboard with the datasource variable, one variable per group label, and queue(/task) filters."""
    dashboard = (
        Dashboard(title)
        .uid(uid(c, slug))
        .description(description)
        .tags(list(c.dashboard_tags))
        .refresh(c.dashboard_refresh)
        .time(c.dashboard_time_from, "now")
        .timezone("browser")
        .editable()
        .with_variable(
            DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .current(VariableOption(selected=True, text="default", value="default"))
        )
    )
    for i, label in enumerate(c.group_labels):
        # Each group variable lists the values under the ones before it (cluster, then namespace).
        query = f"label_values({_q_groups(c, 'celery_exporter_build_info', i)}, {label})"
        dashboard = dashboard.with_variable(_variable(label, label.replace("_", " ").capitalize(), query))
    queued = '__name__=~"celery_queue_length|celery_task_sent_total|celery_task_received_total"'
    dashboard = dashboard.with_variable(_variable("queue", "Queue", f"label_values({_q(c, '', queued)}, queue_name)"))
    sent = '__name__=~"celery_task_sent_total|celery_task_received_total"'
    task = _variable("task", "Task", f"label_values({_q(c, '', sent, QUEUE)}, name)")
    if not with_task:
        task = task.hide(VariableHide.HIDE_VARIABLE)
    dashboard = dashboard.with_variable(task)
    return dashboard, _Layout(c, dashboard, slug)


def _q_groups(c: Config, metric: str, first: int) -> str:
    """A selector filtered on the first `first` group variables only."""
    return f"{metric}{{{c.sel(*_groups(c)[:first])}}}"


def _quantiles(c: Config, metric: str, by: str, matchers: tuple[str, ...]) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, for a quantity no recording rule has (over the selected tasks, or per task)."""
    labels = (by, "le") if by else ("le",)
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum {_by(c, *labels)}(rate({_q(c, metric + '_bucket', *matchers)}[{RATE}])))",
            f"{legend}p{round(float(q) * 100)}",
        )
        for q in QUANTILES
    ]


def _recorded_quantiles(c: Config, series: str, by: str, *matchers: str) -> list[tuple[str, str]]:
    """p50/p95/p99 from a recording rule's series, one target per quantile."""
    return [(_r(c, series, *matchers, f'quantile="{q}"'), f"{{{{{by}}}}} p{round(float(q) * 100)}") for q in QUANTILES]


def overview(c: Config) -> Dashboard:
    """What an on-call engineer opens first: is work flowing, is anything piling up."""
    d, lay = _base(c, OVERVIEW, "Celery / Overview", "Throughput, backlog, latency, workers and broker memory.", True)
    d.link(DashboardLink("Queues and objectives").type(DashboardLinkType("link")).url(f"/d/{uid(c, OBJECTIVES)}")
           .include_vars(True).keep_time(True).icon("dashboard")
           .tooltip("Each queue against its wait objective: expected wait, burn rates, error budget"))
    qt = (QUEUE, TASK)
    lay.row("Throughput")
    lay.add(
        _ts(
            c,
            "Published vs completed",
            "Tasks published per second (every apply_async, retries included) against task runs that "
            "finished, whatever their outcome. A lasting gap means the backlog grows.",
            "ops",
            (f"sum {_by(c)}(rate({_q(c, 'celery_task_sent_total', *qt)}[{RATE}]))", "published"),
            (f"sum {_by(c)}(rate({_q(c, 'celery_task_runtime_seconds_count', *qt)}[{RATE}]))", "completed"),
        )
    )
    lay.add(
        _ts(
            c,
            "Failure ratio",
            "Failed runs as a share of finished runs (failed, succeeded, replaced or ignored) per task, over "
            f"{c.failure_window} (a recorded series). Retries are not failures; a task that never failed "
            "reads 0.",
            "percentunit",
            (_r(c, "task:celery_task_failure:ratio", TASK), "{{name}}"),
        )
    )
    lay.row("Queues")
    lay.add(
        _ts(
            c,
            "Queue length",
            "Messages waiting in each queue, as the broker probe reads them (Redis: every priority "
            "sub-queue summed; RabbitMQ: ready messages), and the true backlog: those plus the tasks "
            "workers hold without running them (prefetched, or waiting for their ETA), which the broker "
            "no longer counts as waiting; on RabbitMQ, its unacked messages less the runs in progress "
            "where that is more (consumers that report nothing). Recorded series; the backlog alerts read "
            "the true backlog.",
            "short",
            (_r(c, "queue:celery_queue_length:sum", QUEUE), "{{queue_name}}"),
            (_r(c, "queue:celery_queue_backlog:sum", QUEUE), "{{queue_name}} true backlog"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Backlog growth",
            "How fast each queue's true backlog grows (positive) or drains (negative), in messages per "
            f"second over {c.backlog_growth_window}, against the bar CeleryBacklogGrowing pages over: "
            f"{c.backlog_growth_ratio * 100:g}% of the rate workers start the queue's tasks over the same "
            "window (recorded series). Growth over the bar for "
            f"{c.backlog_for} means tasks arrive faster than workers start them.",
            "short",
            (_r(c, "queue:celery_queue_backlog:deriv", QUEUE), "{{queue_name}}"),
            (
                f"{c.backlog_growth_ratio:g} * {_r(c, 'queue:celery_task_started:short_rate', QUEUE)}",
                "{{queue_name}} paging bar",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Estimated time to drain",
            "The true backlog divided by the rate workers start its tasks: how long the queue would take "
            "to empty if nothing new arrived (a recorded series); +Inf (off the chart) while nobody "
            "starts its tasks.",
            "s",
            (_r(c, "queue:celery_queue_drain_seconds:estimate", QUEUE), "{{queue_name}}"),
        ),
        w=8,
    )
    lay.row("Latency")
    lay.add(
        _ts(
            c,
            "Runtime quantiles",
            "p50, p95 and p99 of task runtime (task_prerun to task_postrun), over the selected tasks.",
            "s",
            *_quantiles(c, "celery_task_runtime_seconds", "", qt),
        )
    )
    lay.add(
        _ts(
            c,
            "Queue wait quantiles",
            "p50, p95 and p99 of the time from when a task was due (published, or its ETA) to when "
            "a worker started it.",
            "s",
            *_quantiles(c, "celery_task_queue_wait_seconds", "", qt),
        )
    )
    lay.row("Workers and broker")
    lay.add(
        _stat(
            c,
            "Workers up",
            "Workers whose heartbeat is fresh. A worker that stopped reads 0 until its series ages out.",
            "short",
            (f"sum {_by(c)}({_q(c, 'celery_worker_up')})", "up"),
        ),
        w=4,
    )
    lay.add(
        _ts(
            c,
            "Pool utilisation",
            "Tasks executing as a share of each worker's pool processes. Near 100% for long means "
            "every slot is taken; what helps depends on what the tasks do, which Tasks \"CPU per runtime "
            "second\" shows: near 1 they compute, so add processes only with CPUs to run them (more "
            "workers or nodes); near 0 they wait, and more concurrency helps only if what they wait on "
            "scales (network or disk I/O, e.g. a threads or gevent pool), never a lock or an overloaded "
            "database.",
            "percentunit",
            (
                f"sum {_by(c, 'hostname')}({_q(c, 'celery_worker_tasks_active')})\n/\n"
                f"sum {_by(c, 'hostname')}({_q(c, 'celery_worker_pool_processes')})",
                "{{hostname}}",
            ),
        ),
        w=10,
    )
    lay.add(
        _ts(
            c,
            "Broker memory",
            "Memory the broker uses against its limit (Redis maxmemory, RabbitMQ high watermark). "
            "No limit line means the broker has none.",
            "bytes",
            (f"max {_by(c, 'broker', 'node')}({_q(c, 'celery_broker_memory_used_bytes')})", "{{node}} used"),
            (f"max {_by(c, 'broker', 'node')}({_q(c, 'celery_broker_memory_limit_bytes')} > 0)", "{{node}} limit"),
        ),
        w=10,
    )
    return d


def tasks(c: Config) -> Dashboard:
    """Per-task drill-down: pick a task and see how it behaves."""
    d, lay = _base(c, TASKS, "Celery / Tasks", "Outcomes, failures and latency of the selected tasks.", True)
    qt = (QUEUE, TASK)
    lay.row("Outcomes")
    lay.add(
        _ts(
            c,
            "Runs by outcome",
            "Tasks received, started, and each outcome a run can end in (succeeded, failed, retried, ignored, "
            "replaced, rejected by the run) per second, by task, and deliveries that failed before they started. "
            "Received counts "
            "deliveries: redelivered ones (restored after a worker stopped, or requeued) count again, and are "
            "shown apart.",
            "ops",
            *[
                (f"sum {_by(c, 'name')}(rate({_q(c, f'celery_task_{o}_total', *qt)}[{RATE}]))", f"{{{{name}}}} {o}")
                for o in ("received", "redelivered", "started", "succeeded", "failed", "retried", "ignored", "replaced",
                          "run_rejected", "failed_before_start")
            ],
        )
    )
    lay.add(
        _ts(
            c,
            "Failures by exception",
            "Failed runs per second by task and exception class. WorkerLostError means the pool process died "
            "mid-task. \"gave up after retries\": failures of runs that had been retried, whose work is lost "
            "(a flaky task that recovers by retry never shows there).",
            "ops",
            (
                f"sum {_by(c, 'name', 'exception')}(rate({_q(c, 'celery_task_failed_total', *qt)}[{RATE}]))",
                "{{name}} {{exception}}",
            ),
            (
                f"sum {_by(c, 'name')}(rate({_q(c, 'celery_task_retries_exhausted_total', *qt)}[{RATE}]))",
                "{{name}} gave up after retries",
            ),
        )
    )
    lay.add(
        _ts(
            c,
            "Retries, revokes and expirations",
            "Retries, and messages dropped without running: revoked, expired before they started, "
            "or terminated while running; and rejected (unknown or undecodable) messages per queue.",
            "ops",
            (f"sum {_by(c, 'name')}(rate({_q(c, 'celery_task_retried_total', *qt)}[{RATE}]))", "{{name}} retried"),
            (
                f"sum {_by(c, 'name', 'reason')}(rate({_q(c, 'celery_task_revoked_total', *qt)}[{RATE}]))",
                "{{name}} {{reason}}",
            ),
            (
                f"sum {_by(c, 'queue_name')}(rate({_q(c, 'celery_task_rejected_total', QUEUE)}[{RATE}]))",
                "{{queue_name}} rejected",
            ),
            # What CeleryTasksDroppedByBroker reads: sent, less received, revoked and queue growth.
            (_r(c, "task:celery_task_dropped:estimate", *qt), "{{name}} dropped by the broker (count)"),
        )
    )
    lay.add(
        _ts(
            c,
            "In progress",
            "Tasks executing now, by task. A dead process's share disappears with it.",
            "short",
            (f"sum {_by(c, 'name')}({_q(c, 'celery_task_in_progress', *qt)})", "{{name}}"),
        )
    )
    lay.row("Latency")
    lay.add(
        _ts(
            c,
            "Runtime quantiles",
            "p50, p95 and p99 of runtime by task, over all its queues: the recorded series; and the mean "
            "(sum over count, which moves with every run, not in bucket steps) now and at its baseline, "
            "as CeleryTaskSlowerThanYesterday compares them.",
            "s",
            *_recorded_quantiles(c, "task:celery_task_runtime_seconds:quantile", "name", TASK),
            (
                f'label_replace({_r(c, "task:celery_task_runtime_seconds:mean", TASK)}, "mean", "now", "", "")\n'
                f'or\nlabel_replace({_r(c, "task:celery_task_runtime_seconds:mean_baseline", TASK)}, '
                f'"mean", "{c.slower_baseline} before", "", "")',
                "{{name}} mean {{mean}}",
            ),
        )
    )
    lay.add(
        _ts(
            c,
            "Queue wait quantiles",
            "p50, p95 and p99 of the time from due to start, by task.",
            "s",
            *_quantiles(c, "celery_task_queue_wait_seconds", "name", qt),
        )
    )
    lay.add(
        _panel(
            c,
            heatmap.Panel,
            "Runtime heatmap",
            "How many runs finished in each runtime bucket over time.",
            "s",
            [
                (
                    f"sum by (le) (increase({_q(c, 'celery_task_runtime_seconds_bucket', *qt)}[{RATE}]))",
                    "{{le}}",
                )
            ],
            PromQueryFormat.HEATMAP,
        ).calculate(False)
    )
    lay.add(
        _panel(
            c,
            heatmap.Panel,
            "Queue wait heatmap",
            "How many runs started after each queue-wait bucket over time.",
            "s",
            [
                (
                    f"sum by (le) (increase({_q(c, 'celery_task_queue_wait_seconds_bucket', *qt)}[{RATE}]))",
                    "{{le}}",
                )
            ],
            PromQueryFormat.HEATMAP,
        ).calculate(False)
    )
    lay.add(
        _ts(
            c,
            "Waiting to start",
            "Tasks sent and not yet started, by task and queue, while they wait: ready in the broker, "
            "prefetched or held for an ETA by a worker (publishes minus starts and revocations over "
            f"{c.waiting_window}, a recorded series). The queue-wait quantiles see a wait only once the run "
            "starts; this shows it while it lasts. Right axis: how long the head of the task's queue has "
            "waited (the broker's oldest-message age), 0 while the task has nothing waiting. Messages a broker "
            f"dropped unseen (a RabbitMQ message TTL) count here until they are {c.waiting_window} old.",
            "short",
            (_r(c, "task:celery_task_waiting:estimate", *qt), "{{name}} ({{queue_name}}) waiting"),
            (
                f"(\n  {_r(c, 'task:celery_task_waiting:estimate', *qt)} > bool 0.5\n)\n"
                f"* on ({c.by}queue_name) group_left\n"
                f"max {_by(c, 'queue_name')}({_q(c, 'celery_queue_oldest_message_age_seconds', QUEUE)})",
                "{{name}} ({{queue_name}}) queue head age",
            ),
        ).override_by_query("B", [
            DynamicConfigValue(id_val="unit", value="s"),
            DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
        ]),
        w=24,
    )
    lay.row("Freshness")
    lay.add(
        _panel(
            c,
            table.Panel,
            "Time since last success",
            "Seconds since each task last succeeded, oldest first. For periodic tasks this is the "
            "number their alert watches.",
            "s",
            [
                (
                    f"time() - max {_by(c, 'name')}({_q(c, 'celery_task_last_success_timestamp_seconds', TASK)})",
                    "{{name}}",
                )
            ],
            PromQueryFormat.TABLE,
        ),
        w=24,
    )
    _task_resources(c, lay)
    return d


def _task_resources(c: Config, lay: _Layout) -> None:
    """What runs cost (CPU, memory), runs past their limit, and how long producers take to publish."""
    qt = (QUEUE, TASK)
    lay.row("Resources")
    lay.add(
        _ts(
            c,
            "CPU per runtime second",
            "CPU seconds a task's runs used per second of their runtime. Near 1 (100%) the task computes: "
            "more processes help only with the CPUs to run them. Near 0 it waits (network, disk, locks, "
            "sleep): more concurrency helps only if what it waits on scales. On gevent and eventlet a run "
            "is also charged what ran while it was switched out. Opt-in: empty unless the workers set "
            "CELERY_EXPORTER_TASK_RESOURCES=1 (or instrument(task_resources=True)).",
            "percentunit",
            (
                f"sum {_by(c, 'name')}(rate({_q(c, 'celery_task_cpu_seconds_total', *qt)}[{RATE}]))\n/\n"
                f"sum {_by(c, 'name')}(rate({_q(c, 'celery_task_runtime_seconds_sum', *qt)}[{RATE}]))",
                "{{name}}",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Memory growth p95",
            "95th percentile of how much a run raised its process's peak resident memory. A task "
            "that keeps growing it leaks or loads too much; worker_max_memory_per_child bounds the damage. "
            "Opt-in: empty unless the workers set CELERY_EXPORTER_TASK_RESOURCES=1.",
            "bytes",
            (
                f"histogram_quantile(0.95, sum {_by(c, 'name', 'le')}"
                f"(rate({_q(c, 'celery_task_memory_growth_bytes_bucket', *qt)}[{RATE}])))",
                "{{name}}",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Oldest run vs time limit",
            "Age of each task's oldest run in progress (0 when none runs) against its Celery time "
            "limit (no line: the task has none, and the run_limits setting of the mixin applies).",
            "s",
            (
                f"max {_by(c, 'name')}({_q(c, 'celery_task_oldest_running_age_seconds', *qt)})",
                "{{name}} oldest run",
            ),
            (f"max {_by(c, 'name')}({_q(c, 'celery_task_time_limit_seconds', TASK)})", "{{name}} limit"),
        ),
        w=8,
    )
    lay.row("Publishing")
    lay.add(
        _ts(
            c,
            "Publish rate by instance",
            "Tasks each producer instance (web pod, worker, beat) published per second, as timed. Opt-in: "
            "empty unless the producers set CELERY_EXPORTER_PUBLISH_TIMING=1 (or instrument(publish_timing=True)).",
            "ops",
            (
                f"sum {_by(c, 'instance')}(rate({_q(c, 'celery_task_publish_seconds_count', *qt)}[{RATE}]))",
                "{{instance}}",
            ),
        )
    )
    lay.add(
        _ts(
            c,
            "Publish latency p95 by instance",
            "95th percentile of how long apply_async took to hand a message to the broker, per producer "
            "instance. High on one instance: its network or connection; on all: the broker. Opt-in: "
            "CELERY_EXPORTER_PUBLISH_TIMING=1 on the producers.",
            "s",
            (
                f"histogram_quantile(0.95, sum {_by(c, 'instance', 'le')}"
                f"(rate({_q(c, 'celery_task_publish_seconds_bucket', *qt)}[{RATE}])))",
                "{{instance}}",
            ),
        )
    )


def queues(c: Config) -> Dashboard:
    """Per-queue and per-broker view, from the broker probe."""
    d, lay = _base(
        c, QUEUES, "Celery / Queues and broker", "Queue depth and the broker's health, from the broker probe.", False
    )
    lay.row("Queues")
    by_q = f"sum {_by(c, 'queue_name')}"
    lay.add(
        _ts(
            c,
            "Length",
            "Messages waiting in each queue, and the true backlog: those plus the tasks workers hold "
            "without running them (prefetched or scheduled), or on RabbitMQ its unacked messages less the "
            "runs in progress where that is more (consumers that report nothing). Recorded series; the "
            "backlog alerts read the true backlog. SQS also reports the messages it holds back until their "
            "delay ends (delayed) and the depth of each queue's dead-letter queue.",
            "short",
            (_r(c, "queue:celery_queue_length:sum", QUEUE), "{{queue_name}}"),
            (_r(c, "queue:celery_queue_backlog:sum", QUEUE), "{{queue_name}} true backlog"),
            (f"{by_q}({_q(c, 'celery_queue_delayed', QUEUE)})", "{{queue_name}} delayed"),
            (f"{by_q}({_q(c, 'celery_queue_dead_letter_length', QUEUE)})", "{{queue_name}} dead letters"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Unacked",
            "Messages delivered to a worker and not yet acknowledged. RabbitMQ reports them per "
            "queue; Redis keeps one hash for all queues, shown per broker.",
            "short",
            (f"{by_q}({_q(c, 'celery_queue_unacked', QUEUE)})", "{{queue_name}}"),
            (f"sum {_by(c, 'broker')}({_q(c, 'celery_broker_unacked')})", "{{broker}} (all queues)"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Consumers",
            "Consumers attached to each queue (RabbitMQ only: a Redis BRPOP does not say which queues it serves).",
            "short",
            (f"{by_q}({_q(c, 'celery_queue_consumers', QUEUE)})", "{{queue_name}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Oldest message age",
            "How long the message at the head of each queue has been due: Redis, from the message's "
            "csx_due header; RabbitMQ classic queues, from its timestamp property (whole seconds). Tasks "
            "\"Waiting to start\" shows which tasks wait behind it.",
            "s",
            (
                f"max {_by(c, 'queue_name')}({_q(c, 'celery_queue_oldest_message_age_seconds', QUEUE)})",
                "{{queue_name}}",
            ),
        )
    )
    lay.add(
        _ts(
            c,
            "Queue wait p95",
            "95th percentile of the time tasks from each queue waited between due and start (a recorded series).",
            "s",
            (_r(c, "queue:celery_task_queue_wait_seconds:quantile", QUEUE, 'quantile="0.95"'), "{{queue_name}}"),
        )
    )
    lay.row("Broker")
    lay.add(
        _stat(
            c,
            "Broker up",
            "1 when the last probe of each broker succeeded.",
            "short",
            (f"max {_by(c, 'broker')}({_q(c, 'celery_broker_up')})", "{{broker}}"),
        ),
        w=6,
    )
    lay.add(
        _ts(
            c,
            "Memory",
            "Memory used by each broker node against its limit.",
            "bytes",
            (f"max {_by(c, 'broker', 'node')}({_q(c, 'celery_broker_memory_used_bytes')})", "{{node}} used"),
            (f"max {_by(c, 'broker', 'node')}({_q(c, 'celery_broker_memory_limit_bytes')} > 0)", "{{node}} limit"),
        ),
        w=10,
    )
    lay.add(
        _ts(
            c,
            "Alarms",
            "RabbitMQ memory and disk alarms by node; while one is raised the broker blocks publishers. "
            "The state is the last check's; the checks raised per second (one check a second by default, so "
            "the share of the time it was raised) keep every burst of an alarm that flaps between two scrapes, "
            "as CeleryBrokerMemoryAlarm counts them; the checks per second show the watch runs.",
            "short",
            (f"max {_by(c, 'node')}({_q(c, 'celery_broker_memory_alarm')})", "{{node}} memory"),
            (f"max {_by(c, 'node')}({_q(c, 'celery_broker_disk_alarm')})", "{{node}} disk"),
            (f"max {_by(c, 'node')}(rate({_q(c, 'celery_broker_memory_alarm_raised_checks_total')}[{RATE}]))",
             "{{node}} memory checks raised /s"),
            (f"max {_by(c, 'node')}(rate({_q(c, 'celery_broker_disk_alarm_raised_checks_total')}[{RATE}]))",
             "{{node}} disk checks raised /s"),
            (f"max {_by(c, 'broker')}(rate({_q(c, 'celery_broker_alarm_checks_total')}[{RATE}]))",
             "{{broker}} alarm checks /s"),
        ),
        w=8,
    )
    lay.row("Probe health")
    lay.add(
        _ts(
            c,
            "Probe duration",
            "How long each probe cycle took, success or not.",
            "s",
            (f"max {_by(c, 'broker')}({_q(c, 'celery_exporter_probe_duration_seconds')})", "{{broker}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Probe errors",
            "Failed probe cycles per second by reason: connection, timeout, auth, protocol, other; and, "
            "where each request is billed (SQS), the probe's API requests per second.",
            "ops",
            (
                f"sum {_by(c, 'broker', 'reason')}(rate({_q(c, 'celery_exporter_probe_errors_total')}[{RATE}]))",
                "{{broker}} {{reason}}",
            ),
            (
                f"sum {_by(c, 'broker')}(rate({_q(c, 'celery_exporter_probe_queues_dropped_total')}[{RATE}]))",
                "{{broker}} queues dropped",
            ),
            (
                f"sum {_by(c, 'broker')}(rate({_q(c, 'celery_exporter_probe_requests_total')}[{RATE}]))",
                "{{broker}} API requests",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Since last successful probe",
            "Seconds since each broker was last read successfully.",
            "s",
            (
                f"time() - max {_by(c, 'broker')}({_q(c, 'celery_exporter_probe_last_success_timestamp_seconds')})",
                "{{broker}}",
            ),
        ),
        w=8,
    )
    lay.row("Exporter health")
    lay.add(
        _ts(
            c,
            "Instrumentation errors",
            "Signal receivers that raised (swallowed so the task is unharmed), label values folded into "
            "__overflow__ once max_task_names or max_queue_names was reached, and label values cut to "
            "200 characters. All should stay flat at 0.",
            "ops",
            (
                f"sum {_by(c, 'signal')}(rate({_q(c, 'celery_exporter_handler_errors_total')}[{RATE}]))",
                "{{signal}} errors",
            ),
            (
                f"sum {_by(c, 'label')}(rate({_q(c, 'celery_exporter_dropped_label_values_total')}[{RATE}]))",
                "{{label}} dropped",
            ),
            (
                f"sum {_by(c, 'label')}(rate({_q(c, 'celery_exporter_label_values_truncated_total')}[{RATE}]))",
                "{{label}} truncated",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Metrics files and cardinality",
            "Files in each exporter's metrics directory by state; unreadable ones are skipped, counted and "
            "logged, never deleted. Dead pool processes compacted into the archive show how fast children "
            "recycle; task and queue names folded into __overflow__ at merge show a name explosion; a failed merge "
            "(the scrape still answers, without the directory's series) should never happen.",
            "short",
            (f"sum {_by(c, 'instance', 'state')}({_q(c, 'celery_exporter_metrics_files')})", "{{instance}} {{state}}"),
            (
                f"sum {_by(c, 'instance')}(increase({_q(c, 'celery_exporter_compacted_processes_total')}[{RATE}]))",
                "{{instance}} processes compacted",
            ),
            (
                f"max {_by(c, 'instance')}({_q(c, 'celery_exporter_task_names_folded')})",
                "{{instance}} task names folded",
            ),
            (
                f"max {_by(c, 'instance')}({_q(c, 'celery_exporter_queue_names_folded')})",
                "{{instance}} queue names folded",
            ),
            (
                f"sum {_by(c, 'instance')}(increase({_q(c, 'celery_exporter_merge_errors_total')}[{RATE}]))",
                "{{instance}} failed merges",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Scrape duration",
            "How long each exporter took to merge its metrics directory for the previous scrape.",
            "s",
            (f"max {_by(c, 'instance')}({_q(c, 'celery_exporter_scrape_duration_seconds')})", "{{instance}}"),
        ),
        w=8,
    )
    lay.add(_writes_lost(c), w=8)
    return d


def _writes_lost(c: Config) -> PanelBuilder:
    """What a full or read-only metrics volume made the instrumentation lose, by signal."""
    return _ts(
        c,
        "Writes lost",
        "Signal handler calls whose counts the metrics volume refused (full or read-only), by signal: "
        "task_prerun is runs missing from started, task_postrun outcomes and runtimes missing. Counted in the "
        "room each worker main reserves at start, so a child with no file of its own is counted too. Should "
        "stay flat at 0; see the runbook of CeleryExporterWritesLost.",
        "ops",
        (f"sum {_by(c, 'signal')}(rate({_q(c, 'celery_exporter_writes_lost_total')}[{RATE}]))", "{{signal}}"),
    )


def periodic(c: Config) -> Dashboard:
    """Periodic tasks, as beat's schedule says they should run and as the workers ran them."""
    d, lay = _base(c, PERIODIC, "Celery / Periodic tasks",
                   "Beat, each schedule entry's last dispatch and success, overlaps and expired runs.", False)
    e = _by(c, "entry", "name")
    lay.row("Beat")
    lay.add(
        _stat(
            c,
            "Beat up",
            "1 while beat's heartbeat is fresh; 0 when it stopped or shut down. Without beat no periodic "
            "task is sent.",
            "short",
            (f"max {_by(c, 'hostname')}({_q(c, 'celery_beat_up')})", "{{hostname}}"),
        ),
        w=8,
    )
    names = "|".join(a.name for a in alerts(c) if a.panel[0] == PERIODIC)
    lay.add(
        _panel(
            c,
            table.Panel,
            "Alerts",
            "The periodic-task alerts pending or firing now, per entry (Prometheus' own ALERTS series, "
            "which carries the alerts' labels, not a job).",
            "short",
            [(f"max {_by(c, 'alertname', 'alertstate', 'entry', 'name')}"
              f"({_r(c, 'ALERTS', f'alertname=~{chr(34)}{names}{chr(34)}')})", "{{alertname}}")],
            PromQueryFormat.TABLE,
        ),
        w=16,
    )
    entries = _panel(
        c,
        table.Panel,
        "Entries",
        "One row per schedule entry: its interval (for crontab entries the gap to the run after next), "
        "seconds since beat last sent it, since a run last succeeded, until it is next due (negative: "
        "overdue), and runs in progress now (more than 1 is an overlap).",
        "s",
        [
            (f"max {e}({_q(c, 'celery_beat_entry_interval_seconds')})", "interval"),
            (f"time() - max {e}({_q(c, 'celery_beat_entry_last_dispatch_timestamp_seconds')})", "since dispatch"),
            (f"time() - max {e}({_q(c, 'celery_beat_entry_last_success_timestamp_seconds')})", "since success"),
            (f"max {e}({_q(c, 'celery_beat_entry_next_due_timestamp_seconds')}) - time()", "until due"),
            (f"sum {e}({_q(c, 'celery_beat_entry_running')})", "running"),
        ],
        PromQueryFormat.TABLE,
    ).with_transformation(DataTransformerConfig(id_val="merge", options={}))
    lay.add(entries, w=24, h=10)
    lay.row("Runs")
    lay.add(
        _ts(
            c,
            "Overlaps",
            "Runs still in progress when their entry's next run was due, per entry. The count is made as a "
            "run ends, so overlaps shorter than a scrape show too.",
            "short",
            (f"sum {e}(increase({_q(c, 'celery_beat_entry_overlaps_total')}[{RATE}]))",
             "{{entry}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Expired and unstarted runs",
            "Runs a worker dropped as expired (Redis), and runs sent that have not started (on RabbitMQ "
            "expired runs vanish in the broker), per entry.",
            "short",
            (f"sum {e}(increase({_q(c, 'celery_beat_entry_expired_total')}[{RATE}]))",
             "{{entry}} expired"),
            (f"sum {e}(increase({_q(c, 'celery_beat_entry_dispatched_total')}[{RATE}])) - "
             f"sum {e}(increase({_q(c, 'celery_beat_entry_started_total')}[{RATE}]))",
             "{{entry}} sent, not started"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            c,
            "Dispatch failures",
            "Dispatches beat could not send (broker down, a task it cannot find), per entry.",
            "short",
            (f"sum {e}(increase({_q(c, 'celery_beat_entry_dispatch_failures_total')}[{RATE}]))",
             "{{entry}}"),
        ),
        w=8,
    )
    return d


def workers(c: Config) -> Dashboard:
    """Per worker: memory, the tasks it holds, which queues it serves with how many slots."""
    d, lay = _base(
        c, WORKERS, "Celery / Workers", "Memory, held tasks, consumed queues and pool slots of each worker.", False
    )
    lay.row("Memory")
    lay.add(
        _ts(
            c,
            "Resident memory",
            "Resident memory of each worker: its main process and every pool process (Linux).",
            "bytes",
            (f"sum {_by(c, 'hostname')}({_q(c, 'celery_worker_resident_memory_bytes')})", "{{hostname}}"),
        )
    )
    lay.add(
        _ts(
            c,
            "Largest pool process",
            "Resident memory of each worker's largest pool process (prefork only): the number "
            "worker_max_memory_per_child and the container's memory limit are set against.",
            "bytes",
            (
                f"max {_by(c, 'hostname')}({_q(c, 'celery_worker_pool_process_max_resident_memory_bytes')})",
                "{{hostname}}",
            ),
        )
    )
    lay.row("Held tasks")
    lay.add(
        _ts(
            c,
            "Reserved by queue",
            "Tasks workers prefetched and have not started, per queue: the broker no longer counts "
            "them as waiting. Many here while slots sit idle elsewhere: lower worker_prefetch_multiplier.",
            "short",
            (f"sum {_by(c, 'queue_name')}({_q(c, 'celery_worker_tasks_reserved', QUEUE)})", "{{queue_name}}"),
        )
    )
    lay.add(
        _ts(
            c,
            "Scheduled by queue",
            "Tasks with an ETA or countdown that workers hold until they are due, per queue.",
            "short",
            (f"sum {_by(c, 'queue_name')}({_q(c, 'celery_worker_tasks_scheduled', QUEUE)})", "{{queue_name}}"),
        )
    )
    lay.row("Slots")
    lay.add(
        _ts(
            c,
            "Slots per queue",
            "Pool processes (threads, greenlets) of the live workers consuming each queue (a worker "
            "counts for every queue it consumes; a recorded series), and how many run a task from it now.",
            "short",
            (_r(c, "queue:celery_worker_slots:sum", QUEUE), "{{queue_name}} slots"),
            (f"sum {_by(c, 'queue_name')}({_q(c, 'celery_task_in_progress', QUEUE)})", "{{queue_name}} busy"),
        )
    )
    lay.add(
        _ts(
            c,
            "Tasks active",
            "Tasks executing on each worker against its pool size.",
            "short",
            (f"sum {_by(c, 'hostname')}({_q(c, 'celery_worker_tasks_active')})", "{{hostname}} active"),
            (f"sum {_by(c, 'hostname')}({_q(c, 'celery_worker_pool_processes')})", "{{hostname}} processes"),
        )
    )
    lay.add(
        _panel(
            c,
            table.Panel,
            "Consuming queues",
            "Which queues each live worker consumes (1). A queue missing here is served by nobody.",
            "short",
            [
                (
                    f"max {_by(c, 'hostname', 'queue_name')}({_q(c, 'celery_worker_consuming', QUEUE)})",
                    "{{hostname}} {{queue_name}}",
                )
            ],
            PromQueryFormat.TABLE,
        ),
        w=24,
    )
    return d


def _budget_left(c: Config) -> str:
    """The share of each queue's error budget left over `budget_period`, one term per objective (each
    reads its own bucket), joined with `or`: the queues of one objective never match another's."""
    g = _by(c, "queue_name")
    terms = []
    for i, o in enumerate(c.queue_objectives):
        mine = c.objective_matchers(i)
        within = _q(c, "celery_task_queue_wait_seconds_bucket", QUEUE, *mine, matcher("le", slo.le(seconds(o.wait))))
        count = _q(c, "celery_task_queue_wait_seconds_count", QUEUE, *mine)
        late = (f"(1 - sum {g}(increase({within}[{c.budget_period}])) / sum {g}(increase({count}[{c.budget_period}])))")
        terms.append(f"1 - {late} / {1 - o.target:g}")
    return "\nor\n".join(terms)


def objectives_view(c: Config) -> Dashboard:
    """Each queue against its own objective: how long a task published now waits, how many started in
    time, and how much of the error budget is left."""
    d, lay = _base(c, OBJECTIVES, "Celery / Queues and objectives",
                   "Each queue against its wait objective: expected wait, share of tasks started in time, "
                   "burn rates and error budget. The objectives are the mixin config's.", False)
    page, ticket = c.burn_page[0], c.burn_ticket[0]
    lay.row("Objectives")
    table_panel = _panel(
        c,
        table.Panel,
        "Queues against their objectives",
        "One row per queue: its wait objective, the expected wait of a task published now (true backlog / "
        f"start rate), that wait {c.breach_horizon} ahead at the current arrivals per start, and the age of "
        "the message at the head of the queue where the broker reports it. All in seconds.",
        "s",
        [
            (_r(c, slo.OBJECTIVE_SECONDS, QUEUE), "objective"),
            (_r(c, slo.EXPECTED_WAIT, QUEUE), "expected wait"),
            (_r(c, slo.PREDICTED, QUEUE), f"in {c.breach_horizon}"),
            (_r(c, slo.HEAD_AGE, QUEUE), "head age"),
        ],
        PromQueryFormat.TABLE,
    ).with_transformation(DataTransformerConfig(id_val="merge", options={}))
    lay.add(table_panel, w=24, h=8)
    lay.add(
        _ts(
            c,
            "Expected wait vs objective",
            "Per queue: the expected wait of a task published now (true backlog / start rate), the same "
            f"{c.breach_horizon} ahead if arrivals keep their ratio to starts, and the objective. "
            "CeleryQueueWaitWillBreach pages when the second passes the third while the backlog grows.",
            "s",
            (_r(c, slo.EXPECTED_WAIT, QUEUE), "{{queue_name}} expected wait"),
            (_r(c, slo.PREDICTED, QUEUE), f"{{{{queue_name}}}} in {c.breach_horizon}"),
            (_r(c, slo.OBJECTIVE_SECONDS, QUEUE), "{{queue_name}} objective"),
        )
    )
    lay.add(
        _ts(
            c,
            "Share started within objective",
            f"Per queue: the share of tasks that started within their objective, over {page.short} and "
            f"{page.long} (recorded from the queue-wait histogram's bucket at the objective), and the target.",
            "percentunit",
            (f"1 - {_r(c, slo.ERROR_RATIO, QUEUE, slo.window(page.short))}", f"{{{{queue_name}}}} {page.short}"),
            (f"1 - {_r(c, slo.ERROR_RATIO, QUEUE, slo.window(page.long))}", f"{{{{queue_name}}}} {page.long}"),
            (_r(c, slo.OBJECTIVE_RATIO, QUEUE), "{{queue_name}} target"),
        )
    )
    lay.add(
        _ts(
            c,
            "Burn rate",
            "How many times faster than allowed each queue spends its error budget, over the long window of "
            f"each page pair ({page.long}: pages over {page.factor:g}; "
            f"{c.burn_page[-1].long}: over {c.burn_page[-1].factor:g}) and of the first ticket pair "
            f"({ticket.long}: over {ticket.factor:g}). 1 spends exactly the budget over {c.budget_period}.",
            "short",
            *[(f"{_r(c, slo.ERROR_RATIO, QUEUE, slo.window(w))}\n/ ignoring (window)\n"
               f"(1 - {_r(c, slo.OBJECTIVE_RATIO, QUEUE)})",
               f"{{{{queue_name}}}} {w}")
              for w in dict.fromkeys((page.long, c.burn_page[-1].long, ticket.long))],
        )
    )
    lay.add(
        _stat(
            c,
            "Error budget left",
            f"The share of each queue's error budget (1 - target of its starts may be late) left over the "
            f"last {c.budget_period}: 100% = no task started late, 0% = the budget is spent.",
            "percentunit",
            (_budget_left(c), "{{queue_name}}"),
        )
    )
    lay.add(
        _ts(
            c,
            "Arrivals per start",
            f"Per queue: tasks arriving per task started, over {c.breach_short_window} and "
            f"{c.breach_long_window} (1 + the true backlog's growth per start). Above 1 the backlog and the "
            "wait grow; 1.05 means the wait grows by 3 s a minute.",
            "short",
            *[(_r(c, slo.ARRIVALS_RATIO, QUEUE, slo.window(w)), f"{{{{queue_name}}}} {w}")
              for w in (c.breach_short_window, c.breach_long_window)],
        )
    )
    lay.add(
        _ts(
            c,
            "Oldest message vs objective",
            "Per queue: how long the message at the head has been due (Redis; RabbitMQ classic queues; "
            "instrumented producers only), against the objective. Above it, a task already waited too long.",
            "s",
            (_r(c, slo.HEAD_AGE, QUEUE), "{{queue_name}} head"),
            (_r(c, slo.OBJECTIVE_SECONDS, QUEUE), "{{queue_name}} objective"),
        )
    )
    if any(o.runtime for o in c.queue_objectives):
        lay.add(
            _ts(
                c,
                "Runtime objectives",
                f"Per task with a runtime objective: the share of runs that finished within it, over "
                f"{page.long}.",
                "percentunit",
                (f"1 - {_r(c, slo.RUNTIME_ERROR_RATIO, QUEUE, slo.window(page.long))}", "{{name}} on {{queue_name}}"),
            ),
            w=24,
        )
    return d


DASHBOARDS: dict[str, Callable[[Config], Dashboard]] = {
    "celery-overview.json": overview,
    "celery-objectives.json": objectives_view,
    "celery-tasks.json": tasks,
    "celery-queues.json": queues,
    "celery-workers.json": workers,
    "celery-periodic.json": periodic,
}


def render(builder: Dashboard) -> str:
    """Stable JSON: sorted keys so that regeneration diffs stay empty."""
    return JSONEncoder(sort_keys=True, indent=2).encode(builder.build()) + "\n"

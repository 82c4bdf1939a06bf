"""The three Grafana dashboards, built with Grafana's foundation SDK.

Every query goes through `_q`, which adds the dashboard filters, so a panel
cannot forget one; every panel goes through `_panel`, which insists on a unit
and a description.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    GridPos,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from celery_signal_exporter.mixin.config import Config

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"

# Filters: (variable, label, the series the values come from).
TARGET = 'job=~"$job", namespace=~"$namespace"'
QUEUE = 'queue_name=~"$queue"'
TASK = 'name=~"$task"'
FINISHED = '__name__=~"celery_task_(failed|succeeded)_total"'

PanelBuilder = Any  # the SDK's panel builders share no public base class


def _q(metric: str, *matchers: str) -> str:
    """A selector with the job and namespace filters and any others."""
    return f"{metric}{{{', '.join((TARGET, *matchers))}}}"


def _target(expr: str, legend: str, ref: str, fmt: str | None = None) -> prometheus.Dataquery:
    query: prometheus.Dataquery = prometheus.Dataquery().expr(expr).legend_format(legend)
    query.ref_id(ref).datasource(DATASOURCE)
    if fmt is not None:
        query.format(PromQueryFormat(fmt))
    return query


class _Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.x = 0
        self.y = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.dashboard.with_row(Row(title).grid_pos(GridPos(h=1, w=24, x=0, y=self.y)))
        self.y += 1

    def add(self, panel: PanelBuilder, w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
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
    kind: Callable[[], PanelBuilder],
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    fmt: str | None = None,
) -> PanelBuilder:
    panel = kind().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + i), fmt))
    return panel


def _ts(title: str, description: str, unit: str, *targets: tuple[str, str]) -> PanelBuilder:
    return _panel(timeseries.Panel, title, description, unit, list(targets)).fill_opacity(10)


def _stat(title: str, description: str, unit: str, *targets: tuple[str, str]) -> PanelBuilder:
    return _panel(stat.Panel, title, description, unit, list(targets))


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
    """A dashboard with the datasource variable and the job/namespace/queue(/task) filters."""
    dashboard = (
        Dashboard(title)
        .uid(f"{c.uid_prefix}-{slug}")
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
        .with_variable(_variable("job", "Job", "label_values(celery_exporter_build_info, job)"))
        .with_variable(
            _variable("namespace", "Namespace", 'label_values(celery_exporter_build_info{job=~"$job"}, namespace)')
        )
        .with_variable(
            _variable(
                "queue",
                "Queue",
                f'label_values({{__name__=~"celery_queue_length|celery_task_sent_total|celery_task_received_total", '
                f"{TARGET}}}, queue_name)",
            )
        )
    )
    task = _variable(
        "task",
        "Task",
        f'label_values({{__name__=~"celery_task_sent_total|celery_task_received_total", {TARGET}, {QUEUE}}}, name)',
    )
    if not with_task:
        task = task.hide(VariableHide.HIDE_VARIABLE)
    dashboard = dashboard.with_variable(task)
    return dashboard, _Layout(dashboard)


def _quantiles(metric: str, by: str, matchers: tuple[str, ...]) -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({_q(metric + '_bucket', *matchers)}[{RATE}])))",
            f"{legend}p{round(float(q) * 100)}",
        )
        for q in ("0.5", "0.95", "0.99")
    ]


def overview(c: Config) -> Dashboard:
    """What an on-call engineer opens first: is work flowing, is anything piling up."""
    d, lay = _base(c, "overview", "Celery / Overview", "Throughput, backlog, latency, workers and broker memory.", True)
    qt = (QUEUE, TASK)
    lay.row("Throughput")
    lay.add(
        _ts(
            "Published vs completed",
            "Tasks published per second (every apply_async, retries included) against task runs that "
            "finished, whatever their outcome. A lasting gap means the backlog grows.",
            "ops",
            (f"sum(rate({_q('celery_task_sent_total', *qt)}[{RATE}]))", "published"),
            (f"sum(rate({_q('celery_task_runtime_seconds_count', *qt)}[{RATE}]))", "completed"),
        )
    )
    lay.add(
        _ts(
            "Failure ratio",
            "Failed runs as a share of finished runs (failed + succeeded). Retries are not failures.",
            "percentunit",
            (
                f"sum(rate({_q('celery_task_failed_total', *qt)}[{RATE}]))\n/\n"
                f"sum(rate({_q('', FINISHED, *qt)}[{RATE}]))",
                "failure ratio",
            ),
        )
    )
    lay.row("Queues")
    lay.add(
        _ts(
            "Queue length",
            "Messages waiting in each queue, as the broker probe reads them (Redis: every priority "
            "sub-queue summed; RabbitMQ: ready messages).",
            "short",
            (f"sum by (queue_name) ({_q('celery_queue_length', QUEUE)})", "{{queue_name}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Backlog growth",
            "How fast each queue grows (positive) or drains (negative), in messages per second.",
            "short",
            (f"sum by (queue_name) (deriv({_q('celery_queue_length', QUEUE)}[{RATE}]))", "{{queue_name}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Estimated time to drain",
            "Queue length divided by the rate workers take messages from it: how long the queue "
            "would take to empty if nothing new arrived. Missing while a queue is empty.",
            "s",
            (
                f"sum by (queue_name) ({_q('celery_queue_length', QUEUE)})\n/\n"
                f"sum by (queue_name) (rate({_q('celery_task_received_total', QUEUE)}[{RATE}]))",
                "{{queue_name}}",
            ),
        ),
        w=8,
    )
    lay.row("Latency")
    lay.add(
        _ts(
            "Runtime quantiles",
            "p50, p95 and p99 of task runtime (task_prerun to task_postrun), over the selected tasks.",
            "s",
            *_quantiles("celery_task_runtime_seconds", "", qt),
        )
    )
    lay.add(
        _ts(
            "Queue wait quantiles",
            "p50, p95 and p99 of the time from when a task was due (published, or its ETA) to when "
            "a worker started it.",
            "s",
            *_quantiles("celery_task_queue_wait_seconds", "", qt),
        )
    )
    lay.row("Workers and broker")
    lay.add(
        _stat(
            "Workers up",
            "Workers whose heartbeat is fresh. A worker that stopped reads 0 until its series ages out.",
            "short",
            (f"sum({_q('celery_worker_up')})", "up"),
        ),
        w=4,
    )
    lay.add(
        _ts(
            "Pool utilisation",
            "Tasks executing as a share of each worker's pool processes. Near 100% for long means "
            "the worker is saturated: add concurrency or workers.",
            "percentunit",
            (
                f"sum by (hostname) ({_q('celery_worker_tasks_active')})\n/\n"
                f"sum by (hostname) ({_q('celery_worker_pool_processes')})",
                "{{hostname}}",
            ),
        ),
        w=10,
    )
    lay.add(
        _ts(
            "Broker memory",
            "Memory the broker uses against its limit (Redis maxmemory, RabbitMQ high watermark). "
            "No limit line means the broker has none.",
            "bytes",
            (f"max by (broker, node) ({_q('celery_broker_memory_used_bytes')})", "{{node}} used"),
            (f"max by (broker, node) ({_q('celery_broker_memory_limit_bytes')} > 0)", "{{node}} limit"),
        ),
        w=10,
    )
    return d


def tasks(c: Config) -> Dashboard:
    """Per-task drill-down: pick a task and see how it behaves."""
    d, lay = _base(c, "tasks", "Celery / Tasks", "Outcomes, failures and latency of the selected tasks.", True)
    qt = (QUEUE, TASK)
    lay.row("Outcomes")
    lay.add(
        _ts(
            "Runs by outcome",
            "Tasks received, started, succeeded, failed and retried per second, by task. Received counts "
            "deliveries: redelivered ones (restored after a worker stopped, or requeued) count again, and are "
            "shown apart.",
            "ops",
            *[
                (f"sum by (name) (rate({_q(f'celery_task_{o}_total', *qt)}[{RATE}]))", f"{{{{name}}}} {o}")
                for o in ("received", "redelivered", "started", "succeeded", "failed", "retried")
            ],
        )
    )
    lay.add(
        _ts(
            "Failures by exception",
            "Failed runs per second by task and exception class. WorkerLostError means the pool process died mid-task.",
            "ops",
            (
                f"sum by (name, exception) (rate({_q('celery_task_failed_total', *qt)}[{RATE}]))",
                "{{name}} {{exception}}",
            ),
        )
    )
    lay.add(
        _ts(
            "Retries, revokes and expirations",
            "Retries, and messages dropped without running: revoked, expired before they started, "
            "or terminated while running; and rejected (unknown or undecodable) messages per queue.",
            "ops",
            (f"sum by (name) (rate({_q('celery_task_retried_total', *qt)}[{RATE}]))", "{{name}} retried"),
            (
                f"sum by (name, reason) (rate({_q('celery_task_revoked_total', *qt)}[{RATE}]))",
                "{{name}} {{reason}}",
            ),
            (
                f"sum by (queue_name) (rate({_q('celery_task_rejected_total', QUEUE)}[{RATE}]))",
                "{{queue_name}} rejected",
            ),
        )
    )
    lay.add(
        _ts(
            "In progress",
            "Tasks executing now, by task. A dead process's share disappears with it.",
            "short",
            (f"sum by (name) ({_q('celery_task_in_progress', *qt)})", "{{name}}"),
        )
    )
    lay.row("Latency")
    lay.add(
        _ts(
            "Runtime quantiles",
            "p50, p95 and p99 of runtime by task.",
            "s",
            *_quantiles("celery_task_runtime_seconds", "name", qt),
        )
    )
    lay.add(
        _ts(
            "Queue wait quantiles",
            "p50, p95 and p99 of the time from due to start, by task.",
            "s",
            *_quantiles("celery_task_queue_wait_seconds", "name", qt),
        )
    )
    lay.add(
        _panel(
            heatmap.Panel,
            "Runtime heatmap",
            "How many runs finished in each runtime bucket over time.",
            "s",
            [
                (
                    f"sum by (le) (increase({_q('celery_task_runtime_seconds_bucket', *qt)}[{RATE}]))",
                    "{{le}}",
                )
            ],
            PromQueryFormat.HEATMAP,
        ).calculate(False)
    )
    lay.add(
        _panel(
            heatmap.Panel,
            "Queue wait heatmap",
            "How many runs started after each queue-wait bucket over time.",
            "s",
            [
                (
                    f"sum by (le) (increase({_q('celery_task_queue_wait_seconds_bucket', *qt)}[{RATE}]))",
                    "{{le}}",
                )
            ],
            PromQueryFormat.HEATMAP,
        ).calculate(False)
    )
    lay.row("Freshness")
    lay.add(
        _panel(
            table.Panel,
            "Time since last success",
            "Seconds since each task last succeeded, oldest first. For periodic tasks this is the "
            "number the CeleryPeriodicTaskMissed alert watches.",
            "s",
            [(f"time() - max by (name) ({_q('celery_task_last_success_timestamp_seconds', TASK)})", "{{name}}")],
            PromQueryFormat.TABLE,
        ),
        w=24,
    )
    return d


def queues(c: Config) -> Dashboard:
    """Per-queue and per-broker view, from the broker probe."""
    d, lay = _base(
        c, "queues", "Celery / Queues and broker", "Queue depth and the broker's health, from the broker probe.", False
    )
    lay.row("Queues")
    by_q = "sum by (queue_name)"
    lay.add(
        _ts(
            "Length",
            "Messages waiting in each queue.",
            "short",
            (f"{by_q} ({_q('celery_queue_length', QUEUE)})", "{{queue_name}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Unacked",
            "Messages delivered to a worker and not yet acknowledged. RabbitMQ reports them per "
            "queue; Redis keeps one hash for all queues, shown per broker.",
            "short",
            (f"{by_q} ({_q('celery_queue_unacked', QUEUE)})", "{{queue_name}}"),
            (f"sum by (broker) ({_q('celery_broker_unacked')})", "{{broker}} (all queues)"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Consumers",
            "Consumers attached to each queue (RabbitMQ only: a Redis BRPOP does not say which queues it serves).",
            "short",
            (f"{by_q} ({_q('celery_queue_consumers', QUEUE)})", "{{queue_name}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Oldest message age",
            "How long the message at the head of each queue has been due (Redis only: RabbitMQ's "
            "API cannot read a message without consuming it).",
            "s",
            (f"max by (queue_name) ({_q('celery_queue_oldest_message_age_seconds', QUEUE)})", "{{queue_name}}"),
        )
    )
    lay.add(
        _ts(
            "Queue wait p95",
            "95th percentile of the time tasks from each queue waited between due and start.",
            "s",
            (
                f"histogram_quantile(0.95, sum by (queue_name, le) "
                f"(rate({_q('celery_task_queue_wait_seconds_bucket', QUEUE)}[{RATE}])))",
                "{{queue_name}}",
            ),
        )
    )
    lay.row("Broker")
    lay.add(
        _stat(
            "Broker up",
            "1 when the last probe of each broker succeeded.",
            "short",
            (f"max by (broker) ({_q('celery_broker_up')})", "{{broker}}"),
        ),
        w=6,
    )
    lay.add(
        _ts(
            "Memory",
            "Memory used by each broker node against its limit.",
            "bytes",
            (f"max by (broker, node) ({_q('celery_broker_memory_used_bytes')})", "{{node}} used"),
            (f"max by (broker, node) ({_q('celery_broker_memory_limit_bytes')} > 0)", "{{node}} limit"),
        ),
        w=10,
    )
    lay.add(
        _ts(
            "Alarms",
            "RabbitMQ memory and disk alarms by node; while one is raised the broker blocks publishers.",
            "short",
            (f"max by (node) ({_q('celery_broker_memory_alarm')})", "{{node}} memory"),
            (f"max by (node) ({_q('celery_broker_disk_alarm')})", "{{node}} disk"),
        ),
        w=8,
    )
    lay.row("Probe health")
    lay.add(
        _ts(
            "Probe duration",
            "How long each probe cycle took, success or not.",
            "s",
            (f"max by (broker) ({_q('celery_exporter_probe_duration_seconds')})", "{{broker}}"),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Probe errors",
            "Failed probe cycles per second by reason: connection, timeout, auth, protocol, other.",
            "ops",
            (
                f"sum by (broker, reason) (rate({_q('celery_exporter_probe_errors_total')}[{RATE}]))",
                "{{broker}} {{reason}}",
            ),
            (
                f"sum by (broker) (rate({_q('celery_exporter_probe_queues_dropped_total')}[{RATE}]))",
                "{{broker}} queues dropped",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Since last successful probe",
            "Seconds since each broker was last read successfully.",
            "s",
            (
                f"time() - max by (broker) ({_q('celery_exporter_probe_last_success_timestamp_seconds')})",
                "{{broker}}",
            ),
        ),
        w=8,
    )
    lay.row("Exporter health")
    lay.add(
        _ts(
            "Instrumentation errors",
            "Signal receivers that raised (swallowed so the task is unharmed), label values folded into "
            "__overflow__ once max_task_names or max_queue_names was reached, and label values cut to "
            "200 characters. All should stay flat at 0.",
            "ops",
            (
                f"sum by (signal) (rate({_q('celery_exporter_handler_errors_total')}[{RATE}]))",
                "{{signal}} errors",
            ),
            (
                f"sum by (label) (rate({_q('celery_exporter_dropped_label_values_total')}[{RATE}]))",
                "{{label}} dropped",
            ),
            (
                f"sum by (label) (rate({_q('celery_exporter_label_values_truncated_total')}[{RATE}]))",
                "{{label}} truncated",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Metrics files and cardinality",
            "Files in each exporter's metrics directory by state; unreadable ones are skipped, counted and "
            "logged, never deleted. Dead pool processes compacted into the archive show how fast children "
            "recycle; task and queue names folded into __overflow__ at merge show a name explosion; a failed merge "
            "(the scrape still answers, without the directory's series) should never happen.",
            "short",
            (f"sum by (instance, state) ({_q('celery_exporter_metrics_files')})", "{{instance}} {{state}}"),
            (
                f"sum by (instance) (increase({_q('celery_exporter_compacted_processes_total')}[{RATE}]))",
                "{{instance}} processes compacted",
            ),
            (f"max by (instance) ({_q('celery_exporter_task_names_folded')})", "{{instance}} task names folded"),
            (f"max by (instance) ({_q('celery_exporter_queue_names_folded')})", "{{instance}} queue names folded"),
            (
                f"sum by (instance) (increase({_q('celery_exporter_merge_errors_total')}[{RATE}]))",
                "{{instance}} failed merges",
            ),
        ),
        w=8,
    )
    lay.add(
        _ts(
            "Scrape duration",
            "How long each exporter took to merge its metrics directory for the previous scrape.",
            "s",
            (f"max by (instance) ({_q('celery_exporter_scrape_duration_seconds')})", "{{instance}}"),
        ),
        w=8,
    )
    return d


DASHBOARDS: dict[str, Callable[[Config], Dashboard]] = {
    "celery-overview.json": overview,
    "celery-tasks.json": tasks,
    "celery-queues.json": queues,
}


def render(builder: Dashboard) -> str:
    """Stable JSON: sorted keys so that regeneration diffs stay empty."""
    return JSONEncoder(sort_keys=True, indent=2).encode(builder.build()) + "\n"

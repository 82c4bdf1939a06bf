"""Recording and alerting rules, built from a `Config`.

Recording rules aggregate across pods by the config's group labels plus the
queue or task, so the alerts below compare like with like: queue length comes
from the broker probe's pod, consumption from the workers' sidecars.
"""

from __future__ import annotations

from typing import Any

from celery_signal_exporter.mixin import objectives, panels
from celery_signal_exporter.mixin.alert import Alert, num
from celery_signal_exporter.mixin.config import Config, check_objectives, matcher, seconds
from celery_signal_exporter.mixin.panels import OVERVIEW, PERIODIC, QUEUES, TASKS

QUANTILES = ("0.5", "0.95", "0.99")


def recording_rules(c: Config) -> list[dict[str, Any]]:
    """Rules whose names follow `level:metric:operation`, the levels being `queue` and `task`."""
    g = c.by
    finished = c.sel(matcher("__name__", "celery_task_(failed|succeeded)_total"))
    rules: list[dict[str, Any]] = [
        {
            "record": "queue:celery_task_sent:rate",
            "expr": f"sum by ({g}queue_name) (rate(celery_task_sent_total{{{c.sel()}}}[{c.rate_window}]))",
        },
        {
            # Deliveries to workers. Not consumption: a prefetched message is received long before it
            # runs, so this reads high while tasks wait in a worker (CeleryQueueNoConsumers only asks
            # whether anybody takes messages at all).
            "record": "queue:celery_task_received:rate",
            "expr": f"sum by ({g}queue_name) (rate(celery_task_received_total{{{c.sel()}}}[{c.rate_window}]))",
        },
        {
            # Consumption: the rate at which tasks leave the backlog, whatever the prefetch.
            "record": "queue:celery_task_started:rate",
            "expr": f"sum by ({g}queue_name) (rate(celery_task_started_total{{{c.sel()}}}[{c.rate_window}]))",
        },
        {
            "record": "queue:celery_queue_length:sum",
            "expr": f"sum by ({g}queue_name) (celery_queue_length{{{c.sel()}}})",
        },
        *_held_rules(c),
        {
            # Growth of the true backlog, messages per second: what CeleryBacklogGrowing and the
            # "Backlog growth" panel read. A short window, so an overload shows within minutes.
            "record": "queue:celery_queue_backlog:deriv",
            "expr": f"deriv(queue:celery_queue_backlog:sum[{c.backlog_growth_window}])",
        },
        {
            # The start rate over the same window, the bar that growth is held to: a 5m rate would
            # lag a queue that just woke up, and let a mild overload page while it catches up.
            "record": "queue:celery_task_started:short_rate",
            "expr": f"sum by ({g}queue_name) "
            f"(rate(celery_task_started_total{{{c.sel()}}}[{c.backlog_growth_window}]))",
        },
        {
            # Seconds to empty the true backlog at the current start rate, ignoring new arrivals.
            # A queue nobody consumes gets +Inf rather than no series at all.
            "record": "queue:celery_queue_drain_seconds:estimate",
            "expr": "queue:celery_queue_backlog:sum\n/\n"
            "(queue:celery_task_started:rate or queue:celery_queue_backlog:sum * 0)",
        },
        _waiting_rule(c),
        {
            "record": "task:celery_task_failure:ratio",
            "expr": (
                f"(\n  sum by ({g}name) (rate(celery_task_failed_total{{{c.sel()}}}[{c.failure_window}]))\n"
                f"  or\n  sum by ({g}name) (rate(celery_task_succeeded_total{{{c.sel()}}}[{c.failure_window}])) * 0\n"
                ")\n/\n(\n  "
                f"sum by ({g}name) (rate({{{finished}}}"
                f"[{c.failure_window}]))"
                # Runs that replaced themselves or raised Ignore are runs, not failures. Added
                # family by family: without the metric name their series would clash with succeeded's.
                + "".join(
                    f"\n+\n(\n  sum by ({g}name) (rate(celery_task_{o}_total{{{c.sel()}}}[{c.failure_window}]))\n"
                    f"  or\n  sum by ({g}name) (rate({{{finished}}}[{c.failure_window}])) * 0\n)"
                    for o in ("replaced", "ignored")
                )
                + "\n)"
            ),
        },
    ]
    for level, by, metric in (
        ("task", "name", "celery_task_runtime_seconds"),
        ("queue", "queue_name", "celery_task_queue_wait_seconds"),
    ):
        for q in QUANTILES:
            rules.append(
                {
                    "record": f"{level}:{metric}:quantile",
                    "expr": f"histogram_quantile({q}, sum by ({g}{by}, le) "
                    f"(rate({metric}_bucket{{{c.sel()}}}[{c.rate_window}])))",
                    "labels": {"quantile": q},
                }
            )
    return rules


def _held_rules(c: Config) -> list[dict[str, Any]]:
    """Work per queue that left the broker's count but has not started, and what serves each queue.

    A message a worker prefetched or holds for its ETA is unacked on both brokers until it starts
    (with acks_late, until it ends). Workers report what they hold: reserved and scheduled, never a
    running task. RabbitMQ reports unacked per queue, which also counts acks_late runs in progress
    and whatever consumers that report nothing hold. The backlog adds to the ready messages the
    larger of held and unacked-minus-runs-in-progress: adding both would count a prefetched message
    twice. Subtracting the runs keeps an acks_late run out of the backlog; with early acks it takes
    off too much, which does not matter while held is the larger.
    """
    g = c.by
    held = c.sel(matcher("__name__", "celery_worker_tasks_(reserved|scheduled)"))
    running = f"sum by ({g}queue_name) (celery_task_in_progress{{{c.sel()}}})"
    unacked = f"sum by ({g}queue_name) (celery_queue_unacked{{{c.sel()}}})"
    return [
        {
            # Prefetched (reserved) plus ETA/countdown (scheduled) tasks, summed over the workers.
            "record": "queue:celery_worker_tasks_held:sum",
            "expr": f"sum by ({g}queue_name) ({{{held}}})",
        },
        {
            # RabbitMQ only: messages out with consumers that no run in progress accounts for.
            "record": "queue:celery_queue_unacked_not_running:sum",
            "expr": f"clamp_min(\n  {unacked}\n  -\n  (\n    {running}\n    or\n    {unacked} * 0\n  ),\n  0\n)",
        },
        {
            # The true backlog: ready in the broker, plus held in workers or unacked and not running,
            # whichever is larger (one series per queue whichever of them exist).
            "record": "queue:celery_queue_backlog:sum",
            "expr": "queue:celery_queue_length:sum\n+\n(\n"
            "  queue:celery_worker_tasks_held:sum >= queue:celery_queue_unacked_not_running:sum\n"
            "  or\n  queue:celery_queue_unacked_not_running:sum\n"
            "  or\n  queue:celery_worker_tasks_held:sum\n"
            "  or\n  queue:celery_queue_length:sum * 0\n)",
        },
        {
            # Pool slots serving each queue: a worker's processes count for every queue it consumes.
            # Both sides are aggregated to one series per worker first, so the match is one-to-one
            # whatever else (instance, pod) tells two scrapes of a worker apart.
            "record": "queue:celery_worker_slots:sum",
            "expr": f"sum by ({g}queue_name) (\n"
            f"  max by ({g}hostname, queue_name) (celery_worker_consuming{{{c.sel()}}})\n"
            f"  * on ({g}hostname) group_left\n"
            f"  max by ({g}hostname) (celery_worker_pool_processes{{{c.sel()}}})\n)",
        },
    ]


def _waiting_rule(c: Config) -> dict[str, Any]:
    """Tasks sent and not yet started, per task and queue: a wait seen while it lasts.

    The queue-wait histogram observes a wait when the run starts, so a task stuck behind a clogged
    queue shows nothing there until it is over. Publishes minus starts (and minus runs revoked or
    expired before they started) over `waiting_window` counts the task's messages still waiting,
    wherever they are: ready, prefetched or scheduled. Waits longer than the window count only what
    was sent within it; messages a broker dropped unseen (a RabbitMQ message TTL) count until they
    leave the window. Needs instrumented producers (`celery_task_sent_total`).
    """
    g = c.by
    w = c.waiting_window
    by = f"sum by ({g}name, queue_name)"
    sent = f"{by} (increase(celery_task_sent_total{{{c.sel()}}}[{w}]))"
    gone = c.sel(matcher("__name__", "celery_task_(started|revoked)_total"), matcher("reason", "terminated", "!="))
    left = f"{by} (increase({{{gone}}}[{w}]))"
    return {
        "record": "task:celery_task_waiting:estimate",
        "expr": f"clamp_min(\n  {sent}\n  -\n  (\n    {left}\n    or\n    {sent} * 0\n  ),\n  0\n)",
    }


def dropped_and_slower_rules(c: Config) -> list[dict[str, Any]]:
    """Recorded series of CeleryTasksDroppedByBroker and CeleryTaskSlowerThanYesterday: messages a broker
    dropped unseen, and a task's mean runtime now and its baseline."""
    g = c.by
    seconds(c.slower_baseline)  # a bad duration fails here, with its value named
    runtime = f"celery_task_runtime_seconds_{{part}}{{{{{c.sel()}}}}}[{c.slower_window}]"
    sent, received, revoked = (f"sum by ({g}name, queue_name) (increase(celery_task_{m}_total{{{c.sel()}}}"
                               f"[{c.dropped_window}]))" for m in ("sent", "received", "revoked"))
    return [
        {
            # The mean (sum over count), which moves with every run, not in bucket steps as a quantile does.
            "record": "task:celery_task_runtime_seconds:mean",
            "expr": f"sum by ({g}name) (rate({runtime.format(part='sum')}))\n/\n"
            f"sum by ({g}name) (rate({runtime.format(part='count')}))",
        },
        {
            # The same mean a baseline earlier, read from the raw series: it needs no recorded history.
            "record": "task:celery_task_runtime_seconds:mean_baseline",
            "expr": f"sum by ({g}name) (rate({runtime.format(part='sum')} offset {c.slower_baseline}))\n/\n"
            f"sum by ({g}name) (rate({runtime.format(part='count')} offset {c.slower_baseline}))",
        },
        {
            # Published, less taken off the broker by a worker (received, or revoked on arrival: an expired
            # message a worker drops is not received), less what the queue grew by: messages the broker
            # dropped unseen. A queue's growth is taken off each of its tasks, so a shared queue under-counts
            # rather than over-counts; without a probe's queue length there is no estimate.
            "record": "task:celery_task_dropped:estimate",
            "expr": f"(\n  {sent}\n  - ({received} or {sent} * 0)\n  - ({revoked} or {sent} * 0)\n)\n"
            f"- on ({g}queue_name) group_left\n"
            f"clamp_min(sum by ({g}queue_name) (delta(celery_queue_length{{{c.sel()}}}[{c.dropped_window}])), 0)",
        },
    ]


def _dropped_and_slower_alerts(c: Config) -> list[Alert]:
    """Messages dropped by the broker, and tasks slower than the day before."""
    g = c.by
    task = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels) + "{{ $labels.name }}"
    runs = f"sum by ({g}name) (increase(celery_task_runtime_seconds_count{{{c.sel()}}}[{c.slower_window}]"
    return [
        Alert(
            "CeleryTasksDroppedByBroker",
            f"task:celery_task_dropped:estimate >= {num(c.dropped_min)}\nand\n"
            f"task:celery_task_dropped:estimate\n> {num(c.dropped_ratio)} * "
            f"sum by ({g}name, queue_name) (increase(celery_task_sent_total{{{c.sel()}}}[{c.dropped_window}]))",
            c.dropped_for,
            "warning",
            "A broker drops Celery tasks before any worker receives them.",
            f"About {{{{ $value | humanize }}}} messages of task {task} sent to queue {{{{ $labels.queue_name }}}} "
            f"over the last {c.dropped_window} were neither received by a worker nor left waiting: the broker "
            "dropped them, most likely as expired (Celery's `expires` is a message TTL on RabbitMQ).",
            (TASKS, "Retries, revokes and expirations"),
        ),
        Alert(
            "CeleryTaskSlowerThanYesterday",
            "task:celery_task_runtime_seconds:mean\n/\ntask:celery_task_runtime_seconds:mean_baseline\n"
            f"> {num(c.slower_ratio)}\nand on ({g}name)\n{runs})) >= {num(c.slower_runs_min)}\n"
            f"and on ({g}name)\n{runs} offset {c.slower_baseline})) >= {num(c.slower_runs_min)}",
            c.slower_for,
            "warning",
            "A Celery task runs much slower than the day before.",
            f"Task {task} takes {{{{ $value | humanize }}}} times its mean runtime of {c.slower_baseline} before "
            f"(mean over {c.slower_window}); the threshold is {num(c.slower_ratio)} times.",
            (TASKS, "Runtime quantiles"),
        ),
    ]


def _stuck(c: Config) -> str:
    """A run older than its task's Celery time limit, else than its `run_limits` entry (first match)."""
    g = c.by
    age = f"max by ({g}name, queue_name) (celery_task_oldest_running_age_seconds{{{c.sel()}}})"
    limit = f"max by ({g}name) (celery_task_time_limit_seconds{{{c.sel()}}})"
    taken: list[str] = []
    parts = []
    for r in c.run_limits:
        # Later entries leave out the names an earlier entry matched: the first match wins.
        mine = c.sel(matcher("name", r.name_regex), *(matcher("name", t, "!~") for t in taken))
        parts.append(
            f"max by ({g}name, queue_name) (celery_task_oldest_running_age_seconds{{{mine}}}) "
            f"> {num(seconds(r.max_age))}"
        )
        taken.append(r.name_regex)
    configured = "\n  or\n  ".join(parts)
    return (
        f"{age}\n> on ({g}name) group_left\n{limit}\n"
        f"or\n(\n  {configured}\n)\nunless on ({g}name)\n{limit}"
    )


def alerts(c: Config) -> list[Alert]:
    """Every alert the config leaves on, in the order of docs/runbooks.md."""
    every = (objectives.alerts(c) + _all_alerts(c) + _worker_state_alerts(c) + _dropped_and_slower_alerts(c)
             + _volume_alerts(c))
    check_objectives(c)
    unknown = sorted(set(c.disabled_alerts) - {a.name for a in every})
    if unknown:
        raise ValueError(f"disabled_alerts: no alert named {', '.join(unknown)}")
    return [a for a in every if a.name not in c.disabled_alerts]


def _all_alerts(c: Config) -> list[Alert]:
    return _celery_alerts(c) + _beat_alerts(c)


def _alarm_seen(c: Config, metric: str) -> str:
    """The probe's alarm checks within the window that found the alarm raised. Counted by the probe
    every second, a flapping alarm adds up burst by burst, where a gauge with a `for` is reset by
    every clear, and a gauge sampled at scrapes sees a 2-6 s burst by chance only. At least
    `broker_alarm_samples` checks, so an alarm of a second, caught by one check or two, stays quiet."""
    return (f"max by ({c.by}broker, node) (increase({metric}{{{c.sel()}}}[{c.broker_alarm_window}]))\n"
            f">= {c.broker_alarm_samples}")


def _celery_alerts(c: Config) -> list[Alert]:
    g = c.by
    where = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels)
    queue = f"{where}{{{{ $labels.queue_name }}}}"
    task = f"{where}{{{{ $labels.name }}}}"
    broker = "{{ $labels.broker }} (node {{ $labels.node }})"
    periodic = "\nor\n".join(
        f"time() - max by ({g}name) "
        f"(celery_task_last_success_timestamp_seconds{{{c.sel(matcher('name', p.name_regex))}}}) "
        f"> {num(seconds(p.max_age))}"
        for p in c.periodic_tasks
    )
    expired = c.sel(matcher("reason", "expired", "="))
    return [
        Alert(
            # The true backlog's own growth, over a short window, against the rate tasks start: prefetch
            # and ETAs cannot hide it (held tasks are in the backlog) and producers need no instrumentation.
            # Measured against the start rate, so the noise of a busy steady queue stays far under the bar
            # and a long queue that drains (negative growth) never pages; the floor keeps small queues
            # quiet. A burst enqueued at once raises the backlog for less than the window, so it does not
            # stay over the bar for `backlog_for`; growth that lasts does, and stops as soon as starts
            # catch up with arrivals (the growth turns negative within the window: the page resolves).
            "CeleryBacklogGrowing",
            f"queue:celery_queue_backlog:sum > {c.backlog_floor}\nand\nqueue:celery_queue_backlog:deriv\n"
            f"> {num(c.backlog_growth_ratio)}\n"
            "* (queue:celery_task_started:short_rate or queue:celery_queue_backlog:sum * 0)",
            c.backlog_for,
            "warning",
            "A Celery queue's backlog keeps growing.",
            f"Queue {queue} holds {{{{ $value | humanize }}}} messages (waiting, and held in workers) and has grown "
            f"faster than {num(c.backlog_growth_ratio * 100)}% of its start rate for {c.backlog_for}: "
            "tasks arrive faster than workers start them.",
            (OVERVIEW, "Backlog growth"),
        ),
        Alert(
            # Broker capacity, a ticket: a count says nothing of waiting (CeleryQueueWaitWillBreach pages
            # on that), but a broker holds only so many messages.
            "CeleryBacklogWillBreach",
            f"predict_linear(queue:celery_queue_backlog:sum[{c.predict_window}], "
            f"{num(seconds(c.backlog_horizon))}) > {c.queue_limit}\n"
            f"and\nqueue:celery_queue_backlog:sum > {c.backlog_floor}",
            c.backlog_breach_for,
            "warning",
            "A Celery queue will pass its size limit soon.",
            f"At its current growth queue {queue} will hold {{{{ $value | humanize }}}} messages (waiting, and held "
            f"in workers) within {c.backlog_horizon}, over the limit of {c.queue_limit}.",
            (OVERVIEW, "Queue length"),
        ),
        Alert(
            "CeleryQueueDrainTooSlow",
            f"queue:celery_queue_drain_seconds:estimate > {num(seconds(c.drain_max))} < +Inf",
            c.drain_for,
            "warning",
            "A Celery queue will take too long to empty.",
            f"At the rate workers start its tasks, queue {queue} needs {{{{ $value | humanizeDuration }}}} "
            f"to empty; the target is {c.drain_max}.",
            (OVERVIEW, "Estimated time to drain"),
        ),
        Alert(
            "CeleryQueueNoConsumers",
            f"queue:celery_queue_length:sum > 0\nunless on ({g}queue_name)\n(\n"
            f"  queue:celery_task_received:rate > 0\n  or\n"
            f"  queue:celery_worker_slots:sum > 0\n  or\n"
            f"  sum by ({g}queue_name) (celery_queue_consumers{{{c.sel()}}}) > 0\n)",
            c.no_consumers_for,
            "critical",
            "Messages wait in a Celery queue that nobody consumes.",
            f"Queue {queue} holds {{{{ $value | humanize }}}} messages, no live worker consumes it and none has "
            f"taken one for {c.no_consumers_for}.",
            (QUEUES, "Consumers"),
        ),
        Alert(
            "CeleryBrokerMemoryHigh",
            f"max by ({g}broker, node) (celery_broker_memory_used_bytes{{{c.sel()}}})\n/\n"
            f"max by ({g}broker, node) (celery_broker_memory_limit_bytes{{{c.sel()}}} > 0)\n"
            f"> {num(c.broker_memory_ratio)}",
            c.broker_memory_for,
            "warning",
            "A Celery broker is close to its memory limit.",
            f"Broker {broker} uses {{{{ $value | humanizePercentage }}}} of its memory limit; "
            f"the threshold is {num(c.broker_memory_ratio * 100)}%.",
            (QUEUES, "Memory"),
        ),
        Alert(
            "CeleryBrokerMemoryWillBreach",
            f"max by ({g}broker, node) (predict_linear(celery_broker_memory_used_bytes{{{c.sel()}}}"
            f"[{c.predict_window}], {num(seconds(c.broker_memory_horizon))}))\n>\n"
            f"max by ({g}broker, node) (celery_broker_memory_limit_bytes{{{c.sel()}}} > 0)",
            c.broker_memory_predict_for,
            "warning",
            "A Celery broker will reach its memory limit soon.",
            f"At its current growth broker {broker} will use {{{{ $value | humanize1024 }}}}B "
            f"within {c.broker_memory_horizon}, over its memory limit.",
            (QUEUES, "Memory"),
        ),
        Alert(
            "CeleryBrokerMemoryAlarm",
            _alarm_seen(c, "celery_broker_memory_alarm_raised_checks_total"),
            c.broker_alarm_for,
            "critical",
            "A RabbitMQ memory alarm is blocking publishers.",
            f"The probe's alarm checks found the memory alarm of broker {broker} raised {c.broker_alarm_samples} "
            f"or more times within {c.broker_alarm_window}, steadily or in bursts: it blocks every connection "
            "that publishes until memory use falls below "
            "the watermark.",
            (QUEUES, "Alarms"),
        ),
        Alert(
            "CeleryBrokerDiskAlarm",
            _alarm_seen(c, "celery_broker_disk_alarm_raised_checks_total"),
            c.broker_alarm_for,
            "critical",
            "A RabbitMQ disk alarm is blocking publishers.",
            f"The probe's alarm checks found the free-disk alarm of broker {broker} raised {c.broker_alarm_samples} "
            f"or more times within {c.broker_alarm_window}, steadily or in bursts: it blocks every connection "
            "that publishes until disk space is freed.",
            (QUEUES, "Alarms"),
        ),
        Alert(
            "CeleryBrokerDown",
            f"max by ({g}broker) (celery_broker_up{{{c.sel()}}}) == 0",
            c.broker_down_for,
            "critical",
            "The exporter cannot reach a Celery broker.",
            "Every probe of broker {{ $labels.broker }} has failed for "
            f"{c.broker_down_for}; celery_exporter_probe_errors_total says why.",
            (QUEUES, "Broker up"),
        ),
        Alert(
            "CeleryExporterDown",
            f"up{{{c.sel()}}} == 0\nor\nabsent(up{{{c.sel()}}})",
            c.exporter_down_for,
            "warning",
            "Prometheus cannot scrape a Celery exporter.",
            "Target {{ $labels.job }}/{{ $labels.instance }} is down, or no target matches at all: "
            "Celery is not monitored there.",
            (QUEUES, "Scrape duration"),
        ),
        Alert(
            "CeleryTaskFailureRatioHigh",
            f"task:celery_task_failure:ratio > {num(c.failure_ratio)}\nand\n"
            f"sum by ({g}name) (increase(celery_task_failed_total{{{c.sel()}}}[{c.failure_window}])) "
            f">= {c.failure_min}",
            c.failure_for,
            "warning",
            "A Celery task fails too often.",
            f"{{{{ $value | humanizePercentage }}}} of runs of task {task} failed over the last {c.failure_window}; "
            f"the threshold is {num(c.failure_ratio * 100)}%.",
            (OVERVIEW, "Failure ratio"),
        ),
        Alert(
            "CeleryWorkerDown",
            f"max by ({g}hostname) (celery_worker_up{{{c.sel()}}}) == 0",
            c.worker_down_for,
            "warning",
            "A Celery worker has stopped.",
            f"Worker {where}{{{{ $labels.hostname }}}} has sent no heartbeat for {c.worker_down_for}: it was "
            "killed or lost its node (a worker shut down gracefully is no longer served, and does not page).",
            (OVERVIEW, "Workers up"),
        ),
        Alert(
            "CeleryTasksExpiring",
            f"sum by ({g}name, queue_name) (increase(celery_task_revoked_total{{{expired}}}[{c.failure_window}])) > 0",
            c.expiring_for,
            "warning",
            "Celery tasks expire before a worker runs them.",
            f"{{{{ $value | humanize }}}} messages of task {task} from queue {{{{ $labels.queue_name }}}} "
            f"expired before they started over the last {c.failure_window}.",
            (TASKS, "Retries, revokes and expirations"),
        ),
        Alert(
            # A ticket: the work of these runs is lost, but one run is rarely an outage.
            "CeleryTaskRetriesExhausted",
            f"sum by ({g}name, queue_name) (increase(celery_task_retries_exhausted_total{{{c.sel()}}}"
            f"[{c.failure_window}])) > 0",
            c.retries_exhausted_for,
            "warning",
            "Celery tasks gave up after their last retry.",
            f"{{{{ $value | humanize }}}} runs of task {task} from queue {{{{ $labels.queue_name }}}} failed for "
            f"good after retrying over the last {c.failure_window}: their work is lost unless someone reruns it.",
            (TASKS, "Failures by exception"),
        ),
    ] + ([
        # For tasks beat does not schedule (cron, another scheduler): by name regex; off unless configured.
        Alert(
            "CeleryTaskSuccessStale",
            periodic,
            "0s",
            "warning",
            "A periodic Celery task has not succeeded in time.",
            f"Task {task} last succeeded {{{{ $value | humanizeDuration }}}} ago.",
            (TASKS, "Time since last success"),
        ),
    ] if c.periodic_tasks else [])


def _beat_alerts(c: Config) -> list[Alert]:
    """Periodic tasks, read from beat's schedule: beat down, entries missed, not succeeding,
    overlapping, expiring. `entry` is the schedule entry's name, `name` its task."""
    g = c.by
    where = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels)
    entry = f"{where}{{{{ $labels.entry }}}} ({{{{ $labels.name }}}})"
    e = f"{g}entry, name"

    def q(metric: str) -> str:
        return f"{metric}{{{c.sel()}}}"

    window, lag = c.periodic_window, f"{num(seconds(c.periodic_start_lag))}s"
    started_window = f"{num(seconds(window) + seconds(lag))}s"
    return [
        Alert(
            "CeleryBeatDown",
            f"max by ({g}hostname) ({q('celery_beat_up')}) == 0\nor\n"
            f"(\n  absent({q('celery_beat_up')})\n  and on ()\n"
            f"  count(last_over_time({q('celery_beat_up')}[{c.beat_seen_window}])) > 0\n)",
            c.beat_down_for,
            "critical",
            "Celery beat is down: no periodic task is being sent.",
            f"Beat {where}{{{{ $labels.hostname }}}} has sent no heartbeat for {c.beat_down_for}, has shut down, "
            f"or its exporter no longer serves it (it did within {c.beat_seen_window}).",
            (PERIODIC, "Beat up"),
        ),
        Alert(
            "CeleryPeriodicTaskMissed",
            f"time() - max by ({e}) ({q('celery_beat_entry_next_due_timestamp_seconds')})\n"
            f"> {num(seconds(c.periodic_missed_grace))}",
            c.periodic_missed_for,
            "warning",
            "A periodic task was not sent when it was due.",
            f"Entry {entry} was due {{{{ $value | humanizeDuration }}}} ago and beat has not sent it; "
            f"the grace is {c.periodic_missed_grace}.",
            (PERIODIC, "Entries"),
        ),
        Alert(
            "CeleryPeriodicTaskNotSucceeding",
            f"(\n  max by ({e}) ({q('celery_beat_entry_last_dispatch_timestamp_seconds')})\n  - (\n"
            f"    max by ({e}) (max_over_time({q('celery_beat_entry_last_success_timestamp_seconds')}"
            f"[{c.periodic_lookback}]))\n    or\n"
            f"    min by ({e}) (min_over_time({q('celery_beat_entry_last_dispatch_timestamp_seconds')}"
            f"[{c.periodic_lookback}]))\n  )\n)\n"
            f"> {c.periodic_not_succeeding_intervals} * max by ({e}) ({q('celery_beat_entry_interval_seconds')})",
            c.periodic_not_succeeding_for,
            "warning",
            "A periodic task is sent but does not succeed.",
            f"Entry {entry} was last sent {{{{ $value | humanizeDuration }}}} after its last success, more than "
            f"{c.periodic_not_succeeding_intervals} of its intervals.",
            (PERIODIC, "Entries"),
        ),
        Alert(
            "CeleryPeriodicTaskOverlapping",
            f"sum by ({e}) (increase({q('celery_beat_entry_overlaps_total')}[{window}])) > 0\nor\n"
            f"sum by ({e}) ({q('celery_beat_entry_running')}) > 1",
            "0s",
            "warning",
            "Runs of a periodic task overlap.",
            f"Entry {entry} was still running when its next run was due ({{{{ $value | humanize }}}} over the last "
            f"{window}, or as many runs in progress now): it needs a lock, or a longer interval.",
            (PERIODIC, "Overlaps"),
        ),
        Alert(
            "CeleryPeriodicTaskExpiring",
            f"sum by ({e}) (increase({q('celery_beat_entry_expired_total')}[{window}])) > 0\nor\n"
            # Runs sent between `lag` and `lag + window` ago (each increase is extrapolated alike, hence > 0.5)
            # of which none started since: on RabbitMQ the broker drops expired runs unseen.
            f"(\n  (\n    sum by ({e}) (increase({q('celery_beat_entry_dispatched_total')}[{started_window}]))\n"
            f"    - sum by ({e}) (increase({q('celery_beat_entry_dispatched_total')}[{lag}]))\n  ) > 0.5\n"
            f"  unless\n  sum by ({e}) (increase({q('celery_beat_entry_started_total')}[{started_window}])) > 0\n)",
            "0s",
            "warning",
            "Runs of a periodic task expire before they start.",
            f"Entry {entry}: {{{{ $value | humanize }}}} runs expired before a worker started them, or none of the "
            f"runs sent over {window} started within {c.periodic_start_lag}.",
            (PERIODIC, "Expired and unstarted runs"),
        ),
    ]


def _worker_state_alerts(c: Config) -> list[Alert]:
    """Alerts on what the worker mains report of their runs."""
    task = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels) + "{{ $labels.name }}"
    return [
        Alert(
            "CeleryTaskStuck",
            _stuck(c),
            c.stuck_for,
            "warning",
            "A Celery task has run for longer than it may.",
            f"A run of task {task} from queue {{{{ $labels.queue_name }}}} has been running for "
            "{{ $value | humanizeDuration }}, past its time limit (or its run_limits entry where it has none).",
            (TASKS, "Oldest run vs time limit"),
        ),
    ]


def _volume_alerts(c: Config) -> list[Alert]:
    """Counts the metrics volume refused: a full or read-only volume loses runs, never silently.
    Its window is `failure_window`, the one the other counts of lost work use."""
    where = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels)
    return [
        Alert(
            "CeleryExporterWritesLost",
            f"sum by ({c.by}signal) (increase(celery_exporter_writes_lost_total{{{c.sel()}}}[{c.failure_window}]))"
            " > 0",
            "0s",
            "warning",
            "Celery metrics are being lost: the metrics volume refuses writes.",
            f"{{{{ $value | humanize }}}} {where}{{{{ $labels.signal }}}} handler calls could not write their "
            f"counts over the last {c.failure_window} (a full or read-only metrics volume): runs, outcomes or "
            "publishes are missing from the other series.",
            (QUEUES, "Writes lost"),
        ),
    ]


def rule_groups(c: Config) -> dict[str, Any]:
    """The Prometheus rule file, as a mapping ready for YAML."""
    alert_rules: list[dict[str, Any]] = []
    for a in alerts(c):
        rule: dict[str, Any] = {"alert": a.name, "expr": a.expr}
        if seconds(a.for_) > 0:
            rule["for"] = a.for_
        rule["labels"] = {"severity": a.severity, **a.labels}
        rule["annotations"] = {
            "summary": a.summary,
            "description": a.description,
            "runbook_url": f"{c.runbook_url}#{a.name.lower()}",
            "dashboard_url": panels.url(c, *a.panel),
        }
        alert_rules.append(rule)
    # One group: Prometheus runs the rules of a group in order at one evaluation time, so every
    # alert sees the recorded series of the same cycle. In two groups (run concurrently) an alert
    # could read the previous cycle's recording, and its $value would lag by an interval.
    recorded = recording_rules(c) + dropped_and_slower_rules(c) + objectives.recording_rules(c)
    return {"groups": [{"name": "celery", "rules": recorded + alert_rules}]}


def prometheus_rule(c: Config, namespace: str | None = None) -> dict[str, Any]:
    """The same groups as a Prometheus Operator PrometheusRule."""
    metadata: dict[str, Any] = {
        "name": "celery-signal-exporter",
        "labels": {"app.kubernetes.io/name": "celery-signal-exporter", "app.kubernetes.io/component": "rules"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": rule_groups(c),
    }

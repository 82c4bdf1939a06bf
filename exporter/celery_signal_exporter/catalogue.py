"""Every metric the exporter serves, defined once: name, type, labels, help,
and the words `docs/metrics.md` shows for it.

The recorders (`recording/receivers.py`, `recording/worker.py`, through
`recording/metrics.py`), the merge (`server/collect.py`), the probe loop
(`server/probe_loop.py`) and the service (`server/service.py`) take names,
help texts and labels from here, so the page and `/metrics` cannot drift apart.
`python -m celery_signal_exporter.catalogue` writes `docs/metrics.md` from this
module; a test fails when the committed page differs, and another holds what
the real collectors serve to `SERVED`.

This module imports nothing heavy: pool processes load it through `recording/metrics.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass(frozen=True)
class Spec:
    """One metric. `name` is the family name (a counter's samples add `_total`);
    `mode` is the multiprocess merge rule of a gauge written to the metrics
    directory; `recorded_by` and `notes` are docs/metrics.md's columns (markdown)."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    mode: str = ""
    recorded_by: str = ""
    notes: str = ""

    @property
    def sample_name(self) -> str:
        """The name as a query uses it: counters end in `_total`."""
        return self.name + "_total" if self.kind == "counter" else self.name


TASK = ("name", "queue_name")
QUEUE = ("queue_name", "vhost")
NODE = ("broker", "node")

# -- task metrics (signal side): written by the instrumentation, merged from the metrics directory

SENT = Spec(
    "celery_task_sent", "counter", "Tasks published, counted by the producer.", TASK,
    recorded_by="`after_task_publish`, in every producer",
    notes="every publish, retries included; `queue_name` is the configured queue the routing key points to",
)
RECEIVED = Spec(
    "celery_task_received", "counter",
    "Task deliveries a worker took off a queue and accepted; a redelivered message counts again.", TASK,
    recorded_by="`task_received`, worker main",
    notes="counts deliveries: a redelivered message counts again (see *Redelivery* below); messages that expired "
          "or were revoked before they arrived are not received: they count under `revoked`",
)
REDELIVERED = Spec(
    "celery_task_redelivered", "counter",
    "Received deliveries the broker flagged as redelivered (restored or requeued after a first delivery).", TASK,
    recorded_by="`task_received`, worker main",
    notes="the received deliveries whose `delivery_info[\"redelivered\"]` flag is set; 0 beside every `received` "
          "series, so `received - redelivered` is first deliveries",
)
STARTED = Spec(
    "celery_task_started", "counter", "Tasks that began executing.", TASK,
    recorded_by="`task_prerun`, pool process",
)
SUCCEEDED = Spec(
    "celery_task_succeeded", "counter", "Tasks that returned successfully.", TASK,
    recorded_by="`task_postrun` with state `SUCCESS`",
    notes="the same moment as `task_success`, one signal fewer per task",
)
FAILED = Spec(
    "celery_task_failed", "counter", "Tasks that raised; exception is the class name.",
    ("name", "queue_name", "exception"),
    recorded_by="`task_postrun` with state `FAILURE`, or an exception raised past Celery (eager runs that "
                "propagate, hard time limits); lost runs: the reaper",
    notes="`exception` is the class name only, e.g. `WorkerLostError` for a run whose process died mid-task, "
          "`TimeLimitExceeded` for a hard time limit; for an exception Celery cannot pickle, the class it wrapped. "
          "Failures before a run started are not here: see `celery_task_failed_before_start_total`",
)
FAILED_BEFORE_START = Spec(
    "celery_task_failed_before_start", "counter",
    "Deliveries that failed before their run started (the worker could not prepare the request).",
    ("name", "queue_name", "exception"),
    recorded_by="`task_failure` with no run of the task in progress",
    notes="e.g. `InvalidTaskError` for arguments that are not a list and a mapping; never started, so not in "
          "`started` nor in `failed`",
)
RETRIED = Spec(
    "celery_task_retried", "counter", "Task executions that asked to be retried.", TASK,
    recorded_by="`task_postrun` with state `RETRY`; `task_retry` from the worker main",
    notes="one per `self.retry()` (and `autoretry_for`); the worker main's are runs it cancelled when the broker "
          "connection was lost",
)
RETRIES_EXHAUSTED = Spec(
    "celery_task_retries_exhausted", "counter",
    "Runs that failed for good after at least one retry: the task gave up and its work is lost.", TASK,
    recorded_by="`task_postrun` with state `FAILURE` of a run whose `request.retries` is 1 or more",
    notes="also counted in `celery_task_failed_total`, in the same write; `self.retry()` past `max_retries` "
          "and `autoretry_for` running out both land here. A flaky task that recovers by retry reads 0",
)
REVOKED = Spec(
    "celery_task_revoked", "counter", "Tasks revoked, expired or terminated instead of completing.",
    ("name", "queue_name", "reason"),
    recorded_by="`task_revoked`, worker main",
    notes="`reason` is `revoked`, `expired` or `terminated`; `expired` is served at 0 for every (name, queue) "
          "with a sent, received or started series, so that `increase()` sees a task's first expiry. Only "
          "`terminated` ends a started run: `revoked` and `expired` messages are dropped before they start",
)
REJECTED = Spec(
    "celery_task_rejected", "counter", "Messages the worker rejected: unknown task or bad format.", ("queue_name",),
    recorded_by="`task_rejected`, `task_unknown`",
    notes="unknown task names and messages Celery cannot decode; never started. Runs that raise `Reject` are "
          "`celery_task_run_rejected_total`",
)
RUN_REJECTED = Spec(
    "celery_task_run_rejected", "counter", "Runs that ended by raising Reject; requeue says if the message went back.",
    ("name", "queue_name", "requeue"),
    recorded_by="`task_postrun` with state `REJECTED`",
    notes="`requeue` is `true` or `false`; a requeued message runs again and counts a new start. Celery acts on "
          "the message only for `acks_late` tasks",
)
IGNORED = Spec(
    "celery_task_ignored", "counter", "Runs that ended by raising Ignore.", TASK,
    recorded_by="`task_postrun` with state `IGNORED`",
    notes="not a failure; replacements (`self.replace`, which raises `Ignore` too) are counted apart",
)
REPLACED = Spec(
    "celery_task_replaced", "counter", "Runs that ended by replacing themselves with a signature (self.replace).",
    TASK,
    recorded_by="`task_postrun` with state `IGNORED` and the `Ignore` Celery raises in `Task.replace`",
    notes="not a failure; what replaced the run (a task, chain or group) counts under its own names. An eager "
          "run's replacement runs inline and the run succeeds",
)
RUNTIME = Spec(
    "celery_task_runtime_seconds", "histogram", "Task execution time, prerun to postrun.", TASK,
    recorded_by="`task_prerun` to `task_postrun`",
    notes="`_count` counts finished executions (a retried run counts too)",
)
QUEUE_WAIT = Spec(
    "celery_task_queue_wait_seconds", "histogram",
    "Time from when a task was due (publish, or its ETA) until it started.", TASK,
    recorded_by="`csx_due` header to `task_prerun`",
    notes="see *Queue wait* below",
)
IN_PROGRESS = Spec(
    "celery_task_in_progress", "gauge", "Tasks executing right now.", TASK, mode="livesum",
    recorded_by="prerun +1, postrun −1",  # noqa: RUF001 - a true minus sign, for docs/metrics.md
    notes="live sum: a dead process's share disappears",
)
LAST_SUCCESS = Spec(
    "celery_task_last_success_timestamp_seconds", "gauge", "When the task last succeeded, as a UNIX time.",
    ("name",), mode="max",
    recorded_by="`task_postrun` with state `SUCCESS`",
    notes="newest across processes; for periodic-task freshness",
)

OLDEST_RUNNING_AGE = Spec(
    "celery_task_oldest_running_age_seconds", "gauge", "Age of the task's oldest run in progress; 0 when none runs.",
    TASK, mode="livemax",
    recorded_by="worker main, every heartbeat, from `celery.worker.state`",
    notes="shows a stuck run while it runs, not only when it ends; counts from the pool's start of the run; "
          "0 once no run of the (task, queue) is in progress",
)
TIME_LIMIT = Spec(
    "celery_task_time_limit_seconds", "gauge", "The task's hard time limit, where one is set.", ("name",),
    mode="livemax",
    recorded_by="worker main, from the app's task registry, at start and every 5 minutes",
    notes="the task's `time_limit`, else the worker's (`--time-limit` or `task_time_limit`); absent when "
          "neither is set. As configured: a per-call `time_limit` is not seen, and the threads and solo pools "
          "do not enforce hard limits",
)
MEMORY_GROWTH = Spec(
    "celery_task_memory_growth_bytes", "histogram",
    "How far a run raised its process's peak resident memory; 0 when it set no new peak.", TASK,
    recorded_by="`task_postrun`, pool process (`getrusage` peak RSS)",
    notes="Opt-in: `instrument(app, task_resources=True)` or `CELERY_EXPORTER_TASK_RESOURCES=1`; absent "
          "otherwise, since one `getrusage` a run costs more than the per-task overhead budget. "
          "RAM-hungry tasks stand out: the rise of the process's peak RSS (`ru_maxrss`) since the previous "
          "run ended (a process's first run: since its prerun), one `getrusage` per run; memory a run frees "
          "again still counts, memory under an earlier peak does not. A child recycled by "
          "`worker_max_memory_per_child` is charged to the task it ran last. Threads and greenlets share one "
          "process: a run is charged the peak its neighbours set. Buckets 1 MiB … 4 GiB, powers of four "
          "(`memory_growth_buckets`, `CELERY_EXPORTER_MEMORY_GROWTH_BUCKETS`, bytes)",
)
CPU = Spec(
    "celery_task_cpu_seconds", "counter", "CPU time spent by task runs.", TASK,
    recorded_by="`task_prerun` to `task_postrun`, the running thread's CPU clock",
    notes="Opt-in: `instrument(app, task_resources=True)` or `CELERY_EXPORTER_TASK_RESOURCES=1`; absent "
          "otherwise, since two CPU clock reads a run cost more than the per-task overhead budget. "
          "`time.thread_time()` at prerun and postrun; divided by `celery_task_runtime_seconds_sum`: near 1 a "
          "task computes, near 0 it waits (I/O, locks, sleep). Exact per run on prefork, threads and solo. "
          "gevent and eventlet run every greenlet on one OS thread, so a run is also charged what ran while it "
          "was switched out (other runs, the worker's own consumer)",
)
PUBLISH = Spec(
    "celery_task_publish_seconds", "histogram", "Time one publish took, in the producer.", TASK,
    recorded_by="`before_task_publish` to `after_task_publish`, in every producer",
    notes="Opt-in: `instrument(app, publish_timing=True)` or `CELERY_EXPORTER_PUBLISH_TIMING=1`; absent "
          "otherwise, since timing every publish costs more than the per-task overhead budget. "
          "Slow publishing (a far or blocked broker, a full outbound buffer) per producer instance; the first "
          "publish of a connection includes connecting and declaring. Timed in the publishing thread (greenlet, "
          "when patched). Buckets 1 ms … 10 s (`publish_buckets`, `CELERY_EXPORTER_PUBLISH_BUCKETS`)",
)

# -- worker metrics: written by the worker main; the heartbeat is served as celery_worker_up

HEARTBEAT = Spec(
    "celery_worker_heartbeat_timestamp_seconds", "gauge",
    "Internal: the worker's last heartbeat; the exporter turns it into celery_worker_up.",
    ("hostname",), mode="mostrecent",
)
WORKER_UP = Spec(
    "celery_worker_up", "gauge", "1 if the worker's heartbeat is fresher than the timeout.", ("hostname",),
    recorded_by="computed at scrape",
    notes="1 while the heartbeat is fresher than `--worker-timeout` (default 10 s), then 0 (a worker that "
          "vanished: SIGKILL, OOM kill, node lost); a worker that shut down gracefully writes a stopped mark and "
          "is no longer served, so retiring a worker does not read as down",
)
POOL_PROCESSES = Spec(
    "celery_worker_pool_processes", "gauge", "Pool size: processes or threads that run tasks.",
    ("hostname",), mode="livesum",
    recorded_by="worker main, every heartbeat",
    notes="processes (prefork), threads (threads) or 1 (solo)",
)
TASKS_ACTIVE = Spec(
    "celery_worker_tasks_active", "gauge", "Tasks the worker is executing now.", ("hostname",), mode="livesum",
    recorded_by="worker main, every heartbeat",
    notes="tasks executing now",
)

TASKS_RESERVED = Spec(
    "celery_worker_tasks_reserved", "gauge", "Tasks the worker received and holds, not started, without an ETA.",
    ("hostname", "queue_name"), mode="livesum",
    recorded_by="worker main, every heartbeat, from `celery.worker.state`",
    notes="prefetched work the broker no longer counts as waiting. gevent and eventlet hold at most one "
          "beyond their running tasks (the consumer waits for a free slot), solo none while a task runs",
)
TASKS_SCHEDULED = Spec(
    "celery_worker_tasks_scheduled", "gauge", "ETA or countdown tasks the worker holds until they are due.",
    ("hostname", "queue_name"), mode="livesum",
    recorded_by="worker main, every heartbeat, from the consumer's timer",
    notes="as `celery inspect scheduled` lists them; once due they move to reserved (or start)",
)
CONSUMING = Spec(
    "celery_worker_consuming", "gauge", "1 for each queue the worker consumes from.", ("hostname", "queue_name"),
    mode="livesum",
    recorded_by="worker main, every heartbeat, from its consumer",
    notes="times `celery_worker_pool_processes`: slots per queue, on every broker",
)
RESIDENT_MEMORY = Spec(
    "celery_worker_resident_memory_bytes", "gauge", "Resident memory of the worker: main process and pool.",
    ("hostname",), mode="livesum",
    recorded_by="worker main, every heartbeat, from `/proc`",
    notes="Linux only; the resident set sizes of the main and prefork pool processes summed, so pages "
          "they share count once per process (as in `ps`); other pools: the main process alone",
)
POOL_PROCESS_MAX_MEMORY = Spec(
    "celery_worker_pool_process_max_resident_memory_bytes", "gauge",
    "Resident memory of the worker's largest pool process.", ("hostname",), mode="livemax",
    recorded_by="worker main, every heartbeat, from `/proc`",
    notes="Linux only; prefork only: the other pools run tasks in the main process, whose memory "
          "`celery_worker_resident_memory_bytes` is",
)

# -- beat metrics: the schedule and dispatches written by the beat process, runs per entry by workers

ENTRY = ("entry", "name")

BEAT_HEARTBEAT = Spec(
    "celery_beat_heartbeat_timestamp_seconds", "gauge",
    "Internal: beat's last heartbeat; the exporter turns it into celery_beat_up.",
    ("hostname",), mode="mostrecent",
)
BEAT_UP = Spec(
    "celery_beat_up", "gauge", "1 if beat's heartbeat is fresher than the timeout.", ("hostname",),
    recorded_by="computed at scrape",
    notes="beat's heartbeat (a thread in the beat process, every `heartbeat_interval`), fresher than "
          "`--worker-timeout`; 0 at once after a graceful shutdown. `hostname` is the beat host's name",
)
BEAT_ENTRY_INTERVAL = Spec(
    "celery_beat_entry_interval_seconds", "gauge", "Seconds between the entry's runs.", ENTRY, mode="mostrecent",
    recorded_by="beat, at `beat_init` and every `schedule_refresh`",
    notes="`run_every` for interval entries; for crontab (and other) entries, the gap between the next due time "
          "and the one after it. `entry` is the schedule entry's name, `name` its task",
)
BEAT_ENTRY_NEXT_DUE = Spec(
    "celery_beat_entry_next_due_timestamp_seconds", "gauge", "When the entry's next run is due, as a UNIX time.",
    ENTRY, mode="mostrecent",
    recorded_by="beat, at each dispatch and every `schedule_refresh`",
    notes="kept from beat's last word when beat dies, so `time() - next_due` grows: CeleryPeriodicTaskMissed",
)
BEAT_ENTRY_LAST_DISPATCH = Spec(
    "celery_beat_entry_last_dispatch_timestamp_seconds", "gauge", "When beat last sent the entry's task.",
    ENTRY, mode="mostrecent",
    recorded_by="beat, `Scheduler.apply_async`",
)
BEAT_ENTRY_DISPATCHED = Spec(
    "celery_beat_entry_dispatched", "counter", "Runs of the entry beat sent to the broker.", ENTRY,
    recorded_by="beat, `Scheduler.apply_async`",
)
BEAT_ENTRY_DISPATCH_FAILURES = Spec(
    "celery_beat_entry_dispatch_failures", "counter", "Dispatches of the entry that raised (broker down, "
    "unknown task).", ENTRY,
    recorded_by="beat, `Scheduler.apply_async`",
)
BEAT_ENTRY_STARTED = Spec(
    "celery_beat_entry_started", "counter", "Runs of the entry that began executing.", ENTRY,
    recorded_by="`task_prerun`, pool process, for messages with the `csx_entry` header",
)
BEAT_ENTRY_RUNNING = Spec(
    "celery_beat_entry_running", "gauge", "Runs of the entry in progress now; more than 1 is an overlap.", ENTRY,
    mode="livesum",
    recorded_by="`task_prerun` +1, `task_postrun` −1",  # noqa: RUF001 - a true minus sign, as above
    notes="live sum over every worker sharing the directory",
)
BEAT_ENTRY_LAST_SUCCESS = Spec(
    "celery_beat_entry_last_success_timestamp_seconds", "gauge", "When a run of the entry last succeeded.",
    ENTRY, mode="max",
    recorded_by="`task_postrun` with state `SUCCESS`",
    notes="two entries calling one task (with different arguments) are told apart by `entry`",
)
BEAT_ENTRY_OVERLAPS = Spec(
    "celery_beat_entry_overlaps", "counter", "Runs of the entry still in progress when its next run was due.",
    ENTRY,
    recorded_by="`task_postrun`, from the `csx_next_due` header",
    notes="a run counts one overlap when it started before, and ended after, the time beat had set for the "
          "entry's next run; caught however short the overlap",
)
BEAT_ENTRY_EXPIRED = Spec(
    "celery_beat_entry_expired", "counter", "Runs of the entry a worker dropped because they had expired.", ENTRY,
    recorded_by="`task_revoked` with `expired`, worker main",
    notes="Redis (and any broker that delivers expired messages); on RabbitMQ the broker drops them itself, "
          "see *Periodic tasks* below",
)

# -- broker metrics: built by the probe loop from each probe's snapshot

QUEUE_LENGTH = Spec(
    "celery_queue_length", "gauge", "Messages waiting in the queue, every priority (RabbitMQ: ready)", QUEUE,
    recorded_by="probe",
    notes="Redis: every priority sub-queue summed (`vhost` is the db index); RabbitMQ: ready messages; SQS: "
          "`ApproximateNumberOfMessages` (visible); filesystem: message files in `data_folder_in`",
)
QUEUE_UNACKED = Spec(
    "celery_queue_unacked", "gauge", "Messages delivered to consumers but not yet acknowledged", QUEUE,
    recorded_by="probe", notes="RabbitMQ; SQS: `ApproximateNumberOfMessagesNotVisible` (in flight)",
)
QUEUE_CONSUMERS = Spec(
    "celery_queue_consumers", "gauge", "Consumers subscribed to the queue", QUEUE,
    recorded_by="probe", notes="RabbitMQ only",
)
QUEUE_OLDEST_AGE = Spec(
    "celery_queue_oldest_message_age_seconds", "gauge",
    "Seconds the next message to be consumed has waited: since it became due (Redis) or was published (RabbitMQ)",
    QUEUE,
    recorded_by="probe",
    notes="Redis: queues whose next message carries the `csx_due` header. RabbitMQ: classic queues whose next "
          "message carries the AMQP `timestamp` property (whole seconds; the head as of the last 5 s stats refresh). "
          "Filesystem: the mtime of the queue's oldest message file. Not SQS",
)
QUEUE_DELAYED = Spec(
    "celery_queue_delayed", "gauge", "Messages the broker holds back until their delay ends (SQS: countdown/ETA)",
    QUEUE,
    recorded_by="probe",
    notes="SQS only: `ApproximateNumberOfMessagesDelayed`, tasks published with a countdown or ETA that SQS keeps "
          "out of sight (up to 15 minutes); not in `celery_queue_length` until due",
)
QUEUE_DEAD_LETTER = Spec(
    "celery_queue_dead_letter_length", "gauge",
    "Messages in the queue's dead-letter queue, labelled with the source queue", QUEUE,
    recorded_by="probe",
    notes="SQS only: `ApproximateNumberOfMessages` of the queue named by the source queue's `RedrivePolicy` "
          "(`deadLetterTargetArn`), for queues that have one",
)
BROKER_UP = Spec(
    "celery_broker_up", "gauge", "1 if the last broker probe succeeded", ("broker",),
    recorded_by="probe", notes="1 if the last probe cycle succeeded",
)
BROKER_UNACKED = Spec(
    "celery_broker_unacked", "gauge", "Unacknowledged messages over all queues", ("broker",),
    recorded_by="probe", notes="Redis only: the size of kombu's unacked hash, covering all queues",
)
BROKER_MEMORY_USED = Spec(
    "celery_broker_memory_used_bytes", "gauge", "Memory the broker node uses", NODE,
    recorded_by="probe", notes="Redis `used_memory`; RabbitMQ `mem_used` of every node",
)
BROKER_MEMORY_LIMIT = Spec(
    "celery_broker_memory_limit_bytes", "gauge", "Broker node memory limit, 0 for none", NODE,
    recorded_by="probe", notes="Redis `maxmemory`; RabbitMQ memory high watermark; 0 = no limit",
)
BROKER_MEMORY_ALARM = Spec(
    "celery_broker_memory_alarm", "gauge", "1 if the node's memory alarm blocks publishers", NODE,
    recorded_by="probe", notes="RabbitMQ only",
)
BROKER_DISK_ALARM = Spec(
    "celery_broker_disk_alarm", "gauge", "1 if the node's disk alarm blocks publishers", NODE,
    recorded_by="probe", notes="RabbitMQ only",
)
BROKER_ALARM_CHECKS = Spec(
    "celery_broker_alarm_checks", "counter", "Alarm checks the broker answered", ("broker",),
    recorded_by="probe (alarm watch)",
    notes="RabbitMQ only: one per `--rabbitmq-alarm-interval` (1 s) while the management API answers; "
          "its rate shows the watch runs",
)
BROKER_MEMORY_ALARM_RAISED = Spec(
    "celery_broker_memory_alarm_raised_checks", "counter", "Alarm checks that found the node's memory alarm raised",
    NODE, recorded_by="probe (alarm watch)",
    notes="RabbitMQ only, from `GET /api/health/checks/alarms` (live, unlike /api/nodes); about the seconds the "
          "alarm was raised. A counter keeps every burst of an alarm that flaps for seconds, which a gauge "
          "sampled at scrapes misses; 0 from the first probe for every node, so `increase()` sees the first one",
)
BROKER_DISK_ALARM_RAISED = Spec(
    "celery_broker_disk_alarm_raised_checks", "counter", "Alarm checks that found the node's free-disk alarm raised",
    NODE, recorded_by="probe (alarm watch)",
    notes="RabbitMQ only; as `celery_broker_memory_alarm_raised_checks_total`, for the free-disk alarm",
)

# -- the exporter's own metrics

BUILD_INFO = Spec(
    "celery_exporter_build_info", "gauge", "The exporter's version; always 1.", ("version", "python"),
    recorded_by="service", notes="always 1",
)
SCRAPE_DURATION = Spec(
    "celery_exporter_scrape_duration_seconds", "gauge", "How long the previous scrape took to gather.", (),
    recorded_by="service", notes="how long the previous scrape took to gather",
)
METRICS_FILES = Spec(
    "celery_exporter_metrics_files", "gauge",
    "Files in the metrics directory at the last scrape: read, unreadable, or dead (a gone process's "
    "live gauges, left out).",
    ("state",),
    recorded_by="service",
    notes="files in the metrics directory, by state: `read`, `unreadable` (skipped, logged once, never deleted) "
          "or `dead` (live gauges of a process that is gone, left out)",
)
MERGE_ERRORS = Spec(
    "celery_exporter_merge_errors", "counter",
    "Scrapes whose merge of the metrics directory failed; they answered without it.", (),
    recorded_by="service",
    notes="scrapes whose merge of the metrics directory raised; they still answered 200, without the directory's "
          "series, and the error was logged (the first, then every 100th). Should stay 0",
)
DROPPED_LABELS = Spec(
    "celery_exporter_dropped_label_values", "counter",
    "Label values folded into the overflow value because a cap was reached.", ("label",),
    recorded_by="instrumentation",
    notes="values folded into `__overflow__` once `max_task_names` (`label=\"name\"`) or `max_queue_names` "
          "(`label=\"queue_name\"`) is reached, one per fold",
)
LABELS_TRUNCATED = Spec(
    "celery_exporter_label_values_truncated", "counter",
    "Label values longer than the cap, cut to a prefix and a hash of the whole value.", ("label",),
    recorded_by="instrumentation",
    notes="label values longer than 200 characters, cut (see *Label values* below); once per value in each "
          "process that meets it; `label` is `name`, `queue_name` or `exception`",
)
HANDLER_ERRORS = Spec(
    "celery_exporter_handler_errors", "counter", "Signal handler errors swallowed so they never reach Celery.",
    ("signal",),
    recorded_by="instrumentation",
    notes="receiver errors swallowed so that they never reach Celery; `worker_compact` counts compactions that "
          "could not write an archive (full disk)",
)
WRITES_LOST = Spec(
    "celery_exporter_writes_lost", "counter",
    "Signal handler calls whose counts could not be written to the metrics directory (a full or read-only "
    "volume): what they would have counted is missing from the other series.",
    ("signal",),
    recorded_by="instrumentation; by a process that cannot make or grow its own file, in the space its worker "
                "main reserved at start",
    notes="`task_prerun`: runs not counted as started (started + these = runs); `task_postrun`: outcomes and "
          "runtimes not counted; any rise means the volume needs room (runbook CeleryExporterWritesLost)",
)
TASK_NAMES_FOLDED = Spec(
    "celery_exporter_task_names_folded", "gauge",
    "Distinct task names beyond the exporter's cap, shown as __overflow__.", (),
    recorded_by="service (merge)",
    notes="distinct task names beyond the exporter's directory-wide cap (2 000), merged into "
          "`name=\"__overflow__\"`",
)
QUEUE_NAMES_FOLDED = Spec(
    "celery_exporter_queue_names_folded", "gauge",
    "Distinct queue names beyond the exporter's cap, shown as __overflow__.", (),
    recorded_by="service (merge)",
    notes="distinct queue names beyond the exporter's directory-wide cap (1 000), merged into "
          "`queue_name=\"__overflow__\"`",
)
COMPACTED = Spec(
    "celery_exporter_compacted_processes", "counter",
    "Dead processes whose counter files were folded into the archive.", (),
    recorded_by="worker main (compaction)",
    notes="dead processes whose counter files were folded into `counter_archive.db`; 0 from the worker's start",
)
PROBE_DURATION = Spec(
    "celery_exporter_probe_duration_seconds", "gauge", "Seconds the last probe cycle took", ("broker",),
    recorded_by="probe loop", notes="the last cycle, success or not",
)
PROBE_LAST_SUCCESS = Spec(
    "celery_exporter_probe_last_success_timestamp_seconds", "gauge", "UNIX time of the last successful probe",
    ("broker",),
    recorded_by="probe loop",
)
PROBE_ERRORS = Spec(
    "celery_exporter_probe_errors", "counter", "Failed probe cycles by reason", ("broker", "reason"),
    recorded_by="probe loop", notes="`reason`: connection, timeout, auth, protocol, other",
)
PROBE_REQUESTS = Spec(
    "celery_exporter_probe_requests", "counter",
    "API requests a probe sent to the broker, failed ones included", ("broker",),
    recorded_by="probe loop",
    notes="SQS only (each request is billed): ListQueues pages, GetQueueAttributes, GetQueueUrl; "
          "as of the last successful cycle",
)
PROBE_QUEUES_DROPPED = Spec(
    "celery_exporter_probe_queues_dropped", "counter",
    "Queues left out of a probe cycle by the queue cap, summed over cycles", ("broker",),
    recorded_by="probe loop", notes="queue names over `--max-queues`, summed per cycle",
)


BEAT_BEFORE = """\
`instrument(app)` in the beat process (standalone `celery beat`, or a worker
started with `-B`) reads the schedule at `beat_init` and again every
`schedule_refresh` seconds (default 30), on beat's own thread after one of its
ticks, so entries added or removed at run time (django-celery-beat, RedBeat,
any scheduler whose `schedule` changes) are followed; a removed entry's beat
gauges go. Beat puts the entry's name (`csx_entry`) and its next due time
(`csx_next_due`) in each message's headers, so workers count runs per entry:
two entries that call one task with different arguments stay apart. Beat
writes into its own metrics directory (its own pod and exporter sidecar), so
replacing a worker pod changes nothing beat said.
"""

BEAT_AFTER = """\
`celery_beat_up` comes from `celery_beat_heartbeat_timestamp_seconds`
(internal, not exposed) as `celery_worker_up` does from the worker's. The
heartbeat runs on a thread, since beat sleeps up to `beat_max_loop_interval`
between ticks. A beat entry gauge at 0 (an entry that left the schedule) is
left out of `/metrics`.

**Expired runs.** On Redis a worker receives an expired message and drops it:
`celery_beat_entry_expired_total` counts it. On RabbitMQ, Celery's `expires`
is a per-message TTL and the broker drops the message unseen; there the
CeleryPeriodicTaskExpiring alert compares runs beat dispatched with runs that
started (`celery_beat_entry_dispatched_total` against
`celery_beat_entry_started_total`), which catches an entry none of whose
runs dispatched in the window started, not one run in many lost.
"""


@dataclass(frozen=True)
class Outcome:
    """One way a delivery can end: what happened, the sample that moves (with its labels), who records it,
    and whether the run had started (counted in `celery_task_started_total`)."""

    how: str
    spec: Spec
    labels: str
    recorded_by: str
    started: bool


#: How a run can end, and which counter moves: docs/metrics.md's table, and the balance the tests hold
#: (`started` equals the sum of the outcomes of started runs, plus the runs in progress).
OUTCOMES: tuple[Outcome, ...] = (
    Outcome("returned", SUCCEEDED, "", "postrun, pool process", True),
    Outcome("raised an exception (`autoretry_for` and `self.retry()` past `max_retries` too)", FAILED,
            "`exception`=the class", "postrun, pool process", True),
    Outcome("soft time limit (`SoftTimeLimitExceeded` not caught)", FAILED,
            "`exception=\"SoftTimeLimitExceeded\"`", "postrun, pool process", True),
    Outcome("hard time limit (prefork, gevent)", FAILED, "`exception=\"TimeLimitExceeded\"`",
            "postrun, pool process: the run ends with `SystemExit` once its limit is up (a pool process "
            "SIGKILLed before its postrun is a lost run instead)", True),
    Outcome("its process died (SIGKILL, OOM kill, a killed solo worker)", FAILED,
            "`exception=\"WorkerLostError\"`", "the reaper, from the dead process's in-progress gauge", True),
    Outcome("eager run that raised (`apply()`, `task_always_eager`), propagating or not", FAILED,
            "`exception`=the class", "postrun, the calling process", True),
    Outcome("`self.retry()` (or `autoretry_for`) published a retry", RETRIED, "", "postrun, pool process", True),
    Outcome("`raise Ignore()`", IGNORED, "", "postrun, pool process", True),
    Outcome("`self.replace(signature, chain or group)`", REPLACED, "", "postrun, pool process", True),
    Outcome("`raise Reject(requeue=True)` (`acks_late`)", RUN_REJECTED, "`requeue=\"true\"`",
            "postrun, pool process", True),
    Outcome("`raise Reject(requeue=False)`", RUN_REJECTED, "`requeue=\"false\"`", "postrun, pool process", True),
    Outcome("revoked with `terminate=True` (by id or by stamped header) while running", REVOKED,
            "`reason=\"terminated\"`", "`task_revoked`, worker main", True),
    Outcome("revoked (by id or by stamped header) before it started", REVOKED, "`reason=\"revoked\"`",
            "`task_revoked`, worker main", False),
    Outcome("expired before it started", REVOKED, "`reason=\"expired\"`", "`task_revoked`, worker main", False),
    Outcome("failed while the worker prepared it (bad arguments)", FAILED_BEFORE_START, "`exception`=the class",
            "`task_failure` with no run in progress", False),
    Outcome("unknown task name or undecodable message", REJECTED, "", "`task_unknown`, `task_rejected`, worker main",
            False),
)

OUTCOMES_BEFORE = """\
### How a run can end

Every run counted in `celery_task_started_total` ends in exactly one of the
outcomes marked *started* below, so per task `started` = the sum of those
outcomes + `celery_task_in_progress`. A delivery that never started ends in
one of the others. Postrun records a run's outcome in the same write as its
runtime and in-progress; only the outcomes the pool process cannot see are
recorded elsewhere.

| how the run ends | counter that moves | labels | recorded by | started |
| --- | --- | --- | --- | --- |
"""

OUTCOMES_AFTER = """
A retried run is one outcome (`retried`); its retry is a new message and a
new run with an outcome of its own. A chord's unlock task
(`celery.chord_unlock`, on result backends without native joins) retries
until the header is done, then succeeds. A worker stopped cold (SIGQUIT)
ends its runs with no outcome: Celery reports nothing, and the pool process's
postrun sees only `SystemExit`, as it does for a termination, whose outcome
the worker main reports. Postrun tells a hard time limit from a termination
by the run's length: a run killed by SIGTERM that lasted its hard limit (the
message's, the task's or the worker's, less up to 1 s) timed out.
"""


def _outcome_row(o: Outcome) -> str:
    return (f"| {o.how} | `{o.spec.sample_name}` | {o.labels} | {o.recorded_by} | "
            f"{'yes' if o.started else 'no'} |").replace("|  |", "| |")


def outcomes_table() -> str:
    """The "how a run can end" part of docs/metrics.md, from OUTCOMES."""
    return OUTCOMES_BEFORE + "\n".join(_outcome_row(o) for o in OUTCOMES) + "\n" + OUTCOMES_AFTER


@dataclass(frozen=True)
class Section:
    """A part of docs/metrics.md: a heading, prose around one table of metrics."""

    title: str
    specs: tuple[Spec, ...]
    before: str = ""
    after: str = ""


SECTIONS: tuple[Section, ...] = (
    Section(
        "Task metrics (signal side)",
        (SENT, RECEIVED, REDELIVERED, STARTED, SUCCEEDED, FAILED, RETRIED, RETRIES_EXHAUSTED, REVOKED, REJECTED,
         RUN_REJECTED, IGNORED, REPLACED, FAILED_BEFORE_START, RUNTIME, QUEUE_WAIT, IN_PROGRESS, LAST_SUCCESS,
         OLDEST_RUNNING_AGE, TIME_LIMIT, MEMORY_GROWTH, CPU, PUBLISH),
        after=outcomes_table(),
    ),
    Section(
        "Worker metrics",
        (WORKER_UP, POOL_PROCESSES, TASKS_ACTIVE, TASKS_RESERVED, TASKS_SCHEDULED, CONSUMING, RESIDENT_MEMORY,
         POOL_PROCESS_MAX_MEMORY),
        after=f"""\
The worker main process writes a heartbeat every 2 s (`heartbeat_interval`),
using the worker's own timer. The heartbeat is stored as an internal gauge,
`{HEARTBEAT.name}`, and the exporter turns it into
`{WORKER_UP.name}`. The raw timestamp is not exposed. A worker that was
SIGKILLed stops writing, so it reads 0 once the timeout has passed. A worker
that shuts down gracefully writes its heartbeat at 0 (a stopped mark), and
its `{WORKER_UP.name}` series ends there instead of reading 0: retiring a
worker, or replacing it under a new hostname, is not a worker down.
""",
    ),
    Section(
        "Beat metrics",
        (BEAT_UP, BEAT_ENTRY_INTERVAL, BEAT_ENTRY_NEXT_DUE, BEAT_ENTRY_LAST_DISPATCH, BEAT_ENTRY_DISPATCHED,
         BEAT_ENTRY_DISPATCH_FAILURES, BEAT_ENTRY_STARTED, BEAT_ENTRY_RUNNING, BEAT_ENTRY_LAST_SUCCESS,
         BEAT_ENTRY_OVERLAPS, BEAT_ENTRY_EXPIRED),
        before=BEAT_BEFORE,
        after=BEAT_AFTER,
    ),
    Section(
        "Broker metrics (probes)",
        (QUEUE_LENGTH, QUEUE_UNACKED, QUEUE_CONSUMERS, QUEUE_OLDEST_AGE, QUEUE_DELAYED, QUEUE_DEAD_LETTER,
         BROKER_UP, BROKER_UNACKED,
         BROKER_MEMORY_USED, BROKER_MEMORY_LIMIT, BROKER_MEMORY_ALARM, BROKER_DISK_ALARM, BROKER_ALARM_CHECKS,
         BROKER_MEMORY_ALARM_RAISED, BROKER_DISK_ALARM_RAISED),
        after="""\
`broker` is the broker URL with the user, password, query and fragment
removed, e.g. `redis://10.0.0.5:6379/0`.

### What each broker can and cannot report

| what | Redis | RabbitMQ | Amazon SQS | filesystem |
| --- | --- | --- | --- | --- |
| queue length (`celery_queue_length`) | yes: waiting messages, every priority sub-queue summed; a deleted empty list is 0 | yes: ready messages; delivered but unacked ones are in `celery_queue_unacked` | yes: visible messages; in-flight and delayed ones apart | yes: message files in `data_folder_in` |
| unacked per queue (`celery_queue_unacked`) | **no**: kombu keeps one unacked hash for all queues, reported as `celery_broker_unacked` | yes | yes: in flight (received, not deleted) | **no**: in the worker's memory |
| delayed (`celery_queue_delayed`) | no | no | yes: messages SQS holds until their delay ends | no |
| dead letters (`celery_queue_dead_letter_length`) | no | no | yes, for queues with a redrive policy | no |
| consumers (`celery_queue_consumers`) | **no**: a BRPOP client does not say which queues it serves | yes | **no** | **no** |
| oldest-message age (`celery_queue_oldest_message_age_seconds`) | yes, for queues whose next message carries the `csx_due` header | classic queues only, whose next message carries the AMQP `timestamp` property and is in memory (`head_message_timestamp`); **no** for quorum queues, streams, or a paged-out head (lazy queues) (checked on 3.10.8) | **no**: only a receive could read it | yes: the oldest file's mtime |
| memory used and limit | yes: `used_memory`, `maxmemory` (0 = none) | yes: `mem_used`, `mem_limit` of every node | no | no |
| memory and disk alarms | **no** | yes, per node: the state, and every alarm check (`--rabbitmq-alarm-interval`, 1 s) that found one raised, read live from `/api/health/checks/alarms` | no | no |
| broker up | yes | yes | yes | yes |

A series the broker cannot give is absent, never a misleading 0. On
RabbitMQ the numbers are those of the management API, which refreshes its
statistics every 5 s by default (`collect_statistics_interval`). Its
oldest-message age is now minus the head's `timestamp`, a whole number of
seconds, so it reads up to 1 s high, and a head consumed since the last
refresh keeps counting for up to those 5 s. On a priority queue the head
is the next message to be delivered (highest priority), not the oldest.
""",  # noqa: E501 - a markdown table row is one line
    ),
    Section(
        "Exporter metrics",
        (BUILD_INFO, SCRAPE_DURATION, METRICS_FILES, MERGE_ERRORS, DROPPED_LABELS, LABELS_TRUNCATED, HANDLER_ERRORS,
         WRITES_LOST, TASK_NAMES_FOLDED, QUEUE_NAMES_FOLDED, COMPACTED, PROBE_DURATION, PROBE_LAST_SUCCESS,
         PROBE_ERRORS, PROBE_QUEUES_DROPPED, PROBE_REQUESTS),
        before="""\
What these count is also logged, once per cause (a damaged file, a broker
going down), on the one logger `celery_signal_exporter`, which both the
service and the instrumentation use.
""",
    ),
)

#: Every metric on /metrics, in the page's order.
SERVED: tuple[Spec, ...] = tuple(spec for section in SECTIONS for spec in section.specs)
#: Every metric written to the metrics directory by the instrumentation (the heartbeat included, which is
#: served as celery_worker_up); the merge in collect.py serves them.
RECORDED: tuple[Spec, ...] = (
    SENT, RECEIVED, REDELIVERED, STARTED, SUCCEEDED, FAILED, RETRIED, RETRIES_EXHAUSTED, REVOKED, REJECTED,
    RUN_REJECTED, IGNORED, REPLACED, FAILED_BEFORE_START, RUNTIME, QUEUE_WAIT,
    IN_PROGRESS, LAST_SUCCESS, OLDEST_RUNNING_AGE, TIME_LIMIT, MEMORY_GROWTH, CPU, PUBLISH, HEARTBEAT,
    POOL_PROCESSES, TASKS_ACTIVE, TASKS_RESERVED, TASKS_SCHEDULED, CONSUMING, RESIDENT_MEMORY,
    POOL_PROCESS_MAX_MEMORY, DROPPED_LABELS, LABELS_TRUNCATED, HANDLER_ERRORS, WRITES_LOST, COMPACTED,
    BEAT_HEARTBEAT, BEAT_ENTRY_INTERVAL, BEAT_ENTRY_NEXT_DUE, BEAT_ENTRY_LAST_DISPATCH, BEAT_ENTRY_DISPATCHED,
    BEAT_ENTRY_DISPATCH_FAILURES, BEAT_ENTRY_STARTED, BEAT_ENTRY_RUNNING, BEAT_ENTRY_LAST_SUCCESS,
    BEAT_ENTRY_OVERLAPS, BEAT_ENTRY_EXPIRED,
)


def family(spec: Spec) -> GaugeMetricFamily | CounterMetricFamily:
    """An empty family for a metric served from code (probe loop, service), with the catalogue's
    name, help, type and label names. prometheus-client is imported here, not at the top, because
    pool processes import this module and never serve anything."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    raise ValueError(f"{spec.name}: a {spec.kind} is not served from code")


# -- docs/metrics.md ----------------------------------------------------------

DOC_PATH = Path("docs") / "metrics.md"

INTRO = """\
<!-- Generated from exporter/celery_signal_exporter/catalogue.py by
     `python -m celery_signal_exporter.catalogue`: edit there, not here. -->

# Metric catalogue

This is the contract between the instrumentation, the exporter, the
dashboards and the rules. `tests/unit/test_catalogue.py` checks that `/metrics`
exposes exactly these names with exactly these types and labels, no more
and no fewer, and that this page is what the catalogue generates.

- **Defined** in `exporter/celery_signal_exporter/catalogue.py`: every
  metric's name, type, labels and help text, and the columns of this page.
  Every other module takes them from there, and
  `python -m celery_signal_exporter.catalogue` writes this page.
- **Recorded**: task metrics in `exporter/celery_signal_exporter/recording/receivers.py`
  and worker metrics in `exporter/celery_signal_exporter/recording/worker.py`, both
  through `exporter/celery_signal_exporter/recording/metrics.py`, which writes each
  process's file in the metrics directory. Broker metrics are built in
  `exporter/celery_signal_exporter/server/probe_loop.py` from what each probe in
  `exporter/celery_signal_exporter/probes/` reads; [probes.md](probes.md)
  says what each broker can and cannot report.
- **Served** by `exporter/celery_signal_exporter/server/service.py`: the merge of
  the metrics directory (`exporter/celery_signal_exporter/server/collect.py`, which
  also turns the worker heartbeat into `celery_worker_up`), the probe loops'
  cached results, and the service's own metrics.

Label names follow the most widely used Celery exporter (`name`,
`queue_name`, `hostname`), so alert expressions written for it keep working.
Task series carry no pod or producer hostname, because Prometheus target
labels already say where a series came from.
"""

PROSE = """\
## Queue wait

- **Where it starts.** `before_task_publish` stamps every message with a
  `csx_due` header. The header holds the UNIX time the task becomes due: the
  publish time, or its ETA when a `countdown` or `eta` pushes it later. The
  wait runs from that time until `task_prerun` in the pool process.
- **What it leaves out.** A countdown is never counted as waiting.
- **Retries.** A retry is a new publish, so its wait starts at the retry's own
  publish, or at its own countdown.
- **Clocks.** Producer and worker clocks must agree. A negative wait, from a
  clock running ahead, is recorded as 0.
- **The AMQP timestamp.** `before_task_publish` also sets the message's
  `timestamp` property (whole UNIX seconds, the publish time) unless the
  caller set one (`apply_async(timestamp=...)`). RabbitMQ's management API
  shows it for a queue's next message as `head_message_timestamp`. Redis
  carries it along unused.

## Redelivery

`celery_task_received_total` counts deliveries, not distinct tasks. A message
a worker took but did not finish comes back to the queue and is received
again: the messages a worker prefetched and had not started when it stopped
(warm shutdown), and, with `acks_late`, the ones it was running when it died.
`celery_task_redelivered_total` counts the received deliveries the transport
flags as redelivered, so `received - redelivered` counts first deliveries.

- **RabbitMQ.** The broker sets the `redelivered` flag of `basic.deliver` on
  every message it delivers again after a consumer went away without acking.
- **Redis.** kombu sets `delivery_info["redelivered"]` when it restores an
  unacked message to its queue: at a warm shutdown, and when the visibility
  timeout restores the messages of a worker that died.

A task republished by hand, or by `self.retry()`, is a new message and is
never counted as redelivered.

## Label values

Task names, queue names and exception class names come from outside the
exporter, so each is checked once, when a process first meets it:

- **Length.** A value longer than 200 characters (`MAX_LABEL_LENGTH` in
  `exporter/celery_signal_exporter/labels.py`) becomes its first 187 characters, `~`, and 12 hex
  digits of a hash of the whole value, 200 characters in all. Distinct long
  values stay distinct, and every process cuts a value the same way, so their
  series still add up. `celery_exporter_label_values_truncated_total` counts
  the cuts.
- **Number.** Task names beyond `max_task_names` (default 500) and queue
  names beyond `max_queue_names` (default 100) distinct values in a process
  become `__overflow__` (see *Broker-dependent behaviour* below).

## Queue names

Celery's request keeps only the exchange and the routing key, so the worker
works out the queue a message really came from:

- **AMQP.** The message's consumer tag names the consumer, and so the queue.
- **Redis and other kombu virtual transports.** The worker matches the
  message's exchange and routing key against the bindings of the queues it
  consumes.

The worker main process passes the answer to the pool process in the request,
so success, failure and retry carry the same `queue_name` as `received`. A
producer labels `sent` with the configured queue that its exchange and routing
key point to.

## Broker-dependent behaviour to know

- **Expired tasks on RabbitMQ.** Celery turns `expires` into an AMQP
  per-message TTL, so RabbitMQ drops an expired message before any worker sees
  it, and `celery_task_revoked_total{reason="expired"}` stays 0 there. On
  Redis the worker receives expired messages and counts them.
- **Task names.** Names beyond `max_task_names` distinct names (default 500)
  in a process become `__overflow__`, and
  `celery_exporter_dropped_label_values_total{label="name"}` counts each fold.
  The exporter caps the whole directory too, over every `celery_task_*`
  series: the first 2 000 distinct names it sees keep their series for the
  life of the exporter process; the rest are merged into
  `name="__overflow__"` (counts are kept, added up) and
  `celery_exporter_task_names_folded` says how many. So `/metrics` holds at
  most 2 001 names whatever the number of processes.
- **Queue names.** A producer labels `sent` with the queue its exchange and
  routing key point to, which is the routing key itself when no configured
  queue matches; routing keys made up per call would make a series each.
  Queue names beyond `max_queue_names` distinct names (default 100) in a
  process become `__overflow__`, and
  `celery_exporter_dropped_label_values_total{label="queue_name"}` counts each
  fold. Every publish is still counted in `sent`.
"""


def _row(spec: Spec) -> str:
    labels = ", ".join(f"`{label}`" for label in spec.labels)
    return f"| `{spec.sample_name}` | {spec.kind} | {labels} | {spec.recorded_by} | {spec.notes} |".replace(
        "|  |", "| |")


def render() -> str:
    """docs/metrics.md as the catalogue says it."""
    parts = [INTRO]
    for section in SECTIONS:
        parts.append(f"## {section.title}\n")
        if section.before:
            parts.append(section.before)
        table = ["| metric | type | labels | recorded by | notes |", "| --- | --- | --- | --- | --- |"]
        table += [_row(spec) for spec in section.specs]
        parts.append("\n".join(table) + "\n")
        if section.after:
            parts.append(section.after)
    parts.append(PROSE)
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/metrics.md (or, with --check, say whether it is stale)."""
    parser = argparse.ArgumentParser(prog="python -m celery_signal_exporter.catalogue",
                                     description="Write the metric catalogue page from the catalogue module.")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help=f"file to write (default: {DOC_PATH})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    out: Path = args.out
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            print(f"{out} is stale: run python -m celery_signal_exporter.catalogue", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`promtool test rules` on the generated production rules: every alert fires
on one series and stays quiet on others that sit just the other side of its
condition. Expected annotations are the alert's own templates with the values
we expect Prometheus to print written out by hand.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import yaml

from celery_signal_exporter.mixin.config import PRODUCTION, RunLimit
from celery_signal_exporter.mixin.rules import alerts, rule_groups
from tests.harness import promtool
from tests.rules_support import BEAT, DROPPED_AND_SLOWER_CASES, NS, PROBE, RULES, WORKER, case, expected, ql

CASES: list[dict[str, Any]] = [
    case(
        "CeleryBacklogGrowing",
        [
            (ql("celery_queue_length", f'{PROBE}, queue_name="growing", vhost="0"'), "0+10x60"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="flat", vhost="0"'), "500x60"),  # long but steady
            (ql("celery_queue_length", f'{PROBE}, queue_name="small", vhost="0"'), "0+1x60"),  # under the floor
        ],
        "40m",
        [expected("CeleryBacklogGrowing", {"namespace": "prod", "queue_name": "growing"}, "400")],
    ),
    case(
        "CeleryBacklogWillBreach",
        [
            (ql("celery_queue_length", f'{PROBE}, queue_name="fast", vhost="0"'), "0+100x120"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="slow", vhost="0"'), "0+50x120"),  # reaches 6000 only
        ],
        "60m",
        [expected("CeleryBacklogWillBreach", {"namespace": "prod", "queue_name": "fast"}, "12k")],
    ),
    case(
        "CeleryQueueDrainTooSlow",
        [
            (ql("celery_queue_length", f'{PROBE}, queue_name="slow", vhost="0"'), "3000x60"),
            (ql("celery_task_started_total", f'{WORKER}, name="t", queue_name="slow"'), "0+60x60"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="fast", vhost="0"'), "3000x60"),
            (ql("celery_task_started_total", f'{WORKER}, name="t", queue_name="fast"'), "0+600x60"),
            # Nobody consumes: +Inf, which is CeleryQueueNoConsumers' business.
            (ql("celery_queue_length", f'{PROBE}, queue_name="dead", vhost="0"'), "3000x60"),
        ],
        "40m",
        [expected("CeleryQueueDrainTooSlow", {"namespace": "prod", "queue_name": "slow"}, "50m 0s")],
    ),
    case(
        # 10/s start and 12/s arrive (the backlog grows 2/s): 40 minutes in, 4 800 wait, a task published
        # now waits 8 minutes, past the 5m objective; "steady" is as long but no longer grows.
        "CeleryQueueWaitWillBreach",
        [
            (ql("celery_queue_length", f'{PROBE}, queue_name="growing", vhost="0"'), "0+120x60"),
            (ql("celery_task_started_total", f'{WORKER}, name="t", queue_name="growing"'), "0+600x60"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="steady", vhost="0"'), "4800x60"),
            (ql("celery_task_started_total", f'{WORKER}, name="t", queue_name="steady"'), "0+600x60"),
        ],
        "40m",
        [expected("CeleryQueueWaitWillBreach", {"namespace": "prod", "queue_name": "growing"}, "8m 0s")],
    ),
    case(
        # 5 % of starts late over a day and over 2 hours: the 1 % budget burns 5 times too fast (bar 3).
        "CeleryQueueWaitBudgetBurnSlow",
        [
            (ql("celery_task_queue_wait_seconds_bucket", f'{WORKER}, name="t", queue_name="slow", le="300"'),
             "0+95x1500"),
            (ql("celery_task_queue_wait_seconds_count", f'{WORKER}, name="t", queue_name="slow"'), "0+100x1500"),
            # 0.5 % late: inside the budget.
            (ql("celery_task_queue_wait_seconds_bucket", f'{WORKER}, name="t", queue_name="ok", le="300"'),
             "0+995x1500"),
            (ql("celery_task_queue_wait_seconds_count", f'{WORKER}, name="t", queue_name="ok"'), "0+1000x1500"),
        ],
        "1d",
        [expected("CeleryQueueWaitBudgetBurnSlow", {"namespace": "prod", "queue_name": "slow"}, "5%")],
    ),
    case(
        # 20 % of the starts on queue "slow" waited past its 5m objective, over the last hour and the
        # last 5 minutes alike: the budget of 1 % burns 20 times too fast (the bar is 14.4).
        "CeleryQueueWaitBudgetBurn",
        [
            (ql("celery_task_queue_wait_seconds_bucket", f'{WORKER}, name="t", queue_name="slow", le="300.0"'),
             "0+8x70"),
            (ql("celery_task_queue_wait_seconds_count", f'{WORKER}, name="t", queue_name="slow"'), "0+10x70"),
            # 600 waiting, 60 started a minute: a task published now waits 10 minutes.
            (ql("celery_queue_length", f'{PROBE}, queue_name="slow", vhost="0"'), "600x70"),
            (ql("celery_task_started_total", f'{WORKER}, name="t", queue_name="slow"'), "0+60x70"),
            # 5 % late: under both bars (14.4 x and 6 x 1 %), quiet.
            (ql("celery_task_queue_wait_seconds_bucket", f'{WORKER}, name="t", queue_name="ok", le="300"'), "0+95x70"),
            (ql("celery_task_queue_wait_seconds_count", f'{WORKER}, name="t", queue_name="ok"'), "0+100x70"),
        ],
        "65m",
        [expected("CeleryQueueWaitBudgetBurn", {"namespace": "prod", "queue_name": "slow"}, "20%", wait="10m 0s")],
    ),
    case(
        # Two runs of "flaky" gave up after their retries; "recovers" retried and succeeded (still 0).
        "CeleryTaskRetriesExhausted",
        [
            (ql("celery_task_retries_exhausted_total", f'{WORKER}, name="flaky", queue_name="q"'), "0x10 1 2x10"),
            (ql("celery_task_retries_exhausted_total", f'{WORKER}, name="recovers", queue_name="q"'), "0x21"),
        ],
        "12m",
        [expected("CeleryTaskRetriesExhausted", {"namespace": "prod", "name": "flaky", "queue_name": "q"}, "2")],
    ),
    case(
        "CeleryOldestMessageTooOld",
        [
            (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, queue_name="old", vhost="0"'), "1000x30"),
            (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, queue_name="new", vhost="0"'), "100x30"),
        ],
        "10m",
        [expected("CeleryOldestMessageTooOld", {"namespace": "prod", "queue_name": "old"}, "16m 40s")],
    ),
    case(
        "CeleryQueueNoConsumers",
        [
            (ql("celery_queue_length", f'{PROBE}, queue_name="orphan", vhost="0"'), "50x30"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="served", vhost="0"'), "50x30"),
            (ql("celery_task_received_total", f'{WORKER}, name="t", queue_name="served"'), "0+60x30"),
            # RabbitMQ says who consumes, even when nothing was taken lately.
            (ql("celery_queue_length", f'{PROBE}, queue_name="attached", vhost="/"'), "50x30"),
            (ql("celery_queue_consumers", f'{PROBE}, queue_name="attached", vhost="/"'), "2x30"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="empty", vhost="0"'), "0x30"),
            # Redis: nothing taken lately (every slot busy with long runs), but a live worker consumes it.
            (ql("celery_queue_length", f'{PROBE}, queue_name="busy", vhost="0"'), "50x30"),
            (ql("celery_worker_consuming", f'{WORKER}, hostname="celery@a", queue_name="busy"'), "1x30"),
            (ql("celery_worker_pool_processes", f'{WORKER}, hostname="celery@a"'), "4x30"),
            # Its only consumer's heartbeat stopped: the pool is no longer reported, so nobody serves it.
            (ql("celery_queue_length", f'{PROBE}, queue_name="hung", vhost="0"'), "50x30"),
            (ql("celery_worker_consuming", f'{WORKER}, hostname="celery@b", queue_name="hung"'), "1x30"),
        ],
        "20m",
        [
            expected("CeleryQueueNoConsumers", {"namespace": "prod", "queue_name": "orphan"}, "50"),
            expected("CeleryQueueNoConsumers", {"namespace": "prod", "queue_name": "hung"}, "50"),
        ],
    ),
    case(
        "CeleryBrokerMemoryHigh",
        [
            (ql("celery_broker_memory_used_bytes", f'{PROBE}, broker="redis://a:6379/0", node="a:6379"'), "900x30"),
            (ql("celery_broker_memory_limit_bytes", f'{PROBE}, broker="redis://a:6379/0", node="a:6379"'), "1000x30"),
            (ql("celery_broker_memory_used_bytes", f'{PROBE}, broker="redis://b:6379/0", node="b:6379"'), "500x30"),
            (ql("celery_broker_memory_limit_bytes", f'{PROBE}, broker="redis://b:6379/0", node="b:6379"'), "1000x30"),
            # No limit configured (0): nothing to be near.
            (ql("celery_broker_memory_used_bytes", f'{PROBE}, broker="redis://c:6379/0", node="c:6379"'), "900x30"),
            (ql("celery_broker_memory_limit_bytes", f'{PROBE}, broker="redis://c:6379/0", node="c:6379"'), "0x30"),
        ],
        "20m",
        [
            expected(
                "CeleryBrokerMemoryHigh",
                {"namespace": "prod", "broker": "redis://a:6379/0", "node": "a:6379"},
                "90%",
            )
        ],
    ),
    case(
        "CeleryBrokerMemoryWillBreach",
        [
            (
                ql("celery_broker_memory_used_bytes", f'{PROBE}, broker="amqp://a:5672//", node="rabbit@a"'),
                "0+1000000x60",
            ),
            (
                ql("celery_broker_memory_limit_bytes", f'{PROBE}, broker="amqp://a:5672//", node="rabbit@a"'),
                "100000000x60",
            ),
            (
                ql("celery_broker_memory_used_bytes", f'{PROBE}, broker="amqp://b:5672//", node="rabbit@b"'),
                "10000000x60",
            ),
            (
                ql("celery_broker_memory_limit_bytes", f'{PROBE}, broker="amqp://b:5672//", node="rabbit@b"'),
                "100000000x60",
            ),
        ],
        "40m",
        [
            expected(
                "CeleryBrokerMemoryWillBreach",
                {"namespace": "prod", "broker": "amqp://a:5672//", "node": "rabbit@a"},
                "267Mi",
            )
        ],
    ),
    case(
        "CeleryBrokerMemoryAlarm",
        [
            # One alarm check a second found it raised on node a; never on node b.
            (ql("celery_broker_memory_alarm_raised_checks_total",
                f'{PROBE}, broker="amqp://a:5672//", node="rabbit@a"'),
             "0+60x10"),
            (ql("celery_broker_memory_alarm_raised_checks_total",
                f'{PROBE}, broker="amqp://a:5672//", node="rabbit@b"'),
             "0x10"),
        ],
        "5m",
        [expected("CeleryBrokerMemoryAlarm", {"namespace": "prod", "broker": "amqp://a:5672//", "node": "rabbit@a"})],
    ),
    case(
        "CeleryBrokerDiskAlarm",
        [
            # One alarm check a second found it raised on node a; never on node b.
            (ql("celery_broker_disk_alarm_raised_checks_total",
                f'{PROBE}, broker="amqp://a:5672//", node="rabbit@a"'),
             "0+60x10"),
            (ql("celery_broker_disk_alarm_raised_checks_total",
                f'{PROBE}, broker="amqp://a:5672//", node="rabbit@b"'),
             "0x10"),
        ],
        "5m",
        [expected("CeleryBrokerDiskAlarm", {"namespace": "prod", "broker": "amqp://a:5672//", "node": "rabbit@a"})],
    ),
    case(
        "CeleryBrokerDown",
        [
            (ql("celery_broker_up", f'{PROBE}, broker="amqp://a:5672//"'), "0x20"),
            (ql("celery_broker_up", f'{PROBE}, broker="redis://b:6379/0"'), "1x20"),
        ],
        "10m",
        [expected("CeleryBrokerDown", {"namespace": "prod", "broker": "amqp://a:5672//"})],
    ),
    case(
        "CeleryExporterDown",
        [
            (ql("up", f'{WORKER}, instance="10.0.0.1:9808"'), "0x20"),
            (ql("up", f'{WORKER}, instance="10.0.0.2:9808"'), "1x20"),
            (ql("up", 'job="node", instance="10.0.0.3:9100"'), "0x20"),  # not ours
        ],
        "10m",
        [
            expected(
                "CeleryExporterDown",
                {"job": "celery-worker", "namespace": "prod", "instance": "10.0.0.1:9808"},
            )
        ],
    ),
    case(
        # No target at all matches the selector.
        "CeleryExporterDown",
        [(ql("up", 'job="node", instance="10.0.0.3:9100"'), "1x20")],
        "10m",
        [expected("CeleryExporterDown", {})],
    ),
    case(
        "CeleryTaskFailureRatioHigh",
        [
            (
                ql("celery_task_failed_total", f'{WORKER}, name="t.flaky", queue_name="q", exception="ValueError"'),
                "0+6x60",
            ),
            (ql("celery_task_succeeded_total", f'{WORKER}, name="t.flaky", queue_name="q"'), "0+4x60"),
            (
                ql("celery_task_failed_total", f'{WORKER}, name="t.solid", queue_name="q", exception="KeyError"'),
                "0+1x60",
            ),
            (ql("celery_task_succeeded_total", f'{WORKER}, name="t.solid", queue_name="q"'), "0+99x60"),
            # Every run failed, but one failure is not a pattern.
            (
                ql("celery_task_failed_total", f'{WORKER}, name="t.once", queue_name="q", exception="OSError"'),
                "0x30 1x29",
            ),
            # Runs that replaced themselves or raised Ignore are runs, not failures: 1 in 50 failed (issue 28).
            (
                ql("celery_task_failed_total", f'{WORKER}, name="t.replacer", queue_name="q", exception="OSError"'),
                "0+1x60",
            ),
            (ql("celery_task_replaced_total", f'{WORKER}, name="t.replacer", queue_name="q"'), "0+30x60"),
            (ql("celery_task_ignored_total", f'{WORKER}, name="t.replacer", queue_name="q"'), "0+19x60"),
        ],
        "40m",
        [expected("CeleryTaskFailureRatioHigh", {"namespace": "prod", "name": "t.flaky"}, "60%")],
    ),
    case(
        "CeleryWorkerDown",
        [
            (ql("celery_worker_up", f'{WORKER}, hostname="celery@a"'), "0x20"),
            (ql("celery_worker_up", f'{WORKER}, hostname="celery@b"'), "1x20"),
        ],
        "10m",
        [expected("CeleryWorkerDown", {"namespace": "prod", "hostname": "celery@a"})],
    ),
    case(
        "CeleryTasksExpiring",
        [
            (ql("celery_task_revoked_total", f'{WORKER}, name="t.x", queue_name="q", reason="expired"'), "0x10 0+3x20"),
            (ql("celery_task_revoked_total", f'{WORKER}, name="t.x", queue_name="q", reason="revoked"'), "0+3x30"),
            (ql("celery_task_revoked_total", f'{WORKER}, name="t.y", queue_name="q", reason="expired"'), "5x30"),
        ],
        "25m",
        [expected("CeleryTasksExpiring", {"namespace": "prod", "name": "t.x", "queue_name": "q"}, "30")],
    ),
    case(
        "CeleryBeatDown",
        [
            (ql("celery_beat_up", f'{BEAT}, hostname="beat-a"'), "0x20"),
            (ql("celery_beat_up", f'{BEAT}, hostname="beat-b"'), "1x20"),
        ],
        "10m",
        [expected("CeleryBeatDown", {"namespace": "prod", "hostname": "beat-a"})],
    ),
    case(
        # Beat's series vanished (its exporter gone) after it had been seen: down, with no labels to go by.
        "CeleryBeatDown",
        [
            (ql("celery_beat_up", f'{BEAT}, hostname="beat-a"'), "1x5 stale"),
            (ql("celery_beat_up", f'job="other", {NS}, hostname="beat-x"'), "1x20"),  # not ours: no say
        ],
        "15m",
        [expected("CeleryBeatDown", {})],
    ),
    case(
        "CeleryPeriodicTaskMissed",
        [
            (ql("celery_beat_entry_next_due_timestamp_seconds", f'{BEAT}, entry="nightly", name="t.n"'), "600x30"),
            (ql("celery_beat_entry_next_due_timestamp_seconds", f'{BEAT}, entry="ok", name="t.n"'), "60+60x30"),
        ],
        "20m",
        [expected("CeleryPeriodicTaskMissed", {"namespace": "prod", "entry": "nightly", "name": "t.n"}, "10m 0s")],
    ),
    case(
        "CeleryPeriodicTaskNotSucceeding",
        [
            *[(ql("celery_beat_entry_last_dispatch_timestamp_seconds", f'{BEAT}, entry="{e}", name="t.p"'), "0+60x30")
              for e in ("broken", "never", "fine")],
            *[(ql("celery_beat_entry_interval_seconds", f'{BEAT}, entry="{e}", name="t.p"'), "60x30")
              for e in ("broken", "never", "fine")],
            (ql("celery_beat_entry_last_success_timestamp_seconds", f'{WORKER}, entry="broken", name="t.p"'), "0x30"),
            (ql("celery_beat_entry_last_success_timestamp_seconds", f'{WORKER}, entry="fine", name="t.p"'),
             "0+60x30"),
        ],
        "20m",
        [
            expected("CeleryPeriodicTaskNotSucceeding", {"namespace": "prod", "entry": "broken", "name": "t.p"},
                     "20m 0s"),
            expected("CeleryPeriodicTaskNotSucceeding", {"namespace": "prod", "entry": "never", "name": "t.p"},
                     "20m 0s"),
        ],
    ),
    case(
        "CeleryPeriodicTaskOverlapping",
        [
            (ql("celery_beat_entry_overlaps_total", f'{WORKER}, entry="twice", name="t.p"'), "0x30"),
            (ql("celery_beat_entry_running", f'{WORKER}, entry="twice", name="t.p"'), "2x30"),
            (ql("celery_beat_entry_overlaps_total", f'{WORKER}, entry="once", name="t.p"'), "0x30"),
            (ql("celery_beat_entry_running", f'{WORKER}, entry="once", name="t.p"'), "1x30"),
        ],
        "20m",
        [expected("CeleryPeriodicTaskOverlapping", {"namespace": "prod", "entry": "twice", "name": "t.p"}, "2")],
    ),
    case(
        "CeleryPeriodicTaskExpiring",
        [
            (ql("celery_beat_entry_dispatched_total", f'{BEAT}, entry="dropped", name="t.p"'), "0+1x100"),
            (ql("celery_beat_entry_started_total", f'{WORKER}, entry="dropped", name="t.p"'), "0x100"),
            (ql("celery_beat_entry_dispatched_total", f'{BEAT}, entry="runs", name="t.p"'), "0+1x100"),
            (ql("celery_beat_entry_started_total", f'{WORKER}, entry="runs", name="t.p"'), "0+1x100"),
        ],
        "90m",
        [expected("CeleryPeriodicTaskExpiring", {"namespace": "prod", "entry": "dropped", "name": "t.p"}, "60")],
    ),
    case(
        "CeleryTaskStuck",
        [
            # Past its Celery time limit: the pool did not kill it.
            (ql("celery_task_oldest_running_age_seconds", f'{WORKER}, name="t.limited", queue_name="q"'), "0+60x20"),
            (ql("celery_task_time_limit_seconds", f'{WORKER}, name="t.limited"'), "300x20"),
            # Within a longer limit, though past the 1h default: the task's own limit wins.
            (ql("celery_task_oldest_running_age_seconds", f'{WORKER}, name="t.long", queue_name="q"'), "4000x20"),
            (ql("celery_task_time_limit_seconds", f'{WORKER}, name="t.long"'), "7200x20"),
            # No time limit: the run_limits default (1h) applies.
            (ql("celery_task_oldest_running_age_seconds", f'{WORKER}, name="t.free", queue_name="q"'), "4000x20"),
            (ql("celery_task_oldest_running_age_seconds", f'{WORKER}, name="t.quick", queue_name="q"'), "100x20"),
            (ql("celery_task_oldest_running_age_seconds", f'{WORKER}, name="t.idle", queue_name="q"'), "0x20"),
        ],
        "10m",
        [
            expected("CeleryTaskStuck", {"namespace": "prod", "name": "t.limited", "queue_name": "q"}, "10m 0s"),
            expected("CeleryTaskStuck", {"namespace": "prod", "name": "t.free", "queue_name": "q"}, "1h 6m 40s"),
        ],
    ),
]


# A full metrics volume (issue 27): lost writes page at once; an old loss, or none, does not.
CASES.append(case(
    "CeleryExporterWritesLost",
    [
        (ql("celery_exporter_writes_lost_total", f'{WORKER}, pod="w1", signal="task_prerun"'), "0+1x20"),
        (ql("celery_exporter_writes_lost_total", f'{WORKER}, pod="w1", signal="task_postrun"'), "0x20"),
        (ql("celery_exporter_writes_lost_total", f'{WORKER}, pod="w1", signal="task_received"'), "0 3x20"),
    ],
    "15m",
    [expected("CeleryExporterWritesLost", {"namespace": "prod", "signal": "task_prerun"}, "10")],
))


def test_every_alert_has_a_case() -> None:
    tested = {c["alert_rule_test"][0]["alertname"] for c in [*CASES, *DROPPED_AND_SLOWER_CASES]}
    assert tested == {a.name for a in alerts(PRODUCTION)}


def test_alert_rules_fire_only_when_they_should(tmp_path: Path) -> None:
    tests = tmp_path / "celery-rules.test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": CASES}))
    run = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_each_case_also_proves_silence() -> None:
    """A case whose series all fire would prove nothing about the quiet side."""
    for c in CASES:
        fired = len(c["alert_rule_test"][0]["exp_alerts"])
        assert len(c["input_series"]) > fired or c["input_series"][0]["series"].startswith('up{job="node"'), c


def test_run_limits_first_match_wins(tmp_path: Path) -> None:
    """A specific run_limits entry before the `.*` default: each task is held to the first it matches."""
    config = dataclasses.replace(
        PRODUCTION,
        run_limits=(RunLimit(name_regex=r"proj\.report_.*", max_age="6h"), RunLimit(name_regex=".*", max_age="1h")),
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule_groups(config)))
    age = "celery_task_oldest_running_age_seconds"
    series = [
        (ql(age, f'{WORKER}, name="proj.report_daily", queue_name="q"'), "7200x10"),  # 2h of 6h
        (ql(age, f'{WORKER}, name="proj.report_weekly", queue_name="q"'), "30000x10"),  # past 6h
        (ql(age, f'{WORKER}, name="proj.send", queue_name="q"'), "7200x10"),  # past the 1h default
    ]
    test = case(
        "CeleryTaskStuck",
        series,
        "5m",
        [
            expected("CeleryTaskStuck", {"namespace": "prod", "name": name, "queue_name": "q"}, value, config)
            for name, value in (("proj.report_weekly", "8h 20m 0s"), ("proj.send", "2h 0m 0s"))
        ],
    )
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [test]}))
    run = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

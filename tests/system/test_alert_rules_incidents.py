"""The committed production rules against series shaped like issue 17's incidents, at production
windows: a 30 s scrape and evaluation interval, every threshold and window as `PRODUCTION` has it.

Each case says when the incident begins (its onset) and asserts the page is firing by the target
time after it, and that healthy series beside it (steady, or just the other side of the condition)
stay quiet the whole time. Annotations are stripped from a copy of the rule file: `tests/system/test_alert_rules.py`
checks them; here only which alert fires for which series, and when, matters.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from celery_signal_exporter.mixin.config import PRODUCTION, seconds
from tests.harness import promtool
from tests.rules_support import DROPPED_AND_SLOWER_CASES, RULES

STEP = 30  # seconds: the production scrape and evaluation interval (deploy/examples/prometheus.yml)
NS = 'namespace="prod"'
PROBE = f'job="celery-probe", {NS}'
WORKER = f'job="celery-worker", {NS}'


def counter(*parts: tuple[float, int], start: float = 0.0) -> str:
    """A counter's samples, one per step, as promtool reads them: `parts` are (increase per step,
    steps), one after the other; each part continues from where the last one ended."""
    out, value = [], start
    out.append(f"{value:g}")
    for per_step, steps in parts:
        out.append(f"{value + per_step:g}+{per_step:g}x{steps - 1}")
        value += per_step * steps
    return " ".join(out)


def samples(values: list[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def at(t: float) -> str:
    """A promtool eval_time in whole seconds."""
    return f"{int(t)}s"


def check(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    stripped = tmp_path / "celery-rules.yml"
    stripped.write_text(yaml.safe_dump(rules))
    spec = tmp_path / "incidents.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(stripped)], "evaluation_interval": f"{STEP}s",
                                    "tests": tests}))
    run = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def firing(alert: str, severity: str, *labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"exp_labels": {"namespace": "prod", **each, "severity": severity}} for each in labels]


def test_a_flapping_memory_alarm_pages_within_two_minutes(tmp_path: Path) -> None:
    """Set and cleared 6 times a minute, 2-6 s each (3, 2, 5, 4, 6, 2 s, one burst every 10 s): the
    probe checks the alarm every second (`--rabbitmq-alarm-interval`) and counts the checks that found
    it raised, so every burst adds to the counter whatever the scrapes see. Counted pessimistically
    here: a burst of b seconds caught by b - 1 checks, and the onset just after a scrape, so the first
    step holds only the first two bursts (2 + 1 checks, exactly `broker_alarm_samples`). A steady
    alarm pages too; an alarm of a second caught by one check, one of two seconds caught by two, and
    a healthy node never page; the page ends once the alarm has stayed clear for the whole window."""
    onset = 10 * 60
    flap_for = 20 * 60
    steps = 40 * 60 // STEP
    before = onset // STEP
    per_minute = [b - 1 for b in (3, 2, 5, 4, 6, 2)]  # checks that found each burst raised
    first, second = sum(per_minute[:2]), sum(per_minute[2:])
    flap_steps = flap_for // STEP
    increments = [0] * before + [first if i % 2 == 0 else second for i in range(flap_steps)]
    increments += [0] * (steps - len(increments))
    assert first == PRODUCTION.broker_alarm_samples  # the first step alone reaches the threshold
    flapping = [float(sum(increments[:i])) for i in range(steps + 1)]
    one_check = [0.0] * (before + 1) + [1.0] * (steps - before)
    two_checks = [0.0] * (before + 1) + [2.0] * (steps - before)
    checks = "celery_broker_memory_alarm_raised_checks_total"
    amqp = 'broker="amqp://a:5672//"'
    series = [
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@flap"}}', "values": samples(flapping)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@steady"}}',
         "values": counter((0, before), (30, steps - before))},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@one"}}', "values": samples(one_check)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@two"}}', "values": samples(two_checks)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@ok"}}', "values": f"0x{steps}"},
    ]
    both = firing("CeleryBrokerMemoryAlarm", "critical", {"broker": "amqp://a:5672//", "node": "rabbit@flap"},
                  {"broker": "amqp://a:5672//", "node": "rabbit@steady"})
    steady = firing("CeleryBrokerMemoryAlarm", "critical", {"broker": "amqp://a:5672//", "node": "rabbit@steady"})
    quiet_before = [at(t) for t in range(STEP, onset, 5 * STEP)]
    window = seconds(PRODUCTION.broker_alarm_window)
    check(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": t, "alertname": "CeleryBrokerMemoryAlarm", "exp_alerts": []} for t in quiet_before),
            # The target: firing at the first evaluation after the first scrape that follows the onset
            # (Alertmanager's group_wait of 30 s then delivers it within 2 minutes), and still firing
            # while it flaps.
            *({"eval_time": at(onset + t), "alertname": "CeleryBrokerMemoryAlarm", "exp_alerts": both}
              for t in (STEP, 2 * STEP, 120, 300, 900, flap_for - STEP)),
            # Clear for a whole window: the flapping node's page resolves; the steady one stays.
            {"eval_time": at(onset + flap_for + window + STEP), "alertname": "CeleryBrokerMemoryAlarm",
             "exp_alerts": steady},
        ],
    }])


def test_tasks_a_message_ttl_drops_page_within_ten_minutes(tmp_path: Path) -> None:
    """A recurring task sent every 30 s whose `expires` makes RabbitMQ drop every other message from the
    onset on (27 of 55 in the incident); one expired message still reaches a worker (revoked). Beside it
    a healthy task, and a task whose shared queue really grows (its unreceived messages wait, counted by
    the queue length), neither of which may page."""
    onset = 10 * 60
    steps = 60 * 60 // STEP
    before = onset // STEP
    after = steps - before
    sent = counter((1, steps))
    # Received: every message before the onset; from it, every other one (the rest expired on the broker).
    received_values = [float(i) for i in range(before + 1)]
    for i in range(after):
        received_values.append(received_values[-1] + (1 if i % 2 else 0))
    revoked = [0.0] * (before + 8) + [1.0] * (after - 7)
    s = "celery_task_sent_total"
    r = "celery_task_received_total"
    series = [
        {"series": f'{s}{{{WORKER}, name="t.tick", queue_name="periodic"}}', "values": sent},
        {"series": f'{r}{{{WORKER}, name="t.tick", queue_name="periodic"}}', "values": samples(received_values)},
        {"series": f'celery_task_revoked_total{{{WORKER}, name="t.tick", queue_name="periodic", reason="expired"}}',
         "values": samples(revoked)},
        {"series": f'celery_queue_length{{{PROBE}, queue_name="periodic", vhost="/"}}',
         "values": samples([float(i % 2) for i in range(steps + 1)])},
        # Healthy: every message received.
        {"series": f'{s}{{{WORKER}, name="t.ok", queue_name="periodic"}}', "values": counter((2, steps))},
        {"series": f'{r}{{{WORKER}, name="t.ok", queue_name="periodic"}}', "values": counter((2, steps))},
        # A real backlog: 4 sent, 2 received a step, and the queue grows by the other 2.
        {"series": f'{s}{{{WORKER}, name="t.bulk", queue_name="bulk"}}', "values": counter((4, steps))},
        {"series": f'{r}{{{WORKER}, name="t.bulk", queue_name="bulk"}}', "values": counter((2, steps))},
        {"series": f'celery_queue_length{{{PROBE}, queue_name="bulk", vhost="/"}}', "values": f"0+2x{steps}"},
    ]
    page = firing("CeleryTasksDroppedByBroker", "warning", {"name": "t.tick", "queue_name": "periodic"})
    check(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": at(t), "alertname": "CeleryTasksDroppedByBroker", "exp_alerts": []}
              for t in range(STEP, onset + STEP, 4 * STEP)),
            *({"eval_time": at(onset + t), "alertname": "CeleryTasksDroppedByBroker", "exp_alerts": page}
              for t in (600, 900, 1800, steps * STEP - onset)),
        ],
    }])


def test_a_task_slower_than_yesterday_pages(tmp_path: Path) -> None:
    """Mean runtime (sum over count) 60% above the same window a day before pages; 40% above does not,
    nor does a steady task, nor a rare task (1 run in 5 minutes, under the floor of runs) that doubled.
    The runtime histogram's _sum and _count alone carry the mean; buckets are not needed."""
    baseline = seconds(PRODUCTION.slower_baseline)
    assert baseline == 86400 and PRODUCTION.slower_ratio == 1.5
    onset = int(baseline) + 3600
    steps = (onset + 3 * 3600) // STEP
    before = onset // STEP
    after = steps - before
    h = "celery_task_runtime_seconds"

    def task(name: str, runs_per_step: float, mean: float, mean_after: float) -> list[dict[str, str]]:
        labels = f'{WORKER}, name="{name}", queue_name="q"'
        return [
            {"series": f"{h}_count{{{labels}}}", "values": counter((runs_per_step, steps))},
            {"series": f"{h}_sum{{{labels}}}",
             "values": counter((runs_per_step * mean, before), (runs_per_step * mean_after, after))},
        ]

    series = [
        *task("t.slower", 10, 0.2, 0.32),  # +60%
        *task("t.bit_slower", 10, 0.2, 0.28),  # +40%: under the ratio
        *task("t.steady", 10, 0.2, 0.2),
        *task("t.rare", 0.1, 0.2, 0.4),  # doubled, but 6 runs in 30 minutes
    ]
    page = firing("CeleryTaskSlowerThanYesterday", "warning", {"name": "t.slower"})
    # The 30-minute mean passes 1.5 times after 25 minutes of the new runtime; then `for: 15m`.
    target = onset + 25 * 60 + seconds(PRODUCTION.slower_for) + 5 * 60
    check(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": at(t), "alertname": "CeleryTaskSlowerThanYesterday", "exp_alerts": []}
              for t in (3600, baseline, baseline + 1800, onset, onset + 20 * 60)),
            *({"eval_time": at(t), "alertname": "CeleryTaskSlowerThanYesterday", "exp_alerts": page}
              for t in (target, steps * STEP)),
        ],
    }])


def test_the_dropped_and_slower_cases_pass_as_test_alert_rules_runs_them(tmp_path: Path) -> None:
    tests = tmp_path / "dropped-and-slower.test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                     "tests": DROPPED_AND_SLOWER_CASES}))
    run = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

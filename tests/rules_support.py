"""promtool rule-test cases for the production rules: input label sets and the alerts each case expects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from celery_signal_exporter.mixin import panels
from celery_signal_exporter.mixin.config import PRODUCTION, Config
from celery_signal_exporter.mixin.rules import alerts

ROOT = Path(__file__).resolve().parent.parent


RULES = ROOT / "deploy/prometheus/celery-rules.yml"


NS = 'namespace="prod"'


PROBE = f'job="celery-probe", {NS}'


WORKER = f'job="celery-worker", {NS}'


BEAT = f'job="celery-beat", {NS}'


def expected(alert: str, labels: dict[str, str], value: str = "", config: Config = PRODUCTION,
             wait: str = "") -> dict[str, Any]:
    """The alert's labels and annotations as Prometheus should render them for `labels` and `value`."""
    rule = [a for a in alerts(config) if a.name == alert][-1]  # the last: the default objective's

    def fill(template: str) -> str:
        # A `with ... query` block renders `wait` where the case gives one, else nothing.
        template = re.sub(r"\{\{ with .*? \}\}(.*?)\{\{ \. \| first \| value \| \w+ \}\}(.*?)\{\{ end \}\}",
                          lambda m: f"{m.group(1)}{wait}{m.group(2)}" if wait else "", template)
        template = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)
        return re.sub(r"\{\{ \$value \| \w+ \}\}", value, template)

    return {
        "exp_labels": {**labels, "severity": rule.severity, **rule.labels},
        "exp_annotations": {
            "summary": rule.summary,
            "description": fill(rule.description),
            "runbook_url": f"{config.runbook_url}#{alert.lower()}",
            "dashboard_url": panels.url(config, *rule.panel),
        },
    }


def case(
    alert: str, series: list[tuple[str, str]], at: str, firing: list[dict[str, Any]], interval: str = "1m"
) -> dict[str, Any]:
    return {
        "interval": interval,
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": firing}],
    }


def ql(metric: str, labels: str) -> str:
    return f"{metric}{{{labels}}}"


#: Cases for CeleryTasksDroppedByBroker and CeleryTaskSlowerThanYesterday in the form of
#: `tests/system/test_alert_rules.py` (1 m interval, exact values and
#: annotations), so that its one-case-per-alert list can take them in.
DROPPED_AND_SLOWER_CASES: list[dict[str, Any]] = [
    case(
        "CeleryTasksDroppedByBroker",
        [
            (ql("celery_task_sent_total", f'{WORKER}, name="t.tick", queue_name="q"'), "0+10x30"),
            (ql("celery_task_received_total", f'{WORKER}, name="t.tick", queue_name="q"'), "0+5x30"),
            (ql("celery_task_sent_total", f'{WORKER}, name="t.ok", queue_name="q"'), "0+10x30"),
            (ql("celery_task_received_total", f'{WORKER}, name="t.ok", queue_name="q"'), "0+10x30"),
            (ql("celery_queue_length", f'{PROBE}, queue_name="q", vhost="/"'), "0x30"),
        ],
        "20m",
        [expected("CeleryTasksDroppedByBroker", {"namespace": "prod", "name": "t.tick", "queue_name": "q"},
                              "50")],
    ),
    case(
        "CeleryTaskSlowerThanYesterday",
        [
            (ql("celery_task_runtime_seconds_count", f'{WORKER}, name="t.slow", queue_name="q"'), "0+10x1600"),
            (ql("celery_task_runtime_seconds_sum", f'{WORKER}, name="t.slow", queue_name="q"'),
             "0+2x1499 3002+4x100"),
            (ql("celery_task_runtime_seconds_count", f'{WORKER}, name="t.same", queue_name="q"'), "0+10x1600"),
            (ql("celery_task_runtime_seconds_sum", f'{WORKER}, name="t.same", queue_name="q"'), "0+2x1600"),
        ],
        "1590m",
        [expected("CeleryTaskSlowerThanYesterday", {"namespace": "prod", "name": "t.slow"}, "2")],
    ),
]

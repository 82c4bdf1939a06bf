"""The incident suite's stack: a real Prometheus and Alertmanager evaluating the committed
production rules under the faithful scaled profile, the real exporter with its cadences divided
by the same factor, and a webhook standing in for the pager.

Every duration of the rules (windows, `for`, horizons, offsets) and every count threshold is
divided by K (`scaled()` in mixin/config.py, checked in tests/unit/test_mixin.py); so are the cadences
around them: Prometheus's scrape and evaluation intervals (30 s in production, the PodMonitor's
and prometheus-operator's), Alertmanager's group_wait/group_interval/repeat_interval (its
defaults), the probe interval, the worker heartbeat and the worker timeout. An incident driven
K times faster then pages after t suite seconds exactly when production would after K·t: the
suite reports and asserts production seconds.

Timeouts that only cap a slow call (the probe timeout) are not cadences: the probe's keeps its
production 10 s where it can, but `serve` refuses one longer than the interval, so it is the
scaled interval (0.75 s), which a loopback broker answers well within.

The celery-exporter mixin's three alerts (the anchor) run beside ours in the same Prometheus,
scaled the same way and labelled `ruleset="anchor"`, so one incident measures both rule sets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery_signal_exporter.mixin.config import PRODUCTION, Config, scaled
from celery_signal_exporter.mixin.rules import rule_groups
from tests.harness import ExporterProcess, exporter
from tests.stack import Prometheus, Webhook, monitoring

#: The factor: 30 s production scrapes become 1.5 s, 5 minutes become 15 s, a day 72 minutes.
K = 20
PROFILE: Config = scaled(PRODUCTION, K)

# Production cadences (seconds), each divided by K below.
PRODUCTION_SCRAPE = 30.0  # deploy/kubernetes/base/*-podmonitor.yaml
PRODUCTION_EVALUATION = 30.0  # prometheus-operator's default evaluation interval
PRODUCTION_GROUP_WAIT = 30.0  # Alertmanager's defaults
PRODUCTION_GROUP_INTERVAL = 300.0
PRODUCTION_REPEAT_INTERVAL = 4 * 3600.0
PRODUCTION_PROBE_INTERVAL = 15.0  # `serve --probe-interval` default
PRODUCTION_ALARM_INTERVAL = 1.0  # `serve --rabbitmq-alarm-interval` default
PRODUCTION_HEARTBEAT = 2.0  # instrument(heartbeat_interval=) default
PRODUCTION_WORKER_TIMEOUT = 10.0  # `serve --worker-timeout` default

SCRAPE = PRODUCTION_SCRAPE / K
HEARTBEAT = PRODUCTION_HEARTBEAT / K
WORKER_TIMEOUT = PRODUCTION_WORKER_TIMEOUT / K
PROBE_INTERVAL = PRODUCTION_PROBE_INTERVAL / K
ALARM_INTERVAL = PRODUCTION_ALARM_INTERVAL / K
PROBE_TIMEOUT = 10.0  # a cap, not a cadence (module docstring); probe() bounds it by the interval


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _anchor_rules() -> dict[str, Any]:
    """danihodovic/celery-exporter's mixin alerts as it ships them (selector, thresholds, windows:
    failure ratio over 10m above 5% for 1m; queue length above 100 for 20m; worker down for 15m),
    scaled like ours: windows and `for` divided by K, the count threshold 100 too, the ratio kept."""
    sel = 'job=~".*celery.*"'
    window = _ms(600 / K)
    failed = (f'sum(increase(celery_task_failed_total{{{sel}, queue_name!~"None", name!~"None"}}[{window}])) '
              "by (job, namespace, queue_name, name)")
    succeeded = (f'sum(increase(celery_task_succeeded_total{{{sel}, queue_name!~"None", name!~"None"}}'
                 f"[{window}])) by (job, namespace, queue_name, name)")
    labels = {"severity": "warning", "ruleset": "anchor"}
    return {"groups": [{"name": "celery-exporter-anchor", "rules": [
        {"alert": "CeleryTaskHighFailRate", "expr": f"{failed}\n/\n({failed}\n+\n{succeeded}\n) * 100 > 5",
         "for": _ms(60 / K), "labels": labels},
        {"alert": "CeleryHighQueueLength",
         "expr": f'sum(celery_queue_length{{{sel}, queue_name!~"None"}}) by (job, namespace, queue_name) > {100 / K:g}',
         "for": _ms(1200 / K), "labels": labels},
        {"alert": "CeleryWorkerDown", "expr": f"celery_worker_up{{{sel}}} == 0", "for": _ms(900 / K),
         "labels": labels},
    ]}]}


@dataclass
class Measure:
    """One row of the incident table: when the incident began and when each page arrived."""

    incident: str
    onset: float
    pages: dict[str, float | None] = field(default_factory=dict)  # "ours:Alert" / "anchor:Alert" -> production s

    def row(self) -> dict[str, Any]:
        return {"incident": self.incident, "pages": self.pages}


class Stack:
    """What an incident talks to: Prometheus, the pager, and its clock in production seconds."""

    def __init__(self, tmp: str, prom: Prometheus, pager: Webhook) -> None:
        self.tmp, self.prom, self.pager = tmp, prom, pager

    def pages(self, alertname: str, since: float, ruleset: str = "ours", status: str = "firing",
              **labels: str) -> list[dict[str, Any]]:
        """Notifications of `alertname` (ours, or the anchor's) that reached the pager after `since`."""
        def ours(a: dict[str, Any]) -> bool:
            return (a["labels"].get("ruleset") == "anchor") == (ruleset == "anchor")

        return [a for a in self.pager.notifications(alertname, status)
                if a["_received"] >= since and ours(a)
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_page(self, alertname: str, onset: float, within: float, ruleset: str = "ours",
                  status: str = "firing", **labels: str) -> float | None:
        """Production seconds from `onset` to the first such notification, waiting at most `within`
        production seconds (plus one group_interval of slack for delivery); None when none came."""
        deadline = onset + (within + PRODUCTION_GROUP_INTERVAL) / K
        while True:
            found = self.pages(alertname, onset, ruleset, status, **labels)
            if found:
                return (min(a["_received"] for a in found) - onset) * K
            if time.time() > deadline:
                return None
            time.sleep(0.2)

    def firing(self, alertname: str, ruleset: str = "ours", **labels: str) -> list[dict[str, Any]]:
        """Alerts Prometheus holds as firing now (whether or not Alertmanager delivered them yet)."""
        return [a for a in self.prom.alerts("firing")
                if a["labels"]["alertname"] == alertname
                and (a["labels"].get("ruleset") == "anchor") == (ruleset == "anchor")
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def sleep(self, production_seconds: float) -> None:
        time.sleep(production_seconds / K)


@contextmanager
def incident_stack(tmp: str, targets: dict[str, str], profile: Config = PROFILE,
                   backfill: str | None = None) -> Iterator[Stack]:
    """Alertmanager, the pager and a Prometheus scraping `targets` (job -> host:port, each labelled
    namespace="e2e", as tests/stack.py does) with `profile`'s rules and the anchor's, at the scaled cadences."""
    rules = {"celery-rules.yml": rule_groups(profile), "anchor-rules.yml": _anchor_rules()}
    with monitoring(tmp, targets, rules, interval=_ms(SCRAPE), group_wait=_ms(PRODUCTION_GROUP_WAIT / K),
                    group_interval=_ms(PRODUCTION_GROUP_INTERVAL / K),
                    repeat_interval=_ms(PRODUCTION_REPEAT_INTERVAL / K), backfill=backfill) as mon:
        yield Stack(tmp, mon.prom, mon.pager)


@contextmanager
def sidecar(tmp: str, metrics_dir: str) -> Iterator[ExporterProcess]:
    """The worker pods' exporter, with the scaled worker timeout."""
    with exporter(tmp, "--metrics-dir", metrics_dir, "--worker-timeout", f"{WORKER_TIMEOUT:g}") as ex:
        yield ex


@contextmanager
def probe(tmp: str, *broker_urls: str, queues: tuple[str, ...] = ()) -> Iterator[ExporterProcess]:
    """The broker probe, at the scaled probe interval."""
    args = [a for url in broker_urls for a in ("--broker-url", url)]
    args += [a for q in queues for a in ("--queue", q)]
    # RabbitMQ's alarm checks (`--rabbitmq-alarm-interval`, 1 s in production) are a cadence too.
    args += ["--rabbitmq-alarm-interval", f"{ALARM_INTERVAL:g}"]
    # `serve` refuses a timeout longer than the interval: the cap is the interval at most.
    timeout = min(PROBE_TIMEOUT, PROBE_INTERVAL)
    with exporter(tmp, *args, "--probe-interval", f"{PROBE_INTERVAL:g}", "--probe-timeout", f"{timeout:g}") as ex:
        yield ex


def report(measure: Measure) -> None:
    """Append one incident's measured times to $CSX_INCIDENT_REPORT (JSON lines), when set, for the
    table in docs/monitoring.md; always print it, so a CI log shows it too."""
    line = json.dumps(measure.row())
    print(f"incident: {line}")
    path = os.environ.get("CSX_INCIDENT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")

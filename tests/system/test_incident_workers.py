"""Issue 17's worker-side targets with real workers, a real exporter and a real Prometheus (Redis):

- a task's first expiry is visible to `increase()`: the exporter serves
  `celery_task_revoked_total{reason="expired"}` at 0 beside the task's counters before it expires;
- (a worker shut down gracefully does not page, one that vanishes does: tests/system/test_incidents_queues.py
  and tests/system/test_monitoring_e2e.py;)
- tasks RabbitMQ drops by their message TTL (Celery's `expires`) page CeleryTasksDroppedByBroker, under
  the faithful scaled profile (`scaled(PRODUCTION, K)`), on the real broker of the suite (3.10.8).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from celery_signal_exporter.mixin.config import PRODUCTION, scaled
from celery_signal_exporter.mixin.rules import rule_groups
from tests.harness import ROOT, env_for, exporter, has, value, wait_until, worker
from tests.stack import Prometheus, monitoring

#: Timing-sensitive: .ci/run runs it alone, after the parallel tests.
pytestmark = pytest.mark.serial

ONE_OK = """
from tests.workload_app import ok
ok.apply_async((1,), queue="alpha")
"""

ONE_EXPIRED = """
from datetime import datetime, timedelta, timezone
from tests.workload_app import ok
ok.apply_async((0,), queue="alpha", expires=datetime.now(timezone.utc) - timedelta(seconds=30))
"""


TO_BETA_EXPIRING = """
from tests.workload_app import ok
for i in range(10):
    ok.apply_async((i,), queue="beta", expires=1)
"""

TO_ALPHA = """
from tests.workload_app import ok
for i in range(10):
    ok.apply_async((i,), queue="alpha")
"""


def publish(env: dict[str, str], code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]


def states(prom: Prometheus, alertname: str, hostname: str) -> set[str]:
    """The states (pending, firing) Prometheus holds for the alert on this worker."""
    return {a["state"] for state in ("pending", "firing") for a in prom.alerts(state)
            if a["labels"]["alertname"] == alertname and a["labels"].get("hostname") == hostname}


def test_the_first_expiry_of_a_task_is_an_increase(redis_url: str, tmp_path: Path) -> None:
    tmp = str(tmp_path)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    expired = 'celery_task_revoked_total{reason="expired", name="t.ok", queue_name="alpha"}'
    with (
        worker(env, tmp, concurrency=1),
        exporter(tmp, "--metrics-dir", metrics_dir, "--worker-timeout", "5") as sidecar,
        monitoring(tmp, {"celery-worker": f"127.0.0.1:{sidecar.port}"}, {}) as mon,
    ):
        prom = mon.prom
        publish(env, ONE_OK)
        wait_until(lambda: value(sidecar.scrape(), "celery_task_succeeded_total", name="t.ok") == 1, 30,
                   "the first run of t.ok")
        s = sidecar.scrape()
        assert has(s, "celery_task_revoked_total", name="t.ok", queue_name="alpha", reason="expired")
        assert value(s, "celery_task_revoked_total", name="t.ok", queue_name="alpha", reason="expired") == 0
        # No other reason is made up: only expiry needs a series before its first event.
        assert not has(s, "celery_task_revoked_total", reason="revoked")
        wait_until(lambda: [r for r in prom.query(expired) if float(r["value"][1]) == 0], 30,
                   "Prometheus to scrape the expired series at 0")

        publish(env, ONE_EXPIRED)
        wait_until(lambda: value(sidecar.scrape(), "celery_task_revoked_total", name="t.ok", reason="expired") == 1,
                   30, "the worker to drop the expired message")
        seen = wait_until(lambda: prom.query(f"increase({expired}[1m]) > 0"), 30,
                          "increase() to see the first expiry")
        assert 0.5 < float(seen[0]["value"][1]) < 3, seen  # one expiry, extrapolated over the window
        assert prom.query(f"resets({expired}[5m]) == 0"), "the counter never went back"


def test_tasks_a_rabbitmq_message_ttl_drops_page(amqp_url: str, tmp_path: Path) -> None:
    """Ten runs sent with `expires=1` to a queue no worker consumes: RabbitMQ drops them unseen. Ten runs
    to a consumed queue are received. Only the dropped task pages, with the estimate at 10."""
    tmp = str(tmp_path)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(amqp_url, metrics_dir)
    k = 20  # 10m window -> 30 s, for 2m -> 6 s; the count floor 3 -> 0.15
    rules = {"celery-rules.yml": rule_groups(scaled(PRODUCTION, k))}
    with (
        worker(env, tmp, concurrency=1, queues="alpha"),
        exporter(tmp, "--metrics-dir", metrics_dir, "--worker-timeout", "5") as sidecar,
        exporter(tmp, "--broker-url", amqp_url, "--queue", "alpha", "--queue", "beta",
                 "--probe-interval", "1", "--probe-timeout", "1") as probe,
        monitoring(tmp, {"celery-worker": f"127.0.0.1:{sidecar.port}", "celery-probe": f"127.0.0.1:{probe.port}"},
                   rules) as mon,
    ):
        prom = mon.prom
        publish(env, TO_ALPHA)
        # A recurring task's sent series exists before the runs we count expire (increase() of a series born
        # at 10 reads 0): one expiring run first. RabbitMQ drops an expired message only at the head of its
        # queue (a message without a TTL in front would keep them), here on its own timer.
        publish(env, TO_BETA_EXPIRING.replace("range(10)", "range(1)"))
        wait_until(lambda: prom.query('celery_task_sent_total{queue_name="beta"} == 1'), 30,
                   "Prometheus to see the first run sent to beta")
        wait_until(lambda: prom.query('celery_queue_length{queue_name="beta"} == 0'), 30,
                   "RabbitMQ to drop the first run")
        publish(env, TO_BETA_EXPIRING)
        wait_until(lambda: value(sidecar.scrape(), "celery_task_received_total", name="t.ok", queue_name="alpha")
                   == 10, 30, "the consumed queue's runs to be received")
        page = wait_until(lambda: [a for a in prom.alerts("firing")
                                   if a["labels"]["alertname"] == "CeleryTasksDroppedByBroker"], 90,
                          "CeleryTasksDroppedByBroker", interval=1)
        assert {(a["labels"]["name"], a["labels"]["queue_name"]) for a in page} == {("t.ok", "beta")}, page
        s = probe.scrape()
        assert value(s, "celery_queue_length", queue_name="beta") == 0, "RabbitMQ dropped them: none waits"
        assert not has(sidecar.scrape(), "celery_task_received_total", queue_name="beta")
        (estimate,) = prom.query('max_over_time(task:celery_task_dropped:estimate{queue_name="beta"}[1m])')
        # 10, as increase() extrapolates it: a 30 s window with a series 20 s old read up to 19 here.
        assert 8 <= float(estimate["value"][1]) <= 25, estimate

"""End to end: a real worker on a real Redis, the real exporter (as a worker
sidecar and as a broker probe), a real Prometheus loaded with the test
profile of our rules, a real Alertmanager, and a webhook standing in for the
pager.

1. A known workload runs; then every query of every dashboard panel, with the
   dashboard's variables filled in, must return data.
2. A producer outruns a throttled worker: CeleryBacklogGrowing must fire and
   reach the webhook; a second worker then drains the queue and the alert
   must resolve, again through Alertmanager.
3. The three alerts of the most used Celery exporter's mixin, kept as they
   ship (only their `for` is shortened), evaluate correctly on our metrics.
4. A worker scaled in (graceful stop) does not page CeleryWorkerDown; a
   worker that vanishes (SIGKILL) does, ours and the compat one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from celery_signal_exporter.mixin.dashboards import DASHBOARDS
from celery_signal_exporter.mixin.rules import rule_groups
from tests.conftest import MotoServer
from tests.harness import (
    REGION,
    ROOT,
    RedisServer,
    broker_url,
    env_for,
    exporter,
    produce,
    sqs_client,
    wait_until,
    worker,
)
from tests.mixin_support import PERIODIC_DASHBOARD, dashboards, panels, substitute
from tests.profiles import short_profile
from tests.stack import Prometheus, monitoring

# The three alerts of danihodovic/celery-exporter's mixin, with its default
# selector and windows; `for` is shortened from 1m/20m/15m so the test ends.
COMPAT_SELECTOR = 'job=~".*celery.*"'
COMPAT_RULES = {
    "groups": [
        {
            "name": "celery-exporter-compat",
            "rules": [
                {
                    "alert": "CeleryTaskHighFailRate",
                    "expr": (
                        f'sum(increase(celery_task_failed_total{{{COMPAT_SELECTOR}, queue_name!~"None", '
                        f'name!~"None"}}[10m])) by (job, namespace, queue_name, name)\n/\n('
                        f'sum(increase(celery_task_failed_total{{{COMPAT_SELECTOR}, queue_name!~"None", '
                        f'name!~"None"}}[10m])) by (job, namespace, queue_name, name)\n+\n'
                        f'sum(increase(celery_task_succeeded_total{{{COMPAT_SELECTOR}, queue_name!~"None", '
                        f'name!~"None"}}[10m])) by (job, namespace, queue_name, name)\n) * 100 > 5'
                    ),
                    "for": "2s",
                    "labels": {"severity": "warning"},
                },
                {
                    "alert": "CeleryHighQueueLength",
                    "expr": f'sum(celery_queue_length{{{COMPAT_SELECTOR}, queue_name!~"None"}}) '
                    "by (job, namespace, queue_name) > 100",
                    "for": "2s",
                    "labels": {"severity": "warning"},
                },
                {
                    "alert": "CeleryWorkerDown",
                    "expr": f"celery_worker_up{{{COMPAT_SELECTOR}}} == 0",
                    "for": "2s",
                    "labels": {"severity": "warning"},
                },
            ],
        }
    ]
}

# Publishes t.sleep(0.1) at ~40/s, one in five with a negative sleep so that
# it fails: a task with both outcomes, as the compat fail-rate alert needs.
# First one countdown task, which the worker holds (scheduled) throughout,
# for the Workers dashboard's "Scheduled by queue".
FLOOD = """
import time
from tests.workload_app import later, sleep
later.apply_async(countdown=900, queue="alpha")
start = time.monotonic()
i = 0
while time.monotonic() - start < 150:
    sleep.apply_async((-1 if i % 5 == 0 else 0.1,), queue="alpha")
    i += 1
    time.sleep(0.025)
"""


def firing(prom: Prometheus, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in prom.alerts("firing")
        if a["labels"]["alertname"] == alertname and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def has_up(prom: Prometheus, hostname: str) -> bool:
    """Whether Prometheus still holds a celery_worker_up series for the worker (stale ones read none)."""
    return bool(prom.query(f'celery_worker_up{{hostname="{hostname}"}}'))


def check_variables(prom: Prometheus) -> None:
    """Each dashboard variable's label_values() query finds values, as Grafana would list them.
    No beat runs here: tests/system/test_beat.py checks the Periodic tasks dashboard against a real beat."""
    for name, d in dashboards().items():
        if name == PERIODIC_DASHBOARD:
            continue
        for var in d["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"])
            assert m, var["query"]
            values = {s.get(m.group(2)) for s in prom.series(substitute(m.group(1)))} - {None}
            assert values, f"{name}: variable {var['name']} lists nothing"


def check_panels(prom: Prometheus) -> None:
    empty = []
    for name, d in dashboards().items():
        if name == PERIODIC_DASHBOARD:
            continue
        for p in panels(d):
            for t in p["targets"]:
                if not prom.query(substitute(t["expr"])):
                    empty.append(f"{name} / {p['title']} / {t['refId']}: {t['expr']}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def sqs_queues(endpoint: str, prefix: str) -> None:
    """For the panels only SQS fills: a message SQS holds delayed, and one in a queue's dead-letter queue."""
    client = sqs_client(endpoint)
    dlq = client.create_queue(QueueName=f"{prefix}e2e-sqs-dlq")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "2"})
    queue = client.create_queue(QueueName=f"{prefix}e2e-sqs", Attributes={"RedrivePolicy": policy})["QueueUrl"]
    client.send_message(QueueUrl=queue, MessageBody="{}", DelaySeconds=900)
    client.send_message(QueueUrl=dlq, MessageBody="{}")
    client.close()


@pytest.mark.long
def test_dashboards_have_data_and_backlog_alert_pages_then_resolves(
        tmp_path: Path, amqp_url: str, moto_server: MotoServer, sqs_prefix: str) -> None:
    tmp = str(tmp_path)
    sqs_queues(moto_server.endpoint, sqs_prefix)
    sqs_url = broker_url(moto_server.endpoint)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    rules = {"celery-rules.yml": rule_groups(short_profile()), "compat.yml": COMPAT_RULES}
    # A RabbitMQ queue with waiting messages, for the panels only RabbitMQ can fill.
    with Connection(amqp_url) as conn:
        q = conn.SimpleQueue("e2e-rabbit")
        for i in range(3):
            q.put({"n": i})
        q.close()

    with RedisServer(tmp, maxmemory="1gb") as redis:
        broker = f"{redis.url}/0"
        # CSX_TEST_LATE: pool processes forget t.late, so the outcomes scenario has a pre-start failure.
        env = env_for(broker, str(metrics_dir), CSX_TEST_LATE="1")
        with (
            # A time limit, so the Tasks dashboard's "Oldest run vs time limit" has its limit line.
            worker(env, tmp, "--time-limit", "600", concurrency=1) as slow_worker,
            exporter(tmp, "--metrics-dir", str(metrics_dir), "--worker-timeout", "5") as sidecar,
            exporter(
                tmp, "--broker-url", broker, "--broker-url", amqp_url, "--queue", "alpha", "--queue", "beta",
                "--probe-interval", "1", "--probe-timeout", "1",
            ) as probe,
            # An SQS broker (moto) for the panels only SQS fills: delayed, dead letters, API requests.
            exporter(tmp, "--broker-url", sqs_url, "--transport-options",
                     json.dumps({"region": REGION, "queue_name_prefix": sqs_prefix}),
                     "--probe-interval", "1", "--probe-timeout", "1") as sqs_probe,
            monitoring(
                tmp,
                {"celery-worker": f"127.0.0.1:{sidecar.port}", "celery-probe": f"127.0.0.1:{probe.port}",
                 "celery-sqs-probe": f"127.0.0.1:{sqs_probe.port}"},
                rules,
            ) as mon,
        ):
            prom, hook = mon.prom, mon.pager
            produce(env, "counts")
            produce(env, "outcomes")  # ignored, replaced, rejected by the run, failed before start
            wait_until(
                lambda: prom.query('sum(celery_task_rejected_total{job="celery-worker"}) >= 1'), 60,
                "Prometheus to scrape the finished workload",
            )

            flood = subprocess.Popen([sys.executable, "-c", FLOOD], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_until(lambda: hook.notifications("CeleryBacklogGrowing", "firing"), 120,
                           "CeleryBacklogGrowing to reach the webhook through Alertmanager", interval=1)
                pages = hook.notifications("CeleryBacklogGrowing", "firing")
                assert {a["labels"]["queue_name"] for a in pages} == {"alpha"}
                page = pages[0]
                assert page["labels"]["namespace"] == "e2e" and page["labels"]["severity"] == "warning"
                assert page["annotations"]["runbook_url"].endswith("#celerybackloggrowing")
                held = float(re.search(r"holds (\d[\d.]*k?) messages", page["annotations"]["description"])
                             .group(1).replace("k", "e3"))
                assert held > 20, page["annotations"]["description"]

                # While the backlog stands, every panel has something to show.
                check_variables(prom)
                check_panels(prom)
                wait_until(lambda: firing(prom, "CeleryHighQueueLength", queue_name="alpha", job="celery-probe"), 30,
                           "the compat CeleryHighQueueLength alert to fire")
                wait_until(lambda: firing(prom, "CeleryTaskHighFailRate", name="t.sleep", queue_name="alpha"), 30,
                           "the compat CeleryTaskHighFailRate alert to fire")
                ratio = str(COMPAT_RULES["groups"][0]["rules"][0]["expr"]).removesuffix(" > 5")
                (rate,) = [r for r in prom.query(ratio) if r["metric"]["name"] == "t.sleep"]
                assert 10 < float(rate["value"][1]) < 35, rate  # one in five fails
            finally:
                flood.kill()
                flood.wait()

            # An operator scales out; the backlog drains and the page resolves.
            with worker(env, tmp, concurrency=8, queues="alpha") as fast_worker:
                wait_until(lambda: prom.query('sum(celery_queue_length{queue_name="alpha"}) == 0'), 120,
                           "the backlog to drain")
                wait_until(lambda: hook.notifications("CeleryBacklogGrowing", "resolved"), 90,
                           "CeleryBacklogGrowing to resolve through Alertmanager", interval=1)
                assert not firing(prom, "CeleryBacklogGrowing")
                assert not firing(prom, "CeleryWorkerDown")
                fast_host = fast_worker.hostname
            # The fast worker shut down gracefully (scaled back in): it is retired, not down, and no longer
            # served. The slow one then vanishes (SIGKILL): both our alert and the compat one page for it,
            # and for it only; the retired worker, stopped first, would be paging by then if it ever were.
            wait_until(lambda: not has_up(prom, fast_host), 30, "the retired worker's up series to end")
            os.killpg(slow_worker.proc.pid, signal.SIGKILL)
            slow_worker.proc.wait()
            slow_host = slow_worker.hostname
            wait_until(lambda: len(firing(prom, "CeleryWorkerDown", hostname=slow_host)) == 2, 90,
                       "CeleryWorkerDown, ours and the compat one, for the killed worker")
            down = {a["labels"]["hostname"] for a in firing(prom, "CeleryWorkerDown")}
            assert down == {slow_host}, down
            pending = {a["labels"]["hostname"] for a in prom.alerts("pending")
                       if a["labels"]["alertname"] == "CeleryWorkerDown"}
            assert fast_host not in pending, pending
            assert slow_host != fast_host
            assert os.listdir(metrics_dir)
    assert set(DASHBOARDS) == set(dashboards())

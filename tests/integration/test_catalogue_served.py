"""/metrics serves exactly what the catalogue defines: from every recorded metric written by the real
store and a cached probe, and from real workers, brokers and a moto SQS endpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import boto3
import pytest
from celery import Celery

from celery_signal_exporter import catalogue
from celery_signal_exporter.probes import BrokerSnapshot
from celery_signal_exporter.probes.base import NodeStats, QueueStats
from celery_signal_exporter.recording.metrics import Recorder
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.probe_loop import ProbeGroup, ProbeLoop
from celery_signal_exporter.server.service import Exporter
from tests.catalogue_support import BEAT, documented, exposed, families
from tests.conftest import MotoServer
from tests.harness import ROOT, env_for, exporter, has, produce, value, wait_until, worker
from tests.recorded import observe

PACKAGE = Path(ROOT) / "exporter" / "celery_signal_exporter"
STALE = "docs/metrics.md is stale: run python -m celery_signal_exporter.catalogue"


def test_served_without_brokers_equals_the_catalogue(tmp_path: Path) -> None:
    """The real collectors on real inputs: a metrics directory written by the real writer, merged by the
    DirectoryCollector; a ProbeLoop holding a full snapshot; the service's own families; rendered as /metrics."""
    metrics_dir = str(tmp_path / "metrics")
    os.makedirs(metrics_dir)
    store = write_every_recorded_metric(metrics_dir)
    snapshot = BrokerSnapshot(
        queues=[QueueStats("celery", "0", 3, unacked=1, consumers=2, oldest_message_age_seconds=1.5,
                           measures=((catalogue.QUEUE_DELAYED, 2), (catalogue.QUEUE_DEAD_LETTER, 1)))],
        nodes=[NodeStats("rabbit@h", 1e6, 2e6, memory_alarm=False, disk_alarm=True)],
        unacked_total=4,
        counters=((catalogue.PROBE_REQUESTS, 7),),
    )
    loop = ProbeLoop(CachedProbe(snapshot), "redis://127.0.0.1:1/0")
    assert loop.probe_once()
    try:
        service = Exporter(ServeConfig(metrics_dir=metrics_dir), [ProbeGroup([loop])])
        body, _ = service.render(None)
    finally:
        loop.stop()
        store.close()
    served = families(body.decode())
    expected = {s.sample_name: (s.kind, s.help, frozenset(s.labels)) for s in catalogue.SERVED}
    assert sorted(set(served) - set(expected)) == [], "served but not in the catalogue"
    assert sorted(set(expected) - set(served)) == [], "in the catalogue but not served"
    assert {n: served[n] for n in expected if served[n] != expected[n]} == {}, "type, help or labels differ"


def test_metrics_endpoint_equals_catalogue(amqp_url: str, redis_url: str, moto_server: MotoServer, sqs_prefix: str,
                                          tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(amqp_url, metrics_dir, CSX_TEST_LATE="1")
    # A message waiting on Redis with the due header, so oldest-message age has something to read.
    producer = Celery("catalogue", broker=redis_url, set_as_current=False)
    producer.send_task("t.ok", queue="waiting", headers={"csx_due": time.time()})
    # SQS (moto) for what only it reports: a queue with a dead-letter queue and a delayed message.
    sqs = boto3.client("sqs", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    dlq = sqs.create_queue(QueueName=f"{sqs_prefix}dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    source = sqs.create_queue(QueueName=f"{sqs_prefix}waiting", Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "3"})})["QueueUrl"]
    sqs.send_message(QueueUrl=source, MessageBody="x", DelaySeconds=600)
    sqs.close()
    sqs_url = f"sqs://test:test@{moto_server.endpoint.removeprefix('http://')}"
    args = ["--metrics-dir", metrics_dir, "--broker-url", amqp_url, "--broker-url", redis_url,
            "--broker-url", sqs_url, "--transport-options",
            json.dumps({"queue_name_prefix": sqs_prefix, "region": "us-east-1"}),
            "--queue", "waiting", "--probe-interval", "1", "--probe-timeout", "1"]
    # A worker time limit, so every task has one to expose; a 2 s run, so a tick sees a run in progress.
    with worker(env, str(tmp_path), "--time-limit", "300", concurrency=2), exporter(str(tmp_path), *args) as ex:
        produce(env, "counts")
        produce(env, "sleepers", 1, 2)
        produce(env, "outcomes")

        def complete() -> str | None:
            text = ex.get("/metrics").text
            s = ex.scrape()
            done = value(s, "celery_task_succeeded_total") + value(s, "celery_task_failed_total") >= 45
            probed = value(s, "celery_broker_up") == 3 and value(s, "celery_queue_consumers") >= 2 \
                and value(s, "celery_queue_delayed", queue_name="waiting") == 1
            aged = value(s, "celery_queue_oldest_message_age_seconds", queue_name="waiting") > 0
            ran = has(s, "celery_task_oldest_running_age_seconds") and all(
                has(s, spec.sample_name) for spec in (catalogue.IGNORED, catalogue.REPLACED, catalogue.RUN_REJECTED,
                                                      catalogue.FAILED_BEFORE_START))
            return text if done and probed and aged and ran and value(s, "celery_task_rejected_total") else None

        text = wait_until(complete, 90, "every metric to appear")
    docs, seen = documented(), exposed(text)
    for name in documented(BEAT):
        del docs[name]
    assert sorted(set(seen) - set(docs)) == [], "exposed but not in the catalogue"
    assert sorted(set(docs) - set(seen)) == [], "in the catalogue but never exposed"
    mismatched = {n: (sorted(seen[n]), sorted(docs[n])) for n in docs if seen[n] != docs[n]}
    assert mismatched == {}, "label names differ (exposed, catalogued)"


class CachedProbe:
    """A probe that answers with a snapshot built by the test: the loop's cached state, no broker."""

    schemes = ("redis",)

    def __init__(self, snapshot: BrokerSnapshot) -> None:
        self._snapshot = snapshot

    def discover(self) -> set[str]:
        return set()

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        return self._snapshot

    def close(self) -> None:
        pass


def write_every_recorded_metric(directory: str) -> Store:
    """One series of every metric the instrumentation records, written by the real Store and recorders."""
    store = Store(directory)
    for spec in catalogue.RECORDED:
        series = Recorder(store, spec, (0.1, 1.0)).labels(*("x" for _ in spec.labels))
        if spec.kind == "histogram":
            observe(store, series, 0.5)
        elif spec.kind == "counter":
            series.inc()
        else:
            now = time.time()
            series.set(now if spec in (catalogue.HEARTBEAT, catalogue.BEAT_HEARTBEAT) else 1.0, now)
    return store

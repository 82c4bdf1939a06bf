"""docs/metrics.md is the contract: /metrics must expose exactly what it lists."""

from __future__ import annotations

import os
import re
import time

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, env_for, exporter, produce, value, wait_until, worker

Catalogue = dict[str, frozenset[str]]


def documented() -> Catalogue:
    """metric name -> label names, from every table row of docs/metrics.md."""
    rows: Catalogue = {}
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and re.fullmatch(r"`celery_[a-z_]+`", cells[0]):
                rows[cells[0].strip("`")] = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
    return rows


def exposed(text: str) -> Catalogue:
    """Family name -> label names seen on its samples (histogram `le` aside)."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = found.setdefault(name, set())
        for sample in family.samples:
            labels.update(k for k in sample.labels if k != "le")
    return {k: frozenset(v) for k, v in found.items()}


def test_catalogue_parses() -> None:
    docs = documented()
    assert len(docs) >= 30
    assert docs["celery_task_failed_total"] == {"name", "queue_name", "exception"}
    assert docs["celery_exporter_scrape_duration_seconds"] == frozenset()


def test_metrics_endpoint_equals_catalogue(amqp_url: str, redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(amqp_url, metrics_dir)
    # A message waiting on Redis with the due header, so oldest-message age has something to read.
    producer = Celery("catalogue", broker=redis_url, set_as_current=False)
    producer.send_task("t.ok", queue="waiting", headers={"csx_due": time.time()})
    args = ["--metrics-dir", metrics_dir, "--broker-url", amqp_url, "--broker-url", redis_url,
            "--queue", "waiting", "--probe-interval", "1", "--probe-timeout", "1"]
    with worker(env, str(tmp_path), concurrency=2), exporter(str(tmp_path), *args) as ex:
        produce(env, "counts")

        def complete() -> str | None:
            text = ex.get("/metrics").text
            s = ex.scrape()
            done = value(s, "celery_task_succeeded_total") + value(s, "celery_task_failed_total") >= 45
            probed = value(s, "celery_broker_up") == 2 and value(s, "celery_queue_consumers") >= 2
            aged = value(s, "celery_queue_oldest_message_age_seconds", queue_name="waiting") > 0
            return text if done and probed and aged and value(s, "celery_task_rejected_total") else None

        text = wait_until(complete, 90, "every metric to appear")
    docs, seen = documented(), exposed(text)
    assert sorted(set(seen) - set(docs)) == [], "exposed but not in docs/metrics.md"
    assert sorted(set(docs) - set(seen)) == [], "in docs/metrics.md but never exposed"
    mismatched = {n: (sorted(seen[n]), sorted(docs[n])) for n in docs if seen[n] != docs[n]}
    assert mismatched == {}, "label names differ (exposed, documented)"
